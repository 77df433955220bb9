"""Downstream protocols end to end on the tiny synthetic data set (SPEC 6)."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.eval import ucf101_finetune, ucf101_linear, ucf101_retrieval
from cvc_jax import datasets
from cvc_jax import input_pipeline
from cvc_jax.downstream import classify, evaluate
from tests import overrides
from tests.torch_reference import cvc_model
from tests.torch_reference.video_resnet import TorchVideoResNet


def _tiny(config, data_dir, **changes):
  return overrides.apply(config, {
      "input.data_dir": data_dir, "input.dataset": overrides.TINY_DATA,
      "input.raw_size": (40, 48), "eval.num_clips": 3, **changes})


def test_every_video_counted_once_when_the_batch_does_not_divide(data_dir):
  """16 training videos, global batch 24 over 8 devices: one padded batch."""
  config = _tiny(ucf101_retrieval.get_config("runlocal"), data_dir, batch_size=24)
  mean_pixel = lambda _, clips: jnp.mean(clips, axis=(1, 2, 3, 4))[:, None]
  out, labels = evaluate.clip_averaged(config, mean_pixel, {}, split="train")
  assert out.shape == (16, 1)
  # The same numbers from an evenly dividing batch on one device.
  with config.unlocked():
    config.batch_size = 8
  mesh_one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate.parallel, "data_mesh", lambda batch_size: mesh_one)
    out_one, labels_one = evaluate.clip_averaged(config, mean_pixel, {}, split="train")
  np.testing.assert_allclose(out, out_one, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(labels, labels_one)
  source = datasets.data_source(config, "train")
  np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(16)])


@pytest.fixture(scope="module")
def authors_checkpoint(tmp_path_factory):
  """A randomly initialised model of the authors' layout, saved with torch."""
  torch.manual_seed(0)
  model = cvc_model.TorchCVC(TorchVideoResNet("r2plus1d", (1, 1, 1, 1), width=8), dim=64,
                             concepts=8, sigma="mlp", sigma_dim=64, decoder_hidden=32,
                             proj_hidden=32, proj_dim=16, queue_size=32)
  path = str(tmp_path_factory.mktemp("torch") / "authors.pth")
  torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
  return path


def _torch_features(config, split, encoder, head=lambda pooled: pooled):
  """Clip-averaged head(features) of the PyTorch encoder on eval_views' clips."""
  from cvc_jax import views  # pylint: disable=g-import-not-at-top
  feats, labels = {}, {}
  for batch in input_pipeline.eval_batches(config, split=split,
                                           num_clips=config.eval.num_clips):
    clips = np.asarray(views.eval_views(batch["frames"], config, batch["sizes"]))
    b, n = clips.shape[:2]
    x = torch.from_numpy(clips.reshape((b * n,) + clips.shape[2:])).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
      pooled = head(encoder(x)[0]).numpy().reshape(b, n, -1).mean(axis=1)
    for i in np.flatnonzero(batch["mask"]):
      feats[int(batch["video_index"][i])] = pooled[i]
      labels[int(batch["video_index"][i])] = int(batch["label"][i])
  order = sorted(feats)
  return np.stack([feats[i] for i in order]), np.asarray([labels[i] for i in order])


def _authors_encoder(path):
  """The authors' encoder in PyTorch, with the checkpoint's weights."""
  encoder = TorchVideoResNet("r2plus1d", (1, 1, 1, 1), width=8).eval()
  state = torch.load(path, weights_only=True)
  encoder.load_state_dict({k[len("module.backbone."):]: v for k, v in state.items()
                           if k.startswith("module.backbone.")})
  return encoder


