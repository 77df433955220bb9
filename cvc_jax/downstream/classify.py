"""Action recognition downstream: finetune and linear probe (SPEC section 6).

The pretrained encoder plus a new head (dropout and a linear layer; optionally
L2 normalisation and a BatchNorm first, as CoCLR's linear probe) is trained on
augmented clips: the whole network (finetune), or only the head with the
encoder frozen and its BatchNorm in inference mode (linear probe). The test
protocol is `evaluate.clip_averaged`: ten clips, softmax averaged, every video once.
"""

import contextlib
import functools
import json
import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from cvc_jax import checkpointing
from cvc_jax import models
from cvc_jax import optimizer
from cvc_jax import parallel
from cvc_jax import views as views_lib
from cvc_jax.downstream import evaluate
from cvc_jax.downstream import metrics
from cvc_jax.models import heads
from cvc_jax.models import resnet3d


class Classifier(nn.Module):
  """Encoder -> [L2 normalisation] -> [BatchNorm `head_bn`] -> dropout -> linear `fc`.

  Attributes:
    backbone: the encoder module (its parameters live under `backbone`).
    num_classes: outputs of `fc`.
    dropout: dropout rate before `fc`.
    l2_norm: L2-normalise the pooled features first.
    batch_norm: a BatchNorm (PyTorch's statistics; batch statistics in training,
      running ones in inference, whether or not the encoder trains) before `fc`.
  """
  backbone: nn.Module
  num_classes: int
  dropout: float = 0.5
  l2_norm: bool = False
  batch_norm: bool = False

  @nn.compact
  def __call__(self, clips, *, train: bool, train_encoder: bool):
    pooled, _ = self.backbone(clips, train=train and train_encoder)
    if not train_encoder:
      pooled = jax.lax.stop_gradient(pooled)
    if self.l2_norm or self.batch_norm:
      pooled = pooled.astype(jnp.float32)
    if self.l2_norm:
      pooled = heads.l2_normalize(pooled)
    if self.batch_norm:
      pooled = resnet3d.BatchNorm(use_running_average=not train, name="head_bn")(pooled)
    pooled = nn.Dropout(self.dropout, deterministic=not train)(pooled)
    return nn.Dense(self.num_classes, name="fc")(pooled.astype(jnp.float32))


def _optimizer(config, steps_per_epoch: int, linear: bool):
  """config.optim's Adam (or AdamW) and step schedule, as in pretraining."""
  tx = optimizer.scheduled(optimizer.adam_with_decay(config.optim), config.optim,
                           steps_per_epoch)
  if not linear:
    return tx
  # Linear probe: the encoder gets no update at all (no weight decay either).
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda params: {k: ("frozen" if k == "backbone" else "train") for k in params})


# What a resumed downstream run must share with the run that wrote the workdir's
# checkpoints: shapes alone would let a run from other pretrained weights continue.
_SAME_RUN_KEYS = ("mode", "init_from", "input.dataset")


