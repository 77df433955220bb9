"""Concept attention pictures: the attention is the model's own, its geometry
(feature-map position -> pixel, clip -> frame) is right, and the pictures show a
concept following a moving object.

The done-when criterion ("the attention mass of the top dynamic concept lies
mostly on the object") is checked on a trained checkpoint committed as
tests/data/motion_concepts.{npz,json}: the demo pretrained at 64 px crops
(`python -m cvc_jax.main --config=configs/demo.py --config.input.crop_size=64`,
seed 0, 12 min 59 s on 2 CPU cores, dynamic probe 93.0 vs 50.0 for its
initialisation), cut to what the visualiser reads by `python
benchmarks/attention_on_object.py --init_from=WORKDIR
--write_fixture=tests/data/motion_concepts`. An 8-frame clip through
R(2+1)D-18 has one attention map in time, and the object moves 3-5 pixels a
frame, so a frame's picture shows where the concept looked while the object
crossed the clip's frames: the test measures the mass on that path (0.757 of it
over the 12 moving test videos, where the path covers 0.444 of the frame) and on
the box of the frame itself (0.391, box 0.208), against its own initialisation,
which has no preference. The Quick start's 32 px checkpoint (3.8 min) gets only
0.444 on a path of 0.444, so no checkpoint trained within test time would do.
A second test plants a concept whose attention is known to follow the object
(at each feature-map position, the clip's distance from its mean colour around
that position) and checks the drawing's geometry frame by frame:
0.64 to 0.88 of its mass on the frame's box, 0.27 at most for a flipped or
time-shifted box.
"""
import functools
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import ml_collections

from benchmarks import attention_on_object
from cvc_jax import concepts
from cvc_jax import models
from cvc_jax import pretrain
from cvc_jax import sampling
from cvc_jax import visualize
from cvc_jax.models import heads
from cvc_jax.models import resnet3d
from tests.test_export import _workdir
from tests.test_export import write_workdir
from tfds_builders.synthetic_motion import synthetic_motion_dataset_builder as motion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOVING_VIDEOS = (11, 9, 15)  # synthetic_motion test videos: horizontal, up, down


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("pretrain"))
  _workdir(path)
  return path


def _mass(maps, masks):
  """Mean over frames of the share of each frame's map inside its mask."""
  return float(np.mean((maps * masks).sum((1, 2)) / maps.sum((1, 2))))


def test_attention_is_the_modules_own(workdir):
  """The attention rebuilt from lit's queries and keys reproduces lit's output."""
  config, paths, variables = concepts.load(workdir)
  clips = jax.random.normal(jax.random.key(0), (2, 4, 48, 64, 3))
  lit = variables["params"]["lit"]
  for kind, model in paths.items():
    (_, local), state = model.apply(variables, clips, capture_intermediates=True,
                                    mutable=["intermediates"])
    _, attn = concepts.concept_attention(model, variables, clips)
    assert attn.shape[1:4] == (1, 3, 4)
    attn = attn.reshape((2, -1, attn.shape[-1]))  # back to token order
    np.testing.assert_allclose(attn.sum(1), 1.0, rtol=1e-5)
    values = state["intermediates"]["lit"]["project_v"]["__call__"][0]
    k = config.model.num_concepts
    proto = variables["params"][{"v": "prototype", "s": "prototype_s",
                                 "d": "prototype_d"}[kind]]["kernel"].T
    templates = {"v": proto, "s": proto[:k], "d": proto[k:]}[kind]
    t = jnp.einsum("bnd,bnc->bcd", values, attn) + templates
    h = heads.LayerNorm().apply({"params": lit["norm_mlp"]}, t)
    h = flax.linen.Dense(32).apply({"params": lit["mlp_0"]}, h)
    h = flax.linen.Dense(64).apply({"params": lit["mlp_2"]}, jax.nn.relu(h))
    np.testing.assert_allclose(t + h, local, rtol=1e-4, atol=1e-5, err_msg=kind)


