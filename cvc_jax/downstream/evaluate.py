"""Downstream evaluation (SPEC section 6): linear probe, finetune and retrieval.

Test protocol for classification: ten uniformly spaced T-frame clips per video,
resized and centre-cropped to the training size, softmax averaged over the clips,
top-1 and top-5, every test video counted exactly once across devices and hosts
(the evaluation batches are padded with a mask). Retrieval: clip-averaged,
L2-normalised features; test videos query the training videos by cosine
similarity.
"""

import functools
import json
import os
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from cvc_jax import convert
from cvc_jax import models
from cvc_jax import parallel
from cvc_jax import views as views_lib
from cvc_jax.downstream import metrics
from cvc_jax.models import cvc
from cvc_jax.models import exported
from cvc_jax.models import heads
from cvc_jax.models import resnet3d


def load_encoder(config, rng=None):
  """The encoder named by `config.init_from`, with its variables.

  `init_from` may be: empty (random initialisation, the baseline); a pretraining
  workdir (its newest checkpoint's shared encoder; the architecture comes from its
  config.json); an exported encoder folder (`python -m cvc_jax.export`); or a
  PyTorch / safetensors file of the authors' model or of a torchvision or Hara
  encoder (architecture read from the keys, see `cvc_jax.convert`).

  The module computes in `config.dtype` and rematerialises as `config.remat`
  says, whichever source described it.

  Returns:
    (module, {'params', 'batch_stats'}, description).
  """
  module, variables, described = _encoder_of(config, rng)
  return (module.clone(dtype=cvc.compute_dtype(config), remat=config.get("remat", "none")),
          variables, described)


def _encoder_of(config, rng):
  """`load_encoder`'s (module, variables, description), as its source builds it."""
  source = config.init_from
  if not source:
    module = resnet3d.build_encoder(config.model.encoder)
    t, s = config.input.num_frames, config.input.crop_size
    variables = models.jit_init(functools.partial(module.init, train=False))(
        rng if rng is not None else jax.random.key(config.seed), jnp.zeros((1, t, s, s, 3)))
    return module, dict(variables), "random initialisation"
  if os.path.isdir(source) and exported.is_exported(source):
    module, variables = exported.load_encoder(source)
    return module, variables, f"exported encoder {source}"
  if os.path.isdir(source):
    run_config, variables, step = exported.encoder_from_workdir(source)
    return (resnet3d.build_encoder(run_config["model"]["encoder"]), variables,
            f"pretraining checkpoint {source} step {step}")
  module, variables = convert.encoder_from_torch(convert.load_state_dict(source))
  return module, variables, f"PyTorch weights {source}"


def clip_averaged(config, per_clip: Callable, variables, *, split: str,
                  label_key: str = "label"):
  """Runs `per_clip` over every video of a split, averaged over its clips.

  Args:
    config: the evaluation config (input sizes, batch size, eval.num_clips).
    per_clip: (variables, clips [M, T, S, S, 3]) -> [M, X].
    variables: passed through, replicated.
    split: the data set split.
    label_key: which label to return.

  Returns:
    (outputs [V, X] in video order, labels int [V]).
  """
  from cvc_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  mesh = parallel.data_mesh(config.batch_size)
  replicated, batch_sharding = parallel.shardings(mesh)

  @functools.partial(jax.jit, in_shardings=(replicated, batch_sharding, batch_sharding),
                     out_shardings=batch_sharding)
  def run(variables, frames, sizes):
    b, n = frames.shape[:2]
    clips = views_lib.eval_views(frames, config, sizes)
    out = per_clip(variables, clips.reshape((b * n,) + clips.shape[2:]))
    return jnp.mean(out.reshape((b, n) + out.shape[1:]), axis=1)

  variables = parallel.replicate(variables, replicated)
  rows = {"out": [], "video_index": [], "mask": [], "label": []}
  batches = input_pipeline.eval_batches(config, split=split, num_clips=config.eval.num_clips,
                                        label_key=label_key)
  for i, local in enumerate(tqdm.tqdm(
      batches, total=input_pipeline.num_eval_batches(config, split),
      desc=f"{config.input.dataset} {split}", unit="batch",
      disable=jax.process_index() > 0)):
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
             for k in ("frames", "sizes", "video_index", "mask", "label")}
    if i == 0:  # every batch has the first one's shapes
      run = parallel.compiled_together(run, variables, batch["frames"], batch["sizes"],
                                       name="evaluation")
    batch["out"] = run(variables, batch.pop("frames"), batch.pop("sizes"))
    # All gathered as global arrays of one sharding, so each output row stays with
    # its video's index whatever order the mesh puts the processes' devices in.
    for key, value in batch.items():
      rows[key].append(np.asarray(multihost_utils.process_allgather(value, tiled=True)))
  stacked = {k: np.concatenate(v) for k, v in rows.items()}
  num = datasets.num_videos(config, split)
  return metrics.gather_by_video(stacked["video_index"], stacked["mask"], stacked["out"],
                                 stacked["label"].astype(np.int64), num_videos=num)