def _check_same_run(config, workdir: str) -> None:
  """Raises a ValueError when workdir's config.json names another run than config."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    before = json.load(f)
  before.setdefault("mode", "pretrain")  # pretraining configs have no mode
  differ, now = [], config.to_dict()
  for key in _SAME_RUN_KEYS:
    old, new = before, now
    for part in key.split("."):
      old = old.get(part) if isinstance(old, dict) else None
      new = new.get(part)
    if old != new:
      differ.append(f"{key} {old!r} there, {new!r} here")
  if differ:
    raise ValueError(
        f"{workdir} holds the checkpoints of another run ({'; '.join(differ)}). "
        "Give this run a new --workdir, or resume that one with its settings.")


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Finetunes (config.mode 'finetune') or linear-probes ('linear'), then tests.

  Resumes from the newest checkpoint in workdir/checkpoints (saved every
  config.checkpoint_every_steps, at the end, and on SIGTERM); batches and dropout
  depend only on (seed, step), so a resumed run ends where an uninterrupted one does.

  Returns:
    The results dict also written to workdir/results.json.
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from cvc_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top

  linear = config.mode == "linear"
  builder = datasets.ensure_built(config)
  label = builder.info.features["label"]
  encoder, enc_vars, described = evaluate.load_encoder(config)
  logging.info("%s from %s.", config.mode, described)
  model = Classifier(encoder, label.num_classes, dropout=config.model.dropout,
                     l2_norm=config.model.head_l2_norm,
                     batch_norm=config.model.head_batch_norm)

  mesh = parallel.data_mesh(config.batch_size)
  replicated, batch_sharding = parallel.shardings(mesh)
  with config.unlocked():
    config.input.split = config.eval.train_split
  steps_per_epoch = datasets.steps_per_epoch(config)
  total_steps = config.num_epochs * steps_per_epoch
  t, s = config.input.num_frames, config.input.crop_size
  fc_vars = models.jit_init(functools.partial(model.init, train=False, train_encoder=False))(
      jax.random.key(config.seed), jnp.zeros((1, t, s, s, 3)))
  params = dict(fc_vars["params"], backbone=enc_vars["params"])
  batch_stats = dict(fc_vars["batch_stats"], backbone=enc_vars["batch_stats"])
  tx = _optimizer(config, steps_per_epoch, linear)
  state = parallel.replicate((params, batch_stats, tx.init(params)), replicated)

  @functools.partial(jax.jit, donate_argnums=(0,),
                     in_shardings=(replicated, batch_sharding, replicated),
                     out_shardings=(replicated, replicated))
  def step(state, batch, rng):
    params, batch_stats, opt_state = state
    clips = views_lib.train_clip_views(batch["frames"], rng, config, batch["sizes"])

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, clips, train=True,
          train_encoder=not linear, rngs={"dropout": rng}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return loss.mean(), updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  # Left on the way out, whatever the way, last first (as in
  # pretrain.train_and_evaluate): metrics flushed, the last save awaited before
  # SIGTERM's handler is given back, the manager closed.
  with contextlib.ExitStack() as stack:
    manager = stack.enter_context(checkpointing.checkpoint_manager(
        workdir, max_to_keep=config.get("keep_checkpoints", 2),
        save_interval_steps=config.checkpoint_every_steps))
    start_step = 0
    if manager.latest_step() is not None:
      _check_same_run(config, workdir)
      start_step = manager.latest_step()
      state = checkpointing.restore(manager, start_step, dict(step=0, state=state))["state"]
      logging.info("Resumed %s from step %d of %d.", config.mode, start_step, total_steps)
    parallel.barrier("cvc_jax: config.json checked")  # by all, before it changes
    if jax.process_index() == 0:  # what _check_same_run reads when this run resumes
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    rng = jax.random.key(config.seed + 1)
    batches = input_pipeline.train_clip_batches(config, start_step=start_step)
    preemption = stack.enter_context(checkpointing.Preemption(manager))
    stack.callback(writer.flush)
    for i in range(start_step, total_steps):
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
               for k in ("frames", "sizes", "label")}
      key = jax.random.fold_in(rng, i)
      if i == start_step:
        step = parallel.compiled_together(step, state, batch, key, name="downstream step")
      state, loss = step(state, batch, key)
      report(i + 1)
      if (i + 1) % config.log_every_steps == 0 or i + 1 == total_steps:
        writer.write_scalars(i + 1, {"train_loss": float(loss)})
      preempted = preemption.reached(i + 1)  # once: a signal may come in between
      if preempted or i + 1 == total_steps or manager.should_save(i + 1):
        manager.save(i + 1, args=ocp.args.StandardSave(dict(step=i + 1, state=state)),
                     force=True)
      if preempted:
        logging.warning("Stopped at step %d after a preemption signal; run the same "
                        "command again to resume.", i + 1)
        return {}

  params, batch_stats, _ = state
  variables = {"params": params, "batch_stats": batch_stats}
  per_clip = lambda v, clips: jax.nn.softmax(
      model.apply(v, clips, train=False, train_encoder=False))
  probs, labels = evaluate.clip_averaged(config, per_clip, variables,
                                         split=config.eval.test_split)
  result = metrics.classification_metrics(probs, labels, label.names)
  writer.write_scalars(total_steps, {"test_top1": result["top1"],
                                     "test_top5": result["top5"]})
  writer.flush()
  if jax.process_index() == 0:
    metrics.confusion_png(result["confusion"], os.path.join(workdir, "confusion.png"))
    evaluate.write_results(workdir, {config.mode: result, "init_from": described},
                           f"{config.mode} on {config.input.dataset}", config)
  return result
