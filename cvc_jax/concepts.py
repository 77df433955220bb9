"""The concepts a pretrained model finds in a video: codes and attention maps.

For a video and a pretraining checkpoint this runs the paths of the model that
compute concepts (SPEC 3): encoder -> sigma -> code c = z C^T (2K cosine
scores, static concepts first) and the local concept aggregation, whose queries
are prototype rows and whose keys are the T'H'W' positions of the encoder's
last feature map. Its attention (softmax over the concepts, then each concept's
weights renormalised over the positions) is, for every concept, a map over the
feature map; `video_attention` resamples it to every frame of the video
(`_resample`). Static concepts are read on still frames (each frame repeated,
the s view: static rows of C_s) and dynamic concepts on frame differences (the
d view: dynamic rows of C_d), the views each kind is learnt from, or both on
the RGB clips (all rows of C_v). `concept_usage` counts, over a data set, how
often each concept is the most active of its kind. `cvc_jax.visualize` draws
them.
"""

import dataclasses
import functools
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cvc_jax import sampling
from cvc_jax import views
from cvc_jax.models import cvc
from cvc_jax.models import exported
from cvc_jax.models import heads
from cvc_jax.models import resnet3d


class ViewConcepts(cvc.CVCModel):
  """One kind of view's path through `CVCModel`, alone and in eval mode.

  `kind` 'v' is the RGB path (templates: all 2K rows of C_v), 's' the static
  path (static rows of C_s), 'd' the frame-difference path (dynamic rows of
  C_d), as in SPEC 3. Submodules carry CVCModel's names (backbone, fv,
  prototype, lit, ...), so a pretraining checkpoint's variables apply unchanged.
  """
  kind: str = "v"

  @nn.compact
  def __call__(self, clips, *, train: bool = False):
    """clips [B, T, H, W, 3] -> (codes [B, 2K], local features [B, C, dim]).

    The attention's queries and keys are captured as intermediates
    (`concept_attention`).
    """
    del train  # always inference: running BatchNorm statistics
    i = "vsd".index(self.kind)
    encoder = cvc.ENCODERS[i] if self.separate_encoders else cvc.ENCODERS[0]
    pooled, fmap = resnet3d.build_encoder(self.encoder, self.dtype, encoder)(
        clips, train=False)
    concept_codes, templates = self._concept_head(i, train=False)
    codes = concept_codes(pooled)
    tokens = fmap.reshape((fmap.shape[0], -1, fmap.shape[-1]))
    return codes.astype(jnp.float32), self._local_concepts()(tokens, templates())


def load(workdir: str, step: int | None = None):
  """(config, {kind: ViewConcepts}, variables) of a pretraining checkpoint.

  The prototype rows are L2-normalised, as the train step does before every
  forward pass.
  """
  config_dict, variables, step = exported.read_workdir(workdir, step=step)
  config = ml_collections.ConfigDict(config_dict)
  variables = dict(variables, params=cvc.normalize_prototypes(variables["params"]))
  logging.info("Concepts of %s, step %d.", workdir, step)
  return config, view_paths(cvc.build_model(config)), variables


