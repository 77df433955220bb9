"""On-device view construction: pretraining views and evaluation crops (SPEC 1).

The input pipeline ships raw uint8 frames, padded bottom/right into a fixed
canvas, with each video's true (h, w) alongside. Everything here runs inside
the jitted step on the accelerator: functions are vmapped over the batch, draw
their randomness from keys folded from the video's index, and so give the same
views however the batch is sharded and never sync with the host.

Per clip, in the authors' order (their torchvision pipeline, plus the blur of
the supplementary): random resized crop, horizontal flip, grayscale, colour
jitter (torchvision `ColorJitter` semantics, random op order), Gaussian blur,
then mean/std normalisation. Parameters are drawn once per clip and shared by
its frames.
"""

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections

# The order of views along axis 1 of `pretrain_views`, as `models.cvc` reads it.
VIEWS = ("v1", "v2", "s1", "s2", "d1", "d2")

# Resampling runs on 0..255 values; default accelerator matmul precision
# (bfloat16 passes on TPU, TF32 on GPU) would move pixels by up to a grey level.
_PRECISION = jax.lax.Precision.HIGHEST


def normalize(x: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-channel (x - mean) / std with config.input's mean and std.

  Args:
    x: [..., 3] pixels: an integer array in 0..255, or a float array already
      scaled to [0, 1].
    config: the experiment config.

  Returns:
    float32 [..., 3] normalised pixels.
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32) / 255.0
  mean = jnp.asarray(config.input.mean, jnp.float32)
  std = jnp.asarray(config.input.std, jnp.float32)
  return (x.astype(jnp.float32) - mean) / std


def pretrain_views(frames: jax.Array, rng: jax.Array, config: ml_collections.ConfigDict,
                   sizes: jax.Array | None = None) -> jax.Array:
  """Builds the six pretraining views of every video (SPEC 1).

  Video b draws from `fold_in(rng, b)`: the views of a video depend only on
  `rng`, its frames and its position in the (global) batch, not on sharding.

  Args:
    frames: uint8 [B, 2T, H, W, 3]; frames 0..T-1 are clip 1, T..2T-1 clip 2,
      padded bottom/right into the [H, W] canvas.
    rng: one PRNG key for the whole batch.
    config: the experiment config; reads config.input.
    sizes: int [B, 2], the true (h, w) of each video in the canvas; None = the
      whole canvas. Crops never read outside it.

  Returns:
    float32 [B, 6, T, S, S, 3] normalised views in the order of `VIEWS`:
    v1 v2 (augmented clips), s1 s2 (frame j of each clip repeated T times, one
    j per video, augmented independently; with `input.static_crop='clip'` cut
    and flipped as v1 v2), d1 d2 (frame differences of v1 v2).
  """
  b, two_t, h, w, _ = frames.shape
  if two_t % 2:
    raise ValueError(f"pretrain_views wants 2T frames per video, got {two_t}.")
  sizes = _full_sizes(sizes, b, h, w)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
  video_views = functools.partial(_video_views, config=config)
  with jax.named_scope("views"):  # names the views' ops in a profile
    return jax.vmap(video_views)(frames, sizes, keys)


def train_clip_views(frames: jax.Array, rng: jax.Array, config: ml_collections.ConfigDict,
                     sizes: jax.Array | None = None) -> jax.Array:
  """One augmented clip per video, for supervised training downstream (SPEC 6).

  The same per-clip augmentation as the pretraining RGB views, with the
  probabilities and strengths of `config.input`.

  Args:
    frames: uint8 [B, T, H, W, 3], padded bottom/right into the canvas.
    rng: one PRNG key for the batch; video b draws from `fold_in(rng, b)`.
    config: the experiment config; reads config.input.
    sizes: int [B, 2], the true (h, w) of each video; None = the whole canvas.

  Returns:
    float32 [B, T, S, S, 3].
  """
  b, _, h, w, _ = frames.shape
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
  augment = functools.partial(_augment_clip, config=config)
  return jax.vmap(lambda clip, size, key: augment(clip, key, size=size))(
      frames, _full_sizes(sizes, b, h, w), keys)