@pytest.mark.parametrize("protocol", ["", "coclr,"])
def test_retrieval_from_an_authors_checkpoint(tmp_path, data_dir, authors_checkpoint,
                                             monkeypatch, protocol):
  from cvc_jax.downstream import metrics  # pylint: disable=g-import-not-at-top
  config = _tiny(ucf101_retrieval.get_config(protocol + "runlocal"), data_dir,
                 init_from=authors_checkpoint, batch_size=8)
  got = {}  # the features and labels the run ranks by
  recall_of = metrics.retrieval_recall
  def spy(query_f, query_l, gallery_f, gallery_l, **kwargs):
    got.update(test=(np.asarray(query_f), np.asarray(query_l)),
               train=(np.asarray(gallery_f), np.asarray(gallery_l)))
    return recall_of(query_f, query_l, gallery_f, gallery_l, **kwargs)
  monkeypatch.setattr(evaluate.metrics, "retrieval_recall", spy)
  recall = evaluate.run_retrieval(config, str(tmp_path))
  # The same protocol with the authors' encoder run by PyTorch on the same clips:
  # the same clip-averaged features, so the same recall. CoCLR's: each clip's
  # features L2-normalised, each split's mean subtracted.
  encoder = _authors_encoder(authors_checkpoint)
  head = (lambda pooled: torch.nn.functional.normalize(pooled, dim=1)) if protocol else (
      lambda pooled: pooled)
  train_f, train_l = _torch_features(config, config.eval.train_split, encoder, head)
  test_f, test_l = _torch_features(config, config.eval.test_split, encoder, head)
  if protocol:
    train_f, test_f = train_f - train_f.mean(0), test_f - test_f.mean(0)
  for split, (f, l) in (("train", (train_f, train_l)), ("test", (test_f, test_l))):
    np.testing.assert_allclose(got[split][0], f, rtol=1e-4, atol=1e-5, err_msg=split)
    np.testing.assert_array_equal(got[split][1], l, err_msg=split)
  assert np.ptp(test_f, axis=0).max() > 1e-3  # the videos' features differ
  want = recall_of(test_f, test_l, train_f, train_l, ks=config.eval.recall_ks)
  assert recall == pytest.approx(want, abs=1e-6)
  assert recall["R@1"] < 1.0  # not a query finding itself
  with open(tmp_path / "results.json") as f:
    assert "PyTorch weights" in json.load(f)["init_from"]


@pytest.mark.parametrize("protocol", ["", "coclr,"])
def test_linear_probe_from_an_authors_checkpoint(tmp_path, data_dir, authors_checkpoint,
                                                 monkeypatch, protocol):
  from cvc_jax.models import exported  # pylint: disable=g-import-not-at-top
  config = _tiny(ucf101_linear.get_config(protocol + "runlocal"), data_dir,
                 init_from=authors_checkpoint, batch_size=8, num_epochs=2,
                 keep_checkpoints=4)
  kept = []  # the checkpoints the run keeps: config.keep_checkpoints
  manager_of = classify.checkpointing.checkpoint_manager

  def recording_manager(workdir, **kwargs):
    kept.append(kwargs["max_to_keep"])
    return manager_of(workdir, **kwargs)

  monkeypatch.setattr(classify.checkpointing, "checkpoint_manager", recording_manager)
  tested = {}  # the test set's clip-averaged probabilities, as the run scores them
  score = classify.metrics.classification_metrics
  def spy(probs, labels, names):
    tested.update(probs=np.asarray(probs), labels=np.asarray(labels))
    return score(probs, labels, names)
  monkeypatch.setattr(classify.metrics, "classification_metrics", spy)
  result = classify.train_and_evaluate(config, str(tmp_path))
  assert kept == [4]
  assert sum(map(sum, result["confusion"])) == 8  # every test video once
  for name in ("results.json", "results.md", "confusion.png"):
    assert os.path.exists(tmp_path / name), name

  # The last checkpoint: the encoder is still the authors' weights, BatchNorm
  # statistics included (frozen, in inference mode); only the head was trained.
  path, step = exported.latest_checkpoint(str(tmp_path), None)
  assert step == 4  # 16 training videos, batch 8, 2 epochs
  params, batch_stats, _ = exported.read_checkpoint(path)["state"]
  _, authors, _ = evaluate.load_encoder(config)
  jax.tree.map(np.testing.assert_array_equal,
               {"params": params["backbone"], "batch_stats": batch_stats["backbone"]},
               authors)

  # The test protocol run by PyTorch: the authors' encoder and the trained head on
  # the same clips, softmax averaged over each video's clips. CoCLR's head:
  # L2 normalisation, then a BatchNorm with the statistics the probe gathered.
  kernel, bias = (torch.from_numpy(np.asarray(params["fc"][k])) for k in ("kernel", "bias"))
  norm = lambda pooled: pooled
  if protocol:
    assert set(params) == {"backbone", "fc", "head_bn"}
    bn = torch.nn.BatchNorm1d(kernel.shape[0]).eval()
    bn.load_state_dict({
        "weight": torch.from_numpy(np.asarray(params["head_bn"]["scale"])),
        "bias": torch.from_numpy(np.asarray(params["head_bn"]["bias"])),
        "running_mean": torch.from_numpy(np.asarray(batch_stats["head_bn"]["mean"])),
        "running_var": torch.from_numpy(np.asarray(batch_stats["head_bn"]["var"])),
        "num_batches_tracked": torch.tensor(step)})
    assert np.abs(np.asarray(batch_stats["head_bn"]["mean"])).max() > 1e-3  # gathered
    norm = lambda pooled: bn(torch.nn.functional.normalize(pooled, dim=1))
  else:
    assert set(params) == {"backbone", "fc"}
  probs, labels = _torch_features(
      config, config.eval.test_split, _authors_encoder(authors_checkpoint),
      head=lambda pooled: torch.softmax(norm(pooled) @ kernel + bias, dim=-1))
  np.testing.assert_array_equal(tested["labels"], labels)
  np.testing.assert_allclose(tested["probs"], probs, atol=1e-5)
  assert np.ptp(probs, axis=0).max() > 1e-3  # the videos' scores differ