def view_paths(model: cvc.CVCModel) -> dict[str, ViewConcepts]:
  """{kind: ViewConcepts} of a pretraining model, for 'v', 's' and 'd'."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return {kind: ViewConcepts(kind=kind, **fields) for kind in "vsd"}


def concept_attention(model: ViewConcepts, variables, clips):
  """Codes and attention maps of a path's concepts for a batch of clips.

  Args:
    model: one kind of view's path.
    variables: its {'params', 'batch_stats'}.
    clips: float32 [B, T, H, W, 3], that kind's view, normalised.

  Returns:
    (codes [B, 2K], attention [B, T', H', W', C] over the path's C templates;
    for each template it sums to 1 over the T'H'W' positions).
  """
  (codes, _), state = model.apply(
      variables, clips, capture_intermediates=lambda m, _: m.name in (
          "project_q", "project_k") or m.name in cvc.ENCODERS, mutable=["intermediates"])
  inter = state["intermediates"]
  q = inter["lit"]["project_q"]["__call__"][0]  # [B, C, dim]
  k = inter["lit"]["project_k"]["__call__"][0]  # [B, N, dim]
  fmap = next(inter[e]["__call__"][0][1] for e in cvc.ENCODERS if e in inter)
  attn = heads.concept_attention(q, k, model.concept_dim)  # the module's own
  return codes, attn.reshape(fmap.shape[:4] + (attn.shape[-1],))


def _stride(in_size: int, out_size: int) -> int:
  """The power of two s with ceil(in / s) == out: a stack of stride-2 stages."""
  s = 1
  while -(-in_size // s) > out_size:
    s *= 2
  if -(-in_size // s) != out_size:
    raise ValueError(f"A feature map of {out_size} over {in_size} inputs is not a "
                     "stack of stride-2 stages.")
  return s


def _resample(out_size: int, model_size: int, grid_size: int) -> np.ndarray:
  """[out_size, grid_size] linear weights from feature-map positions to pixels.

  Pixel p of the frame (centre p + 0.5) is at q = (p + 0.5) model_size /
  out_size - 0.5 in the model's input (the half-pixel resize of `_model_input`).
  A stride-2 convolution with padding k // 2 centres output j on input 2j, so
  position i of a map with total stride s is centred on input s i: pixel p
  reads position q / s, linearly interpolated, clamped at the border positions.
  """
  s = _stride(model_size, grid_size)
  q = (np.arange(out_size) + 0.5) * model_size / out_size - 0.5
  u = np.clip(q / s, 0, grid_size - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, grid_size - 1)
  w = np.zeros((out_size, grid_size), np.float32)
  np.add.at(w, (np.arange(out_size), lo), 1 - (u - lo))
  np.add.at(w, (np.arange(out_size), hi), u - lo)
  return w


def default_short_side(config) -> int:
  """The training crop, or more: at least 8 feature-map positions across."""
  return max(config.input.crop_size, 128)


def _model_input(frames: np.ndarray, config, short_side: int) -> jax.Array:
  """uint8 [N, H, W, 3] -> normalised float32 [N, h, w, 3], short side resized."""
  n, h, w, _ = frames.shape
  scale = short_side / min(h, w)
  size = (max(1, round(h * scale)), max(1, round(w * scale)))
  x = jax.image.resize(jnp.asarray(frames, jnp.float32) / 255.0, (n, *size, 3),
                       "linear", antialias=True)
  return views.normalize(x, config)


def clip_starts(num_frames: int, clip_length: int, stride: int) -> np.ndarray:
  """Starts of clips every `stride` frames, the last one ending at the last frame."""
  last = max(num_frames - clip_length, 0)
  return np.unique(np.append(np.arange(0, last + 1, max(stride, 1)), last))


def view_clips(x: jax.Array, kind: str, config, stride: int = 1):
  """One kind of view's clips over a video, and which clip shows each frame.

  v: clips of T consecutive frames every `stride` frames, each frame shown by
  the clip centred nearest it (a video shorter than T is one clip, stretched
  over T frames as evaluation and supervised training stretch it, each frame at
  the middle of its repeats); d: the same clips' frame differences (SPEC 1,
  `input.diff_wrap` as in pretraining); s: each frame repeated T times, a still
  clip per frame.

  Args:
    x: normalised frames [N, h, w, 3].
    kind: 'v', 's' or 'd'.
    config: reads input.num_frames and input.diff_wrap.
    stride: frames between clip starts (v and d).

  Returns:
    (clips [M, T, h, w, 3], clip of each frame int [N], the frame's time in that
    clip int [N]).
  """
  n, t = x.shape[0], config.input.num_frames
  if kind == "s":
    return (jnp.broadcast_to(x[:, None], (n, t) + x.shape[1:]), np.arange(n),
            np.full(n, (t - 1) // 2))
  if n < t:
    index = sampling.eval_clip_indices(n, num_clips=1, clip_length=t)
    chosen = np.zeros(n, np.int64)
    offset = np.array([np.flatnonzero(index[0] == i).mean() for i in range(n)])
    offset = np.floor(offset).astype(np.int64)
  else:
    starts, chosen = frame_clips(n, t, stride)
    index, offset = starts[:, None] + np.arange(t), np.arange(n) - starts[chosen]
  clips = x[index]
  if kind == "d":
    clips = views.frame_differences(clips, config)
  return clips, chosen, offset


def frame_clips(num_frames: int, clip_length: int, stride: int = 1):
  """(clip starts [M], the clip that shows each frame [N]) of `view_clips`' v and
  d clips: every `stride` frames, each frame shown by the clip centred nearest it.
  A video shorter than a clip is one clip (start 0) showing all its frames.

  Where the encoder's temporal stride spans the clip (8 frames through
  R(2+1)D-18: one step of the map in time), one map serves all its frames: frame
  i's picture shows where the concept looked over frames starts[chosen[i]] to
  starts[chosen[i]] + clip_length - 1 (or the last frame).
  """
  starts = clip_starts(num_frames, clip_length, stride)
  centres = starts + (clip_length - 1) / 2
  chosen = np.argmin(np.abs(centres[None, :] - np.arange(num_frames)[:, None]), axis=1)
  return starts, chosen


# Jitted `concept_attention` per path, kept across videos. Keyed by id (a Flax
# module holding the config's dicts cannot be hashed), with the module kept alive
# in the entry so its id cannot be reused.
_COMPILED: dict[int, tuple[Any, Any]] = {}
_MAX_COMPILED = 16


def _compiled_attention(model: ViewConcepts):
  """jax.jit of `concept_attention` for `model`, the same one on every call."""
  entry = _COMPILED.get(id(model))
  if entry is None:
    entry = (model, jax.jit(lambda v, c: concept_attention(model, v, c)))
    if len(_COMPILED) >= _MAX_COMPILED:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[id(model)] = entry
  return entry[1]


def video_attention(model: ViewConcepts, variables, config, frames: np.ndarray, *,
                    short_side: int | None = None, stride: int = 1,
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Per-frame codes and attention maps of one path, at the frames' resolution.

  Args:
    model: the path (`load(...)[1][kind]`).
    variables: the checkpoint's variables.
    config: the run's config (clip length, mean, std).
    frames: uint8 [N, H, W, 3]. The whole frame is used, not a crop.
    short_side: the model input's short side; default `default_short_side`.
    stride: frames between clip starts (see `view_clips`).
    batch_size: clips per forward pass.

  Returns:
    (codes [N, 2K] of each frame's clip, attention float32 [N, H, W, C] of the
    path's C templates, each map its clip's distribution over the feature-map
    positions resampled to the pixels: in time at the frame's place in the clip,
    in space as `_resample` says).
  """
  x = _model_input(frames, config, short_side or default_short_side(config))
  return _attention_at(model, variables, config, x, frames.shape[1:3], stride, batch_size)