def eval_views(frames: jax.Array, config: ml_collections.ConfigDict,
               sizes: jax.Array | None = None) -> jax.Array:
  """Resizes each clip's true short side to S, centre crops S x S, normalises.

  Args:
    frames: uint8 [B, N, T, H, W, 3], N clips per video, padded bottom/right.
    config: the experiment config; reads config.input.
    sizes: int [B, 2], the true (h, w) of each video; None = the whole canvas.

  Returns:
    float32 [B, N, T, S, S, 3].
  """
  b, n, t, h, w, _ = frames.shape
  s = config.input.crop_size
  sizes = _full_sizes(sizes, b, h, w)

  def one_video(video, size):
    size = size.astype(jnp.float32)
    # Resize-then-centre-crop is the centred short x short square, resampled.
    short = jnp.minimum(size[0], size[1])
    box = ((size[0] - short) / 2, (size[1] - short) / 2, short, short)
    out = _crop_resize(video.reshape((n * t, h, w, 3)), box, size, s, flip=False)
    return normalize(out / 255.0, config).reshape((n, t, s, s, 3))

  return jax.vmap(one_video)(frames, sizes)


def _full_sizes(sizes, b, h, w):
  """The true sizes as int32 [B, 2], clipped to the canvas; None = whole canvas."""
  if sizes is None:
    return jnp.broadcast_to(jnp.asarray([h, w], jnp.int32), (b, 2))
  return jnp.clip(jnp.asarray(sizes, jnp.int32), 1, jnp.asarray([h, w], jnp.int32))


def _video_views(frames, size, key, *, config):
  """The six views of one video: frames [2T, H, W, 3] -> [6, T, S, S, 3]."""
  t = frames.shape[0] // 2
  # One key per augmented clip (v1 v2 s1 s2) and one for the static index.
  clip_keys = jnp.stack([jax.random.fold_in(key, i) for i in range(4)])
  j = jax.random.randint(jax.random.fold_in(key, 4), (), 0, t)

  def augment(*args, repeat=1):  # over the clips
    return jax.vmap(functools.partial(_augment_clip, size=size, config=config,
                                      repeat=repeat))(*args)

  clips = frames.reshape((2, t) + frames.shape[1:])
  v = augment(clips, clip_keys[:2])

  # The reference augments the T copies of frame j with consistent parameters, so
  # they stay identical: augmenting the one frame and repeating it is the same.
  # Not with gray='channel' (and gray_prob > 0), which picks a channel per
  # frame: there the copies are cut once and repeated before the colour steps.
  stills = jnp.stack([frames[j], frames[t + j]])[:, None]
  static_crop = config.input.static_crop
  if static_crop not in ("own", "clip"):
    raise ValueError(f"config.input.static_crop={static_crop!r}: use 'own' (the "
                     "static views draw their own crop and flip) or 'clip' (those "
                     "of the RGB clip the frame comes from).")
  # 'clip': s_i's crop and flip are drawn from v_i's key, so they are v_i's.
  geometry_keys = (clip_keys[:2],) if static_crop == "clip" else ()
  repeat = t if _gray_kind(config) == "channel" and config.input.gray_prob > 0 else 1
  s = jnp.broadcast_to(augment(stills, clip_keys[2:], *geometry_keys, repeat=repeat),
                       v.shape)

  return jnp.concatenate([v, s, frame_differences(v, config)], axis=0)