def test_video_attention_compiles_once_per_path(workdir):
  """Videos of one size, and a last batch shorter than the rest, reuse one
  compiled forward pass, and the padding of that batch changes no output."""
  config, paths, variables = concepts.load(workdir)
  model = paths["d"]
  frames = np.random.default_rng(0).integers(0, 256, (7, 24, 32, 3), np.uint8)
  kw = dict(short_side=32)
  whole = concepts.video_attention(model, variables, config, frames, batch_size=8, **kw)
  run = concepts._compiled_attention(model)  # pylint: disable=protected-access
  compiled = run._cache_size()  # pylint: disable=protected-access
  # 4 clips of 4 frames in batches of 3: 3, then 1 padded to 3; then a second video.
  batched = concepts.video_attention(model, variables, config, frames, batch_size=3, **kw)
  concepts.video_attention(model, variables, config, frames[::-1], batch_size=3, **kw)
  assert concepts._compiled_attention(model) is run  # pylint: disable=protected-access
  assert run._cache_size() == compiled + 1  # pylint: disable=protected-access
  for got, want in zip(batched, whole):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_feature_map_position_i_is_centred_on_input_s_times_i():
  """What `_resample` assumes, on the encoder: the receptive field of position
  (t, i, j) of the last feature map is centred on input (8t, 16i, 16j)."""
  module = resnet3d.build_encoder(dict(arch="r2plus1d", blocks=(1, 1, 1, 1), width=8))
  # Compiled, and shapes by eval_shape: op by op this test took 24-38 s of the suite.
  variables = models.jit_init(functools.partial(module.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 4, 32, 32, 3)))
  for shape, position in (((1, 4, 128, 160, 3), (0, 4, 5)),
                          ((1, 64, 16, 16, 3), (4, 0, 0))):
    fmap = lambda x: module.apply(variables, x, train=False)[1]
    assert jax.eval_shape(fmap, jax.ShapeDtypeStruct(shape, jnp.float32)).shape[1:4] == tuple(
        -(-n // s) for n, s in zip(shape[1:4], (8, 16, 16)))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fmap(x)[(0,) + position])))(
        jax.random.normal(jax.random.key(1), shape))
    support = np.abs(np.asarray(grad)[0]).sum(-1) > 0  # [T, H, W]
    for axis, (stride, index) in enumerate(zip((8, 16, 16), position)):
      n = shape[1 + axis]
      if -(-n // stride) == 1:
        continue  # one position: nothing to place
      hit = np.flatnonzero(support.any(tuple(a for a in range(3) if a != axis)))
      assert hit[0] > 0 and hit[-1] < n - 1, "receptive field clipped: enlarge input"
      assert (hit[0] + hit[-1]) / 2 == stride * index, (axis, hit[0], hit[-1])


def test_resample_and_clip_choice():
  # No resize: pixel 16 i sits exactly on position i; between, linear.
  w = concepts._resample(64, 64, 4)  # pylint: disable=protected-access
  np.testing.assert_allclose(w[[0, 16, 32, 48]], np.eye(4))
  np.testing.assert_allclose(w[8], [0.5, 0.5, 0, 0])
  np.testing.assert_allclose(w[63], [0, 0, 0, 1])  # clamped past the last centre
  np.testing.assert_allclose(w.sum(1), 1.0)
  # Frame pixel p is at (p + 0.5) 128 / 40 - 0.5 of a 128-pixel model input.
  w = concepts._resample(40, 128, 8)  # pylint: disable=protected-access
  np.testing.assert_allclose(w[5] @ np.arange(8), ((5 + 0.5) * 128 / 40 - 0.5) / 16)
  # Each frame is shown by the clip centred nearest it, at its place in it.
  config = ml_collections.ConfigDict(
      dict(input=dict(num_frames=4, diff_wrap=True)))
  x = jnp.arange(10.0)[:, None, None, None] * jnp.ones((10, 2, 2, 3))
  clips, chosen, offset = concepts.view_clips(x, "v", config)
  assert clips.shape == (7, 4, 2, 2, 3)
  np.testing.assert_array_equal(clips[chosen, offset][:, 0, 0, 0], np.arange(10))
  assert all(abs(o - 1.5) <= 0.5 for o in offset[2:-2])  # centred away from the ends
  d, _, _ = concepts.view_clips(x, "d", config)
  np.testing.assert_allclose(d[0, :, 0, 0, 0], [0 - 3, 1, 1, 1])  # wraps, as pretraining
  s, chosen, offset = concepts.view_clips(x, "s", config)
  np.testing.assert_allclose(s[:, :, 0, 0, 0], np.repeat(np.arange(10.0)[:, None], 4, 1))
  # A video shorter than a clip is stretched over one clip, as evaluation
  # stretches it, each frame placed at the middle of its repeats.
  config.input.num_frames = 8
  clips, chosen, offset = concepts.view_clips(x[:3], "v", config)
  stretched = sampling.eval_clip_indices(3, num_clips=1, clip_length=8)
  np.testing.assert_array_equal(stretched, [[0, 0, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(clips[:, :, 0, 0, 0], stretched)
  assert concepts.frame_clips(3, 8)[0].tolist() == [0]
  np.testing.assert_array_equal(chosen, [0, 0, 0])
  np.testing.assert_array_equal(offset, [0, 2, 5])


def _planted_attention(real):
  """A planted concept that looks at the object: attention at each feature-map
  position is the clip's mean distance from its frames' mean colour over the
  window of the position's stride centred on it, to the 4th power, normalised."""

  def attention(model, variables, clips):
    codes, attn = real(model, variables, clips)
    b, _, h, w, _ = clips.shape
    _, _, gh, gw, _ = attn.shape
    sy, sx = concepts._stride(h, gh), concepts._stride(w, gw)  # pylint: disable=protected-access
    salient = jnp.abs(clips - jnp.mean(clips, axis=(2, 3), keepdims=True))
    energy = jnp.pad(jnp.mean(salient, axis=(1, 4)),
                     ((0, 0), (sy // 2, sy * gh - h + sy), (sx // 2, sx * gw - w + sx)))
    pooled = energy[:, :sy * gh, :sx * gw].reshape(b, gh, sy, gw, sx).mean((2, 4))
    planted = pooled**4 / jnp.sum(pooled**4, axis=(1, 2), keepdims=True)
    return codes, jnp.broadcast_to(planted[:, None, :, :, None], attn.shape)

  return attention


@pytest.mark.parametrize("index", MOVING_VIDEOS)
def test_a_concept_that_follows_motion_is_drawn_on_the_moving_object(
    tmp_path, workdir, monkeypatch, index):
  monkeypatch.setattr(concepts, "concept_attention",
                      _planted_attention(concepts.concept_attention))
  video = motion.make_video("test", index)
  np.save(tmp_path / "video.npy", video["video"])
  drawn = visualize.visualize(workdir, str(tmp_path / "video.npy"), str(tmp_path / "out"),
                              num_concepts=2, path="rgb")
  frames = video["video"]
  masks = attention_on_object.box_masks(video["object_box"], *frames.shape[1:3])
  with np.load(tmp_path / "out" / "attention.npz") as saved:
    maps = saved["dynamic_maps"][..., 0]  # the most active dynamic concept
    np.testing.assert_array_equal(saved["frames"], frames)
  np.testing.assert_array_equal(maps, drawn["dynamic"][2][..., 0])
  area = float(masks.mean())
  mass = _mass(maps, masks)
  assert mass > 0.5 and mass >= 3 * area, (mass, area)
  # The check has teeth: the same maps against the box in a flipped frame or
  # 5 frames (15 to 25 pixels) earlier or later fall far short, wherever that
  # box lies mostly elsewhere (each video has at least two such controls).
  controls = [w for w in (masks[:, ::-1], masks[:, :, ::-1], np.roll(masks, 5, axis=0),
                          np.roll(masks, -5, axis=0))
              if (w & masks).sum() < 0.3 * masks.sum()]
  assert len(controls) >= 2
  for wrong in controls:
    assert _mass(maps, wrong) < mass / 2, (_mass(maps, wrong), mass)


def _committed_checkpoint() -> tuple[dict, dict]:
  """The config and variables of tests/data/motion_concepts (module docstring)."""
  data = os.path.join(ROOT, "tests", "data", "motion_concepts")
  tree = {}
  with np.load(data + ".npz") as flat:
    for key in flat.files:
      *parents, leaf = key.split("/")
      node = tree
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = flat[key]
  with open(data + ".json") as f:
    return json.load(f), tree


def test_top_dynamic_concept_of_a_trained_checkpoint_lies_on_the_moving_object(
    tmp_path):
  config, variables = _committed_checkpoint()
  r = attention_on_object.measure(
      write_workdir(str(tmp_path / "trained"), json.dumps(config), variables, step=384),
      videos=8)
  assert r["videos"] == 4  # test videos 3, 5, 6, 7
  # Mostly on the object's path over the clip, in every video, and far more
  # than a map with no preference would put there (measured: 0.727, each video
  # 0.69-0.77, on paths of 0.437; boxes: 0.383 on 0.208).
  assert r["path_share"] > 0.6 and r["path_shares"].min() > 0.5, r
  assert r["path_share"] > 1.5 * r["path_area"], r
  # At the frame itself the box gets well over its share of the frame too.
  assert r["box_share"] > 1.5 * r["box_area"], r
  # Pretraining made it: the same model at its own initialisation (the run's
  # seed) has no preference (measured: 0.488 on the path, 0.214 on the box).
  c = ml_collections.ConfigDict(config)
  s, t = c.input.crop_size, c.input.num_frames
  init = models.jit_init(lambda rng: pretrain.initial_variables(
      c, rng, (1, 6, t, s, s, 3)))(jax.random.key(c.seed))
  r0 = attention_on_object.measure(
      write_workdir(str(tmp_path / "init"), json.dumps(config), dict(init), step=0),
      videos=8)
  assert r0["path_share"] < 1.2 * r0["path_area"], r0
  assert r0["box_share"] < 1.2 * r0["box_area"], r0


_FRESH = r"""
import sys
from cvc_jax import visualize
drawn = visualize.visualize(sys.argv[1], sys.argv[2], sys.argv[3], num_concepts=2)
print("IMPORTED", " ".join(sorted(sys.modules)))
"""


def test_pictures_of_a_checkpoint_without_tensorflow(tmp_path, workdir):
  """The real model end to end in a fresh process: valid PNG and GIF, no TF."""
  frames = motion.make_video("test", MOVING_VIDEOS[0])["video"][:12]
  np.save(tmp_path / "video.npy", frames)
  out = tmp_path / "out"
  run = subprocess.run([sys.executable, "-c", _FRESH, workdir, str(tmp_path / "video.npy"),
                        str(out)], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  imported = run.stdout.split("IMPORTED", 1)[1].split()
  assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
  with Image.open(out / "concepts.png") as png:
    png.verify()
  with Image.open(out / "concepts.png") as png:
    # 8 rows of 40-pixel frames enlarged x3, 5 columns (frame + 2 + 2 concepts).
    assert png.format == "PNG" and png.width == 5 * (144 + 2)
  with Image.open(out / "concepts.gif") as gif:
    assert gif.format == "GIF" and gif.n_frames == len(frames)
  with np.load(out / "attention.npz") as saved:
    for kind in ("static", "dynamic"):
      maps = saved[f"{kind}_maps"]
      assert maps.shape == frames.shape[:3] + (2,) and np.isfinite(maps).all()
      assert (maps >= 0).all() and (maps.sum((1, 2)) > 0).all()
      codes = saved[f"{kind}_codes"].mean(0)
      assert codes[0] >= codes[1]  # most active first


_COUNTING_LOADS = r"""
import runpy
import sys
from cvc_jax import concepts
calls, load = [], concepts.load
concepts.load = lambda *args: calls.append(args) or load(*args)
sys.argv[0] = "visualize"
try:
  runpy.run_module("cvc_jax.visualize", run_name="__main__")
finally:
  print("LOADS", len(calls))
"""


def test_concept_usage_histogram_over_a_data_set(tmp_path, workdir):
  """With --video too: both from one read of the checkpoint."""
  out = tmp_path / "out"
  np.save(tmp_path / "video.npy", motion.make_video("test", MOVING_VIDEOS[0])["video"][:8])
  run = subprocess.run(
      [sys.executable, "-c", _COUNTING_LOADS, f"--init_from={workdir}",
       f"--out={out}", "--dataset=synthetic_motion/tiny", f"--data_dir={tmp_path}/tfds",
       "--num_clips=2", f"--video={tmp_path / 'video.npy'}", "--num_concepts=1"],
      cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  assert re.search(r"^LOADS 1$", run.stdout, re.M) and (out / "concepts.png").exists(), (
      run.stdout)
  with open(out / "histogram.json") as f:
    usage = json.load(f)
  share = np.asarray(usage["top_share"])
  assert usage["num_videos"] == 8 and share.shape == (16,)
  np.testing.assert_allclose([share[:8].sum(), share[8:].sum()], [1.0, 1.0])
  with Image.open(out / "histogram.png") as png:
    assert png.format == "PNG"


def test_an_unknown_path_is_named_before_any_work(workdir):
  loaded = concepts.load(workdir)
  frames = np.zeros((4, 32, 32, 3), np.uint8)
  match = r"path must be one of \('kinds', 'rgb'\), got 'RGB'"
  with pytest.raises(ValueError, match=match):
    concepts.concepts_of(*loaded, frames, path="RGB")
  with pytest.raises(ValueError, match=match):  # no such data set is ever read
    concepts.concept_usage(*loaded, dataset="nothing/here", split="test", path="RGB")
  with pytest.raises(ValueError, match=match):  # nor such a video
    visualize.draw(*loaded, "no/such/video.mp4", "unused", path="RGB")


def test_video_files_are_decoded_as_the_builders_decode_them(tmp_path, monkeypatch):
  import av  # pylint: disable=g-import-not-at-top
  frames = motion.make_video("test", MOVING_VIDEOS[0])["video"][:10]
  with av.open(str(tmp_path / "video.mp4"), "w") as container:
    stream = container.add_stream("mpeg4", rate=25)
    stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
    stream.bit_rate = 4_000_000
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  from tfds_builders import video_io  # pylint: disable=g-import-not-at-top
  saved = []  # the frames JPEG-encoded: only the 8 kept
  real_save = Image.Image.save

  def counting_save(image, *args, **kwargs):
    saved.append(image.size)
    return real_save(image, *args, **kwargs)

  monkeypatch.setattr(Image.Image, "save", counting_save)
  got = visualize.read_video(str(tmp_path / "video.mp4"), max_frames=8)
  assert got.shape == (8, 40, 48, 3) and got.dtype == np.uint8 and len(saved) == 8
  assert len(visualize.read_video(str(tmp_path / "video.mp4"))) == 10
  # Lossy codec and JPEG (7.3 grey levels off on average here), frame by frame:
  # each decoded frame is nearest its own source frame, and no colour shifts.
  errors = np.abs(got[:, None].astype(float) - frames[None]).mean(axis=(2, 3, 4))
  np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(8))
  assert errors[np.arange(8), np.arange(8)].max() < 9
  assert np.abs((got.astype(float) - frames[:8]).mean(axis=(0, 1, 2))).max() < 3
  np.save(tmp_path / "video.npy", frames)
  np.testing.assert_array_equal(visualize.read_video(str(tmp_path / "video.npy"), 8),
                                frames[:8])
  with pytest.raises(video_io.VideoError, match="gone.mp4: missing: no such file"):
    visualize.read_video(str(tmp_path / "gone.mp4"))
  for path in ("video.mp4", "video.npy"):
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
      visualize.read_video(str(tmp_path / path), max_frames=0)