def _attention_at(model: ViewConcepts, variables, config, x: jax.Array,
                  frame_size: tuple[int, int], stride: int, batch_size: int):
  """`video_attention` from the model input `x` (`_model_input`), at `frame_size`."""
  (h, w), t = frame_size, config.input.num_frames
  clips, chosen, offset = view_clips(x, model.kind, config, stride)
  run = _compiled_attention(model)
  codes, attn = [], []
  for i in range(0, len(clips), batch_size):
    batch = clips[i:i + batch_size]
    # Every forward pass at one shape: the last batch padded with its last clip
    # (eval-mode BatchNorm, so the padding changes no other clip's output).
    pad = min(batch_size, len(clips)) - len(batch)
    c, a = run(variables, jnp.concatenate([batch] + [batch[-1:]] * pad))
    codes.append(np.asarray(c)[:len(batch)])
    attn.append(np.asarray(a)[:len(batch)])
  codes, attn = np.concatenate(codes), np.concatenate(attn)  # [M, 2K], [M, T', H', W', C]
  rt = _resample(t, t, attn.shape[1])[offset]  # [N, T']
  ry = _resample(h, x.shape[1], attn.shape[2])
  rx = _resample(w, x.shape[2], attn.shape[3])
  per_frame = np.einsum("nt,nthwc->nhwc", rt, attn[chosen])
  return codes[chosen], np.einsum("yh,nhwc,xw->nyxc", ry, per_frame, rx)


# Which paths concepts are read on: 'kinds', each kind on the view it is learnt
# from (static on stills, dynamic on frame differences), or 'rgb', both on the
# RGB clips.
PATHS = ("kinds", "rgb")


def check_path(path: str) -> None:
  """Raises ValueError, naming `PATHS`, unless `path` is one of them."""
  if path not in PATHS:
    raise ValueError(f"path must be one of {PATHS}, got {path!r}.")