def frame_differences(clips: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """The d view of clips [M, T, ...] (SPEC 1): with `input.diff_wrap`, clips -
  roll(clips, 1) along T, the reference's (frame 0 minus frame T-1); else zero,
  then the consecutive differences."""
  if config.input.diff_wrap:
    return clips - jnp.roll(clips, 1, axis=1)
  return jnp.concatenate([jnp.zeros_like(clips[:, :1]), clips[:, 1:] - clips[:, :-1]],
                         axis=1)


# Slots of the one vector of uniforms that parameterises a clip's augmentation:
# a single PRNG call per clip keeps the compiled step small. The crop box draws
# _CROP_TRIES candidate (area, aspect, swap) triples, so _AREA, _ASPECT and _SWAP
# are slices of that many slots; the crop and flip slots come first, so that
# _GEOMETRY is one contiguous slice.
_CROP_TRIES = 10
_AREA, _ASPECT, _SWAP = (slice(i * _CROP_TRIES, (i + 1) * _CROP_TRIES) for i in range(3))
_Y, _X, _FLIP, _GRAY, _JITTER, _BLUR, _SIGMA = range(3 * _CROP_TRIES, 3 * _CROP_TRIES + 7)
_GEOMETRY = slice(0, _GRAY)  # the crop box and the flip
_FACTORS = slice(_SIGMA + 1, _SIGMA + 5)  # brightness, contrast, saturation, hue
_ORDER = slice(_SIGMA + 5, _SIGMA + 9)  # argsort of four uniforms: the jitter op order
_NUM_DRAWS = _ORDER.stop


def _clip_draws(key, geometry_key=None):
  """The uniforms [_NUM_DRAWS] of one clip's augmentation, from `key`; the crop
  and flip slots from `geometry_key` where given."""
  u = jax.random.uniform(key, (_NUM_DRAWS,))
  if geometry_key is not None:
    u = u.at[_GEOMETRY].set(jax.random.uniform(geometry_key, (_NUM_DRAWS,))[_GEOMETRY])
  return u


def _augment_clip(clip, key, geometry_key=None, *, size, config, repeat=1):
  """Augments one clip [T, H, W, 3] uint8 with one draw of parameters.

  The crop and flip are drawn from `geometry_key` (default `key`): two clips
  given the same one are cut and flipped alike. `repeat` > 1 repeats each cut
  frame that many times before the colour steps (a still shown for T frames).
  """
  inp = config.input
  s = inp.crop_size
  u = _clip_draws(key, geometry_key)
  size = size.astype(jnp.float32)

  # 1) Random resized crop and flip, as one bilinear resample from the canvas.
  box = _random_box(u, size, inp.crop_area, inp.crop_aspect)
  x = _crop_resize(clip, box, size, s, flip=u[_FLIP] < inp.flip_prob) / 255.0
  if repeat > 1:
    x = jnp.repeat(x, repeat, axis=0)

  # 2) Grayscale before the jitter, as in the authors' pipeline: for the whole
  #    clip or not at all.
  gray_kind = _gray_kind(config)  # checked even where gray_prob = 0 leaves it unused
  if inp.gray_prob > 0:
    grey = _grayscale(x, jax.random.fold_in(key, 1), gray_kind)
    x = jnp.where(u[_GRAY] < inp.gray_prob, grey, x)

  # 3) Colour jitter.
  if inp.jitter_prob > 0 and any(inp.jitter):
    jittered = _color_jitter(x, u[_FACTORS], jnp.argsort(u[_ORDER]), inp.jitter)
    x = jnp.where(u[_JITTER] < inp.jitter_prob, jittered, x)

  # 4) Gaussian blur, kernel about 10% of the crop (SimCLR's choice), odd.
  if inp.blur and inp.blur_prob > 0:
    sigma = _between(u[_SIGMA], *inp.blur_sigma)
    blurred = _gaussian_blur(x, sigma, int(0.1 * s) // 2 * 2 + 1)
    x = jnp.where(u[_BLUR] < inp.blur_prob, blurred, x)

  return normalize(x, config)


def _gray_kind(config) -> str:
  """`config.input.gray`, checked."""
  kind = config.input.get("gray", "luma")
  if kind not in ("luma", "channel"):
    raise ValueError(f"config.input.gray={kind!r}: use 'luma' (ITU-R 601, SPEC 1) or "
                     "'channel' (one random RGB channel per frame, the authors' code).")
  return kind


def _grayscale(x, key, kind):
  """x [T, S, S, 3] in grey, three equal channels.

  'luma': ITU-R 601 luma, torchvision's Grayscale (SPEC 1). 'channel': one of
  R, G, B drawn for each frame, as the authors' code does (its RandomGray is a
  "channel splitting"; a static view's copies of its frame then differ).
  """
  if kind == "luma":
    return pix.rgb_to_grayscale(x, keep_dims=True)
  assert kind == "channel", kind  # `_gray_kind` named any other
  # A weighted sum with one-hot weights, as luma is one with fixed
  # weights: a gather (take_along_axis) here made the reference step on XLA's
  # CPU about 0.4 s slower at batch 2 (RESULTS.md, session 15), the views alone
  # 0.06 s.
  weights = jax.nn.one_hot(jax.random.randint(key, (x.shape[0],), 0, 3), 3)
  grey = jnp.sum(x * weights[:, None, None, :], axis=-1, keepdims=True)
  return jnp.broadcast_to(grey, x.shape)


def _between(u, low, high):
  """Maps a uniform draw in [0, 1) to [low, high)."""
  return low + u * (high - low)


def _random_box(u, size, area_range, aspect_range):
  """A random (y0, x0, height, width) crop box inside the true (h, w) region.

  The authors' code calls a RandomSizedCrop from an augmentation module it does
  not ship; DPC's and CoCLR's, which share its signature, redraw a box that does
  not fit the frame rather than clip it: clipping cuts boxes smaller than drawn,
  most often the large ones, and biases the crops. So: _CROP_TRIES candidates, each of area fraction ~ U(area_range) and
  aspect (width / height) ~ exp(U(log aspect_range)), inverted half the time;
  the first that fits the region is the box, its offsets uniform over what is
  left. If none fits, the largest centred square (their fallback: resize the
  short side, centre crop). All candidates are computed at once, with fixed
  shapes; the box stays in float pixels.
  """
  h, w = size[0], size[1]
  area = h * w * _between(u[_AREA], *area_range)
  log_aspect = _between(u[_ASPECT], jnp.log(aspect_range[0]), jnp.log(aspect_range[1]))
  aspect = jnp.exp(jnp.where(u[_SWAP] < 0.5, -log_aspect, log_aspect))  # width / height
  crop_w, crop_h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
  # A relative slack of 1e-6 lets a box that fits exactly but for float rounding
  # in; the min below then takes the rounding back off.
  fits = (crop_w <= w * (1 + 1e-6)) & (crop_h <= h * (1 + 1e-6))
  # One-hot on the first fit: sums, not a gather, pick its sides.
  first = fits & (jnp.cumsum(fits) == 1)
  found = jnp.any(fits)
  short = jnp.minimum(h, w)
  crop_h = jnp.where(found, jnp.minimum(jnp.sum(jnp.where(first, crop_h, 0.0)), h), short)
  crop_w = jnp.where(found, jnp.minimum(jnp.sum(jnp.where(first, crop_w, 0.0)), w), short)
  # The fallback square is centred: u = 1/2.
  y = jnp.where(found, u[_Y], 0.5)
  x = jnp.where(found, u[_X], 0.5)
  return y * (h - crop_h), x * (w - crop_w), crop_h, crop_w


def _crop_resize(frames, box, size, out_size, *, flip):
  """Resamples box (y0, x0, h, w) of every frame [T, H, W, C] to [T, S, S, C].

  Bilinear, antialiased when shrinking (PIL's filter), as two dense matrices so
  the box and the flip can be traced values. Pixels outside the true `size` get
  zero weight, so the padding never leaks in.
  """
  y0, x0, crop_h, crop_w = box
  rows = _resample_matrix(out_size, frames.shape[1], y0, crop_h, size[0])
  cols = _resample_matrix(out_size, frames.shape[2], x0, crop_w, size[1])
  # Reversing the output columns of the matrix is the horizontal flip, for free.
  cols = jnp.where(flip, cols[::-1], cols)
  return jnp.einsum("yh,thwc,xw->tyxc", rows, frames.astype(jnp.float32), cols,
                    precision=_PRECISION)


def _resample_matrix(out_size, in_size, start, length, valid):
  """[out_size, in_size] weights of a triangle filter over [start, start+length).

  Pixel i covers [i, i+1); output pixel o samples start + (o + 0.5) * step.
  When shrinking the triangle widens to the step, low-passing like PIL's
  antialiased bilinear; weights on pixels >= valid are dropped and each row
  renormalised, as jax.image.scale_and_translate treats the array's own edge.
  """
  step = length / out_size  # input pixels per output pixel
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
  pixels = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  width = jnp.maximum(step, 1.0)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centres[:, None] - pixels[None, :]) / width)
  weights = jnp.where(pixels[None, :] < valid, weights, 0.0)
  return weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-8)