def encoder_features(module: nn.Module, l2_norm: bool = False):
  """per_clip function: pooled encoder features in float32, BatchNorm in
  inference mode, L2-normalised per clip if `l2_norm`."""
  def per_clip(variables, clips):
    pooled = module.apply(variables, clips, train=False)[0].astype(jnp.float32)
    return heads.l2_normalize(pooled) if l2_norm else pooled
  return per_clip


def features(config, module, variables, *, split: str, label_keys=("label",),
             l2_norm: bool = False):
  """Clip-averaged encoder features of a split and its labels, computed once;
  each clip's L2-normalised before the average if `l2_norm`.

  Returns:
    (features [V, D], {label key: int labels [V]}) in video order.
  """
  feats, labels = clip_averaged(config, encoder_features(module, l2_norm), variables,
                                split=split, label_key=label_keys[0])
  out = {label_keys[0]: labels}
  if len(label_keys) > 1:  # the other labels straight from the records
    from cvc_jax import datasets  # pylint: disable=g-import-not-at-top
    for key in label_keys[1:]:
      source = datasets.data_source(config, split, label_key=key)
      out[key] = np.asarray([source[i]["label"] for i in range(len(source))], np.int64)
  return feats, out


RETRIEVAL_FEATURES = ("mean", "centred")


def retrieval(config, module, variables, *, label_key="label") -> dict[str, float]:
  """R@k of test videos querying training videos (SPEC 6), by the cosine of
  `config.eval.retrieval_features`: 'mean', each video's clip-averaged features;
  'centred', CoCLR's, clips L2-normalised before the average and each split's
  mean feature subtracted after it."""
  kind = config.eval.get("retrieval_features", "mean")
  if kind not in RETRIEVAL_FEATURES:
    raise ValueError(f"eval.retrieval_features must be one of {RETRIEVAL_FEATURES}, "
                     f"got {kind!r}.")
  centred = kind == "centred"
  train_f, train_l = features(config, module, variables, split=config.eval.train_split,
                              label_keys=(label_key,), l2_norm=centred)
  test_f, test_l = features(config, module, variables, split=config.eval.test_split,
                            label_keys=(label_key,), l2_norm=centred)
  if centred:
    train_f, test_f = train_f - train_f.mean(0), test_f - test_f.mean(0)
  return metrics.retrieval_recall(test_f, test_l[label_key], train_f, train_l[label_key],
                                  ks=config.eval.recall_ks)


def linear_probe_on_features(config, train_f, train_l, test_f, test_l, *,
                             num_classes: int, class_names=None) -> dict[str, Any]:
  """The fast linear probe: a softmax classifier on features extracted once.

  Train features are the clip-averaged features of each training video (no
  augmentation); the classifier is trained full-batch with AdamW and evaluated on
  the clip-averaged test features. The protocol of the paper (augmented clips,
  softmax averaged over test clips) is `classify.train_and_evaluate`.
  """
  # Standardise with training statistics, so one learning rate suits any encoder.
  mean, std = train_f.mean(0), train_f.std(0) + 1e-6
  x_train, x_test = (train_f - mean) / std, (test_f - mean) / std
  lc = config.eval.linear_fast
  tx = optax.adamw(lc.lr, weight_decay=lc.weight_decay)
  params = {"w": jnp.zeros((x_train.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = x_train @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, train_l).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(lc.steps):
    params, opt_state = step(params, opt_state)
  probs = np.asarray(jax.nn.softmax(x_test @ params["w"] + params["b"]))
  return metrics.classification_metrics(probs, test_l, class_names)


def write_results(workdir: str, results: dict[str, Any], title: str, config=None) -> str:
  """Writes results.json and a Markdown table (results.md); returns the table.

  With the run's `config`, results.json also gets each evaluated split's built
  and skipped video counts where the data set has a manifest
  (`datasets.video_counts`).
  """
  if config is not None:
    from cvc_jax import datasets  # pylint: disable=g-import-not-at-top
    counts = datasets.video_counts(config, (config.eval.train_split, config.eval.test_split))
    results = dict(results, **({"videos": counts} if counts else {}))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  lines = [f"# {title}", ""]
  for name, value in results.items():
    if isinstance(value, dict):
      scalars = {k: v for k, v in value.items() if isinstance(v, (int, float))}
      if scalars:
        lines += [f"## {name}", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {100 * v:.1f} |" for k, v in scalars.items()]
        lines.append("")
  table = "\n".join(lines)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  logging.info("Results in %s:\n%s", workdir, table)
  return table


def run_retrieval(config, workdir: str) -> dict[str, float]:
  """The retrieval protocol of `config` (mode 'retrieval'); writes results.json."""
  module, variables, described = load_encoder(config)
  recall = retrieval(config, module, variables)
  if jax.process_index() == 0:
    write_results(workdir, {"retrieval": recall, "init_from": described},
                  f"Retrieval on {config.input.dataset}", config)
  return recall