def test_the_coclr_variant_is_coclrs_evaluation():
  # CoCLR's code (which the authors' README says their evaluation follows):
  # its linear probe's and finetuning's heads and training augmentation, and
  # its retrieval features; SPEC 6's test clips either way.
  plain, coclr = ucf101_linear.get_config(), ucf101_linear.get_config("coclr")
  assert (coclr.model.head_l2_norm, coclr.model.head_batch_norm, coclr.model.dropout) == (
      True, True, 0.0)
  assert (plain.model.head_l2_norm, plain.model.head_batch_norm, plain.model.dropout) == (
      False, False, 0.5)
  assert (coclr.input.crop_area, coclr.input.jitter, coclr.input.jitter_prob,
          coclr.input.gray_prob) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.3, 0.0)
  assert coclr.eval.num_clips == plain.eval.num_clips == 10
  finetune = ucf101_finetune.get_config("coclr")
  assert (finetune.model.head_l2_norm, finetune.model.dropout) == (False, 0.9)
  assert ucf101_retrieval.get_config("coclr").eval.retrieval_features == "centred"
  assert ucf101_retrieval.get_config().eval.retrieval_features == "mean"
  with pytest.raises(ValueError, match="known: runlocal, coclr, backbone"):
    ucf101_linear.get_config("coclr2")
  # Variants of the pretraining model alone would change nothing downstream.
  for variant in ("sigma=mlp", "decoder=linear", "topk=2", "encoders=separate"):
    with pytest.raises(ValueError, match=f"'{variant.split('=')[0]}' changes pretraining only"):
      ucf101_linear.get_config(f"coclr,{variant}")
  assert ucf101_linear.get_config("backbone=r3d34").model.encoder.blocks == (3, 4, 6, 3)
  config = ucf101_retrieval.get_config()
  config.unlock().eval.retrieval_features = "centered"
  with pytest.raises(ValueError, match=r"retrieval_features must be one of \('mean', "
                                       r"'centred'\), got 'centered'"):
    evaluate.retrieval(config, None, None)