def _color_jitter(x, u, order, strengths):
  """torchvision ColorJitter on [..., H, W, 3] in [0, 1], ops in a given order.

  Factors ~ U[max(0, 1 - s), 1 + s] for brightness, contrast and saturation, hue
  shift ~ U[-h, h], from the uniforms u[0:4]; `order` is a permutation of
  0..3. Every op clamps to [0, 1] as torchvision's does on floats.
  """
  brightness, contrast, saturation, hue = strengths
  f_b, f_c, f_s = (_between(u[i], max(0.0, 1.0 - st), 1.0 + st)
                   for i, st in enumerate((brightness, contrast, saturation)))
  delta_h = _between(u[3], -hue, hue)

  def gray(y):
    return pix.rgb_to_grayscale(y)  # [..., 1]

  # torchvision blends: brightness with black, contrast with the mean grey
  # level of each frame, saturation with the grey image (dm-pix's own
  # brightness/contrast/saturation follow TF, which differs).
  ops = [
      lambda y: jnp.clip(f_b * y, 0.0, 1.0),
      lambda y: jnp.clip(f_c * y + (1 - f_c) * jnp.mean(
          gray(y), axis=(-3, -2, -1), keepdims=True), 0.0, 1.0),
      lambda y: jnp.clip(f_s * y + (1 - f_s) * gray(y), 0.0, 1.0),
      lambda y: jnp.clip(pix.adjust_hue(y, delta_h), 0.0, 1.0),
  ]
  # An op of strength 0 is the identity: skip its work (HSV round trips too).
  ops = [op if st else (lambda y: y) for op, st in zip(ops, strengths)]
  # A rolled loop traces the four ops once instead of once per step.
  return jax.lax.fori_loop(0, len(ops), lambda i, y: jax.lax.switch(order[i], ops, y), x)