def concepts_of(config, models, variables, frames, *, path: str = "kinds",
                names: Sequence[str] = ("static", "dynamic"), short_side: int | None = None,
                stride: int = 1, batch_size: int = 16,
                ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Codes and attention maps of the static and of the dynamic concepts.

  Args:
    config, models, variables: from `load`.
    frames: uint8 [N, H, W, 3].
    path: 'kinds': static concepts on still frames (the s path: static rows of
      C_s), dynamic concepts on frame differences (the d path: dynamic rows of
      C_d), as each kind is learnt; 'rgb': both on the RGB clips (all rows of
      C_v).
    names: the kinds of concept to return, of 'static' and 'dynamic' (with
      'kinds' only their paths run).
    short_side, stride, batch_size: as `video_attention`'s.

  Returns:
    {'static': ..., 'dynamic': ...} for `names`, each (concept ids [K] in
    0..2K-1, codes [N, K], attention [N, H, W, K]).
  """
  check_path(path)
  k = config.model.num_concepts
  halves = {"static": np.arange(k), "dynamic": np.arange(k, 2 * k)}
  if not set(names) <= halves.keys():
    raise ValueError(f"names must be of 'static' and 'dynamic', got {names!r}.")
  x = _model_input(frames, config, short_side or default_short_side(config))  # once
  attention = functools.partial(_attention_at, variables=variables, config=config, x=x,
                                frame_size=frames.shape[1:3], stride=stride,
                                batch_size=batch_size)
  if path == "rgb":
    codes, maps = attention(models["v"])
    return {name: (halves[name], codes[:, halves[name]], maps[..., halves[name]])
            for name in names}
  out = {}
  for name in names:
    codes, maps = attention(models["s" if name == "static" else "d"])
    out[name] = (halves[name], codes[:, halves[name]], maps)
  return out


def top(concepts: tuple[np.ndarray, np.ndarray, np.ndarray], num: int) -> np.ndarray:
  """Positions, within a kind, of its `num` concepts of highest mean code."""
  return np.argsort(-concepts[1].mean(0))[:num]


# ----------------------------------------------------------------------------
# Concept usage over a data set.


def clip_codes(config, models, path: str = "kinds"):
  """per_clip function: clips [M, T, S, S, 3] -> codes [M, 2K].

  'kinds': the static half from the static path (each clip's middle frame
  repeated), the dynamic half from the dynamic path (the clip's frame
  differences); 'rgb': both halves from the RGB path.
  """
  check_path(path)
  k, t = config.model.num_concepts, config.input.num_frames

  def per_clip(variables, clips):
    if path == "rgb":
      return concept_attention(models["v"], variables, clips)[0]
    still = jnp.broadcast_to(clips[:, t // 2:t // 2 + 1], clips.shape)
    static = concept_attention(models["s"], variables, still)[0][:, :k]
    moving = views.frame_differences(clips, config)
    dynamic = concept_attention(models["d"], variables, moving)[0][:, k:]
    return jnp.concatenate([static, dynamic], axis=-1)

  return per_clip


def concept_usage(config, models, variables, *, dataset: str, split: str,
                  data_dir: str = "", path: str = "kinds",
                  num_clips: int | None = None) -> dict[str, Any]:
  """How often each concept is the most active of its kind over a data set.

  Codes are averaged over each video's evaluation clips (centre crops at the
  training size, `eval.num_clips` uniformly spaced, SPEC 6).

  Returns:
    {'top_share': [2K] share of videos in which the concept has the highest
    code of its kind, 'mean_code': [2K], 'num_videos': V}.
  """
  from cvc_jax.downstream import evaluate  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.input.dataset, config.input.data_dir = dataset, data_dir
  if num_clips:
    config.eval.num_clips = num_clips
  codes, _ = evaluate.clip_averaged(config, clip_codes(config, models, path),
                                    variables, split=split)
  k = config.model.num_concepts
  share = np.zeros(2 * k)
  for half in (slice(0, k), slice(k, 2 * k)):
    winners = half.start + np.argmax(codes[:, half], axis=1)
    share += np.bincount(winners, minlength=2 * k) / len(codes)
  return dict(top_share=share.tolist(), mean_code=codes.mean(0).tolist(),
              num_videos=len(codes))