def test_the_encoder_computes_in_the_runs_dtype_and_remat():
  config = ucf101_linear.get_config("runlocal")
  with config.unlocked():
    config.dtype, config.remat = "bfloat16", "blocks"
  module, variables, described = evaluate.load_encoder(config)
  assert (module.dtype, module.remat, described) == (
      jnp.bfloat16, "blocks", "random initialisation")
  pooled, _ = module.apply(variables, jnp.zeros((1, 4, 32, 32, 3)), train=False)
  assert pooled.dtype == jnp.bfloat16
  assert evaluate.encoder_features(module)(variables, jnp.zeros((1, 4, 32, 32, 3))).dtype == (
      jnp.float32)
  with config.unlocked():
    config.dtype = "float16"
  with pytest.raises(ValueError, match="config.dtype must be one of"):
    evaluate.load_encoder(config)


def test_videos_skipped_at_build_time_are_counted(tmp_path, monkeypatch, caplog):
  from tfds_builders import video_io  # pylint: disable=g-import-not-at-top
  config = ucf101_linear.get_config("runlocal")
  monkeypatch.setattr(datasets, "ensure_built",
                      lambda config: types.SimpleNamespace(data_path=tmp_path))
  assert datasets.video_counts(config, ("train", "test")) == {}  # no manifest
  video_io.write_manifest(tmp_path, "train", 9, [])
  video_io.write_manifest(tmp_path, "test", 3, [("a/b.avi", "corrupt: x")])
  with caplog.at_level("WARNING"):
    counts = datasets.video_counts(config, ("train", "test"))
  assert counts == {"train": {"built": 9, "skipped": 0}, "test": {"built": 3, "skipped": 1}}
  assert "1 videos of the test split were skipped" in caplog.text


def test_linear_probe_updates_only_the_linear_layer():
  config = ucf101_linear.get_config("runlocal")
  params = {"backbone": {"kernel": jnp.ones(3)}, "fc": {"kernel": jnp.ones(2)}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  for linear, moves in ((True, False), (False, True)):
    tx = classify._optimizer(config, 10, linear=linear)  # pylint: disable=protected-access
    updates, _ = tx.update(grads, tx.init(params), params)
    assert bool(jnp.any(updates["backbone"]["kernel"] != 0)) == moves
    assert bool(jnp.all(updates["fc"]["kernel"] != 0))


def test_downstream_optimizer_follows_optim_name():
  # A zero gradient: torch-style Adam normalises the L2 term (a step of about
  # lr), AdamW adds lr * weight_decay * w after the moments.
  config = ucf101_linear.get_config("runlocal")
  params = {"backbone": {"kernel": jnp.ones(3)}, "fc": {"kernel": jnp.ones(2)}}
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  lr, decay = config.optim.lr, config.optim.weight_decay
  for name, step in (("adam", lr), ("adamw", lr * decay)):
    with config.unlocked():
      config.optim.name = name
    tx = classify._optimizer(config, 10, linear=False)  # pylint: disable=protected-access
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["fc"]["kernel"], -step, rtol=1e-3)
  with config.unlocked():
    config.optim.name = "sgd"
  with pytest.raises(ValueError, match="optim.name must be 'adam' or 'adamw', got 'sgd'"):
    classify._optimizer(config, 10, linear=False)  # pylint: disable=protected-access