def _gaussian_blur(x, sigma, kernel_size):
  """Blurs frames [T, H, W, 3] with reflect padding (torchvision's).

  dm-pix's separable kernel, as two dense matrices like `_crop_resize`'s: the
  depthwise float32 convolutions of `pix.gaussian_blur` took 2.7 ms of an H200
  step of configs/ucf101.py (benchmarks/RESULTS.md, session 8's profile) and
  0.22 s of the views of a 2-video batch on a 2-core CPU.
  """
  rows = _blur_matrix(sigma, kernel_size, x.shape[-3])
  cols = _blur_matrix(sigma, kernel_size, x.shape[-2])
  return jnp.einsum("yh,thwc,xw->tyxc", rows, x, cols, precision=_PRECISION)


def _blur_matrix(sigma, kernel_size, size):
  """[size, size] weights of a 1D Gaussian blur over `size` pixels.

  The taps of `pix.gaussian_blur` (exp(-k^2 / 2 sigma^2) for k in -r..r, r =
  kernel_size // 2, normalised); output pixel o takes tap k from pixel o + k
  reflected at the edges as numpy's "reflect" padding does: -(o + k) below 0,
  2 (size - 1) - (o + k) past the end.
  """
  r = int(kernel_size) // 2
  if r >= size:  # one reflection no longer lands inside the frame
    raise ValueError(f"A blur of radius {r} cannot reflect at the edges of {size} "
                     f"pixels: the kernel ({kernel_size}) must be under {2 * size}.")
  taps = jnp.arange(-r, r + 1)
  weights = jnp.exp(-jnp.square(taps.astype(jnp.float32)) / (2.0 * sigma**2))
  weights = weights / weights.sum()
  source = jnp.abs(jnp.arange(size)[:, None] + taps[None, :])  # [size, taps]
  source = jnp.where(source > size - 1, 2 * (size - 1) - source, source)
  return jnp.einsum("k,oki->oi", weights, jax.nn.one_hot(source, size, dtype=jnp.float32))