def test_demo_compares_pretrained_and_random_on_both_labels(tmp_path, data_dir,
                                                           monkeypatch):
  """demo.compare on a pretraining workdir (a checkpoint saved as pretrain saves it)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from cvc_jax import pretrain  # pylint: disable=g-import-not-at-top
  from cvc_jax.downstream import demo  # pylint: disable=g-import-not-at-top
  config = _tiny(demo_config.get_config(), data_dir, batch_size=8)
  t, s = config.input.num_frames, config.input.crop_size
  rng = jax.random.key(config.seed)  # as pretraining starts
  state = pretrain.init_train_state(config, rng, (8, 6, t, s, s, 3), 2)
  # The baseline is bitwise the encoder pretraining starts from (op by op, 20
  # convolution kernels of the demo's came out 1 ulp apart).
  initial = demo.initial_encoder(config)
  jax.tree.map(np.testing.assert_array_equal, initial,
               {"params": state.params["backbone"],
                "batch_stats": state.batch_stats["backbone"]})
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())

  def save(step, state):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
      manager.save(step, args=ocp.args.StandardSave(pretrain._checkpoint_tree(state, rng)))  # pylint: disable=protected-access

  save(0, state)
  table = demo.compare(config, workdir)
  rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
  assert len(rows) == 4  # {pretrained, random} x {static, dynamic}
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert set(results) == {f"{e}/{l}" for e in ("pretrained", "random init")
                          for l in ("label_static", "label_dynamic")}
  # A checkpoint of step 0 is the baseline itself: the random encoder is the
  # initialisation the pretraining started from.
  for label in ("label_static", "label_dynamic"):
    assert results[f"pretrained/{label}"] == results[f"random init/{label}"]

  # A later checkpoint with other encoder weights: its rows move, the baseline's
  # do not (so "pretrained" does read the checkpoint).
  leaves, tree = jax.tree_util.tree_flatten(state.params["backbone"])
  noisy = [x + 0.5 * x.std() * jax.random.normal(jax.random.key(i), x.shape)
           for i, x in enumerate(leaves)]
  moved = state.replace(params=dict(state.params,
                                    backbone=jax.tree_util.tree_unflatten(tree, noisy)))
  save(1, moved)
  evaluated = []  # the encoder variables each row's features came from
  features = evaluate.features
  def spy(config, module, variables, **kwargs):
    evaluated.append(variables)
    return features(config, module, variables, **kwargs)
  monkeypatch.setattr(demo.evaluate, "features", spy)
  demo.compare(config, workdir)
  with open(tmp_path / "results.json") as f:
    later = json.load(f)
  assert len(evaluated) == 4  # {pretrained, random init} x {train, test}
  for variables, want in zip(evaluated, 2 * [moved] + 2 * [state]):
    jax.tree.map(np.testing.assert_array_equal, variables,
                 {"params": want.params["backbone"],
                  "batch_stats": want.batch_stats["backbone"]})
  for label in ("label_static", "label_dynamic"):
    assert later[f"random init/{label}"] == results[f"random init/{label}"]
    assert later[f"pretrained/{label}"] != results[f"pretrained/{label}"]


def test_finetune_resumes_where_an_uninterrupted_run_ends(tmp_path, data_dir):
  """Finetune 2 epochs at once, or 1 epoch and then the same command for 2."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs.eval import ucf101_finetune  # pylint: disable=g-import-not-at-top

  def run(workdir, num_epochs):
    config = _tiny(ucf101_finetune.get_config("runlocal"), data_dir, batch_size=8,
                   num_epochs=num_epochs, checkpoint_every_steps=100)
    return classify.train_and_evaluate(config, str(workdir))

  whole = run(tmp_path / "whole", 2)
  run(tmp_path / "parts", 1)
  assert max(map(int, os.listdir(tmp_path / "parts" / "checkpoints"))) == 2  # 16 / 8
  parts = run(tmp_path / "parts", 2)
  restore = lambda d: ocp.StandardCheckpointer().restore(
      str(tmp_path / d / "checkpoints" / "4" / "default"))
  leaves = zip(jax.tree_util.tree_leaves(restore("whole")),
                    jax.tree_util.tree_leaves(restore("parts")))
  for a, b in leaves:
    np.testing.assert_array_equal(a, b)
  assert whole == parts

  # The workdir's checkpoints are another run's once the mode, init_from or data
  # set differ: refused by name (shapes alone would let a run resume them).
  with open(tmp_path / "parts" / "config.json") as f:
    written = f.read()
  linear = _tiny(ucf101_linear.get_config("runlocal"), data_dir, batch_size=8)
  with pytest.raises(ValueError, match="another run .mode 'finetune' there, 'linear' here"):
    classify.train_and_evaluate(linear, str(tmp_path / "parts"))
  with open(tmp_path / "parts" / "config.json") as f:
    assert f.read() == written
  moved = _tiny(ucf101_finetune.get_config("runlocal"), data_dir, init_from="/other/run")
  with pytest.raises(ValueError, match="init_from '' there, '/other/run' here"):
    classify._check_same_run(moved, str(tmp_path / "parts"))  # pylint: disable=protected-access
