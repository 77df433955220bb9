"""On-device views (SPEC 1): parameter sharing, view semantics, padding, sharding."""

import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import ucf101
from cvc_jax import views

B, T, H, W, S = 3, 4, 40, 48, 32  # the runlocal config's clip shape
RNG = np.random.default_rng(0)
SENTINEL = np.array([255, 0, 0], np.uint8)  # paints the padding; must never show

# Colour augmentations off: what is left (crop, flip) is linear in the pixels.
GEOMETRY_ONLY = (("gray_prob", 0.0), ("jitter_prob", 0.0), ("blur", False))
# With a square true region, area 1 and aspect 1 crop exactly the whole region.
WHOLE_REGION = (("crop_area", (1.0, 1.0)), ("crop_aspect", (1.0, 1.0)))


def _config(overrides=()):
  config = ucf101.get_config("runlocal")
  with config.unlocked():
    for name, value in overrides:
      setattr(config.input, name, value)
  return config


@functools.lru_cache(maxsize=None)
def _pretrain_fn(overrides=()):
  """One compiled pretrain_views per set of config overrides (compiles are slow)."""
  config = _config(overrides)
  return jax.jit(lambda f, k, s: views.pretrain_views(f, k, config, s))


def _pretrain(frames, overrides=(), key=0, sizes=None):
  if sizes is None:
    sizes = np.tile([H, W], (frames.shape[0], 1))
  out = _pretrain_fn(overrides)(frames, jax.random.key(key), np.asarray(sizes, np.int32))
  return np.asarray(out)


def _denormalize(x, config=None):
  """Normalised views back to 0..255 pixels."""
  config = config or _config()
  return (x * np.asarray(config.input.std) + np.asarray(config.input.mean)) * 255


def _expected(pixels, config=None):
  """NumPy normalisation of uint8 pixels."""
  config = config or _config()
  return ((pixels / 255.0 - np.asarray(config.input.mean)) / np.asarray(config.input.std))


def _padded(frames, sizes):
  """Paints everything outside each video's true (h, w) with the sentinel."""
  frames = frames.copy()
  for b, (h, w) in enumerate(sizes):
    frames[b, ..., h:, :, :] = SENTINEL
    frames[b, ..., :, w:, :] = SENTINEL
  return frames


def _random_frames(b=B, lo=0, hi=256):
  return RNG.integers(lo, hi, (b, 2 * T, H, W, 3), dtype=np.uint8)


def test_shapes_order_and_finite():
  out = _pretrain(_random_frames())
  assert out.shape == (B, 6, T, S, S, 3) and out.dtype == np.float32
  assert np.isfinite(out).all()
  assert views.VIEWS == ("v1", "v2", "s1", "s2", "d1", "d2")


def test_frames_of_a_clip_share_every_parameter_clips_do_not():
  # Every frame of the video is the same image: with all augmentations on, frames
  # of one view can only differ if parameters were drawn per frame.
  sizes = [[40, 48], [27, 35], [33, 20]]
  image = RNG.integers(0, 256, (B, 1, H, W, 3), dtype=np.uint8)
  out = _pretrain(_padded(np.repeat(image, 2 * T, axis=1), sizes), sizes=sizes)
  for i in range(4):  # v1 v2 s1 s2
    np.testing.assert_allclose(out[:, i], np.repeat(out[:, i, :1], T, axis=1), atol=1e-5)
  # The two clips (and the static views) are identical inputs, yet their views
  # differ: each clip draws its own parameters.
  for i, j in [(0, 1), (2, 3), (0, 2), (1, 3)]:
    assert np.abs(out[:, i, 0] - out[:, j, 0]).max(axis=(1, 2, 3)).min() > 0.1


def test_crop_and_flip_shared_over_changing_frames():
  # Frame t is a fixed random image plus 20 t grey levels. Crop and flip are
  # linear with weights summing to one, so shared geometry maps frame t to view
  # frame 0 plus exactly 20 t levels; a per-frame crop would move the image.
  base = RNG.integers(0, 100, (B, 1, H, W, 3))
  frames = (base + 20 * np.arange(2 * T)[None, :, None, None, None]).astype(np.uint8)
  out = _denormalize(_pretrain(frames, GEOMETRY_ONLY))
  for clip in (0, 1):
    step = out[:, clip] - out[:, clip, :1]
    want = 20.0 * np.arange(T)[None, :, None, None, None]
    np.testing.assert_allclose(step, np.broadcast_to(want, step.shape), atol=1e-3)
  assert np.abs(out[:, 0] - out[:, 1] + 20 * T).max() > 1.0  # different crops


def test_whole_region_crop_is_the_region():
  # A square S x S region with area 1 and aspect 1: the view is the region
  # itself, pixel for pixel, or its mirror image (flip_prob 0.5).
  sizes = [[S, S]] * B
  frames = _padded(_random_frames(), sizes)
  overrides = GEOMETRY_ONLY + WHOLE_REGION
  config = _config(overrides)
  out = _pretrain(frames, overrides, key=1, sizes=sizes)
  want = _expected(frames[:, :, :S, :S], config)
  mirror = want[:, :, :, ::-1]

  def match(view, frame):  # 0: the frame, 1: its mirror, None: neither
    for flipped, image in enumerate((want[frame], mirror[frame])):
      if np.allclose(view, image, atol=1e-5):
        return flipped
    return None

  flips = []
  for b in range(B):
    for clip in (0, 1):
      flips.append({match(out[b, clip, t], (b, clip * T + t)) for t in range(T)})
    # Static views: one frame j, the same j for both clips, repeated T times.
    j = [t for t in range(T)
         if match(out[b, 2, 0], (b, t)) is not None
         and match(out[b, 3, 0], (b, T + t)) is not None]
    assert len(j) == 1, "s1, s2 are not frame j of clip 1, clip 2"
    flips += [{match(out[b, 2, 0], (b, j[0]))}, {match(out[b, 3, 0], (b, T + j[0]))}]
  # Every frame of a clip matches, all flipped or none; both kinds occur.
  assert all(f in ({0}, {1}) for f in flips), flips
  assert {0} in flips and {1} in flips


def test_static_views_are_one_frame_repeated():
  out = _pretrain(_random_frames())
  for i in (2, 3):
    np.testing.assert_array_equal(out[:, i], np.repeat(out[:, i, :1], T, axis=1))
  assert np.abs(out[:, 0, 1:] - out[:, 0, :1]).max() > 0.1  # v is not static


def test_static_crop_clip_takes_the_rgb_clips_crop_and_flip():
  # Geometry only: with static_crop='clip', s_i is frame j of v_i (one j for
  # both clips; resampled one frame instead of T, so to float32 rounding); with
  # 'own' (default) s_i is cut apart.
  frames = _random_frames()
  shared = _pretrain(frames, GEOMETRY_ONLY + (("static_crop", "clip"),), key=5)
  own = _pretrain(frames, GEOMETRY_ONLY, key=5)
  np.testing.assert_array_equal(shared[:, :2], own[:, :2])  # v unchanged
  for b in range(B):
    j = [t for t in range(T)
         if np.allclose(shared[b, 2, 0], shared[b, 0, t], atol=1e-4)
         and np.allclose(shared[b, 3, 0], shared[b, 1, t], atol=1e-4)]
    assert len(j) == 1, f"video {b}: s1, s2 are not frame j of v1, v2"
    assert not any(np.allclose(own[b, 2, 0], own[b, 0, t], atol=1e-3) for t in range(T))
  # Colour stays the static views' own: with it on, s1 is no frame of v1.
  coloured = _pretrain(frames, (("static_crop", "clip"), ("jitter_prob", 1.0)), key=5)
  for b in range(B):
    assert not any(np.allclose(coloured[b, 2, 0], coloured[b, 0, t], atol=1e-3)
                   for t in range(T))
  with pytest.raises(ValueError, match="static_crop='shared'.*'own'.*'clip'"):
    _pretrain(frames, (("static_crop", "shared"),))


def test_difference_views():
  frames = _random_frames()
  wrap = _pretrain(frames, key=3)  # diff_wrap is True by default
  nowrap = _pretrain(frames, (("diff_wrap", False),), key=3)
  # The same key gives the same RGB and static views in both modes.
  np.testing.assert_array_equal(wrap[:, :4], nowrap[:, :4])
  v = wrap[:, :2]
  # XLA fuses v into d's subtraction (and may contract it into an FMA), so d can
  # differ from a subtraction of the rounded v by one float32 ulp.
  np.testing.assert_allclose(wrap[:, 4:], v - np.roll(v, 1, axis=2), rtol=0, atol=2e-6)
  np.testing.assert_array_equal(nowrap[:, 4:, 0], 0.0)
  np.testing.assert_allclose(nowrap[:, 4:, 1:], v[:, :, 1:] - v[:, :, :-1], rtol=0,
                             atol=2e-6)


def test_determinism_and_key_dependence():
  frames = _random_frames()
  first = _pretrain(frames, key=7)
  np.testing.assert_array_equal(first, _pretrain(frames, key=7))
  other = _pretrain(frames, key=8)
  assert np.abs(first - other).max(axis=(1, 2, 3, 4, 5)).min() > 0.1
  # A video's views depend on the key, its frames and its index only: changing
  # the other videos of the batch leaves them alone.
  mixed = frames.copy()
  mixed[1:] = _random_frames(B - 1)
  np.testing.assert_array_equal(first[0], _pretrain(mixed, key=7)[0])


def test_padding_is_never_read():
  # A grey true region stays grey and flat under every augmentation (crop, flip,
  # grayscale, jitter, blur); one drop of the red padding would break r == g == b.
  sizes = [[40, 48], [23, 31], [17, 45]]
  frames = _padded(np.full((B, 2 * T, H, W, 3), 100, np.uint8), sizes)
  for key in range(3):
    out = _denormalize(_pretrain(frames, key=key, sizes=sizes)[:, :4])
    np.testing.assert_allclose(out, np.broadcast_to(out[..., :1, :1, :1], out.shape),
                               atol=1e-3)


def test_constant_grey_maps_to_the_normalised_value():
  config = _config(GEOMETRY_ONLY)
  out = _pretrain(np.full((B, 2 * T, H, W, 3), 128, np.uint8), GEOMETRY_ONLY)
  want = (128 / 255 - np.asarray(config.input.mean)) / np.asarray(config.input.std)
  np.testing.assert_allclose(out[:, :4], np.broadcast_to(want, out[:, :4].shape),
                             atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], 0.0, atol=1e-6)
  np.testing.assert_allclose(views.normalize(np.uint8(128), config), want, atol=1e-6)
  np.testing.assert_allclose(views.normalize(np.float32(128 / 255), config), want,
                             atol=1e-6)


def test_crop_boxes_lie_inside_and_follow_the_ranges():
  # Red = 5 x, green = 5 y inside the true region: the view of a ramp is about
  # the ramp at the sample centres (exactly so for bilinear; the antialiasing
  # filter of a shrinking crop is off by a fraction of a pixel), so interior
  # pixels give the crop box back. 4 keys x 3 videos x 4 views = 48 crops.
  sizes = np.array([[40, 48], [36, 30], [21, 47]])
  y, x = np.mgrid[:H, :W]
  ramp = np.stack([5 * x, 5 * y, np.zeros_like(x)], -1).astype(np.uint8)
  frames = _padded(np.broadcast_to(ramp, (B, 2 * T, H, W, 3)), sizes)
  out = np.concatenate([_denormalize(_pretrain(frames, GEOMETRY_ONLY, key=k, sizes=sizes))
                        for k in range(4)])
  sizes = np.tile(sizes, (4, 1))
  flips = []
  for view in range(4):
    red, green = out[:, view, 0, S // 2, :, 0] / 5, out[:, view, 0, :, S // 2, 1] / 5
    lo, hi = 8, S - 9  # clear of the edges, where the region's border cuts the filter
    step_x = (red[:, hi] - red[:, lo]) / (hi - lo)
    step_y = (green[:, hi] - green[:, lo]) / (hi - lo)
    assert (step_y > 0).all()  # never flipped vertically
    flips.append(step_x < 0)
    step_x = np.abs(step_x)
    # Pixel i covers [i, i + 1) and holds 5 i at its centre.
    x0 = np.minimum(red[:, lo], red[:, hi]) + 0.5 - (lo + 0.5) * step_x
    y0 = green[:, lo] + 0.5 - (lo + 0.5) * step_y
    crop_w, crop_h = S * step_x, S * step_y
    tol = 0.15
    assert (x0 > -tol).all() and (x0 + crop_w < sizes[:, 1] + tol).all()
    assert (y0 > -tol).all() and (y0 + crop_h < sizes[:, 0] + tol).all()
    area = crop_w * crop_h / sizes.prod(1)
    # Where no candidate fits, the box is the centred short x short square (the
    # 21 x 47 region's is under half the area).
    short = sizes.min(1)
    square = ((np.abs(crop_w - short) < tol) & (np.abs(crop_h - short) < tol)
              & (np.abs(x0 - (sizes[:, 1] - short) / 2) < tol)
              & (np.abs(y0 - (sizes[:, 0] - short) / 2) < tol))
    assert (square | ((area > 0.5 - 0.02) & (area < 1 + 0.02))).all()
    assert area.std() > 0.05
  flips = np.stack(flips)
  assert 0.2 < flips.mean() < 0.8  # flip_prob 0.5


# The frame of UCF-101 (h, w) and the authors' crop ranges.
UCF_SIZE, UCF_AREA, UCF_ASPECT = (128, 171), (0.5, 1.0), (3 / 4, 4 / 3)


def _boxes(n, size, area_range, aspect_range, seed=0):
  """n crop boxes [n, 4] (y0, x0, h, w) drawn as `_augment_clip` draws them."""
  keys = jax.random.split(jax.random.key(seed), n)
  size = jnp.asarray(size, jnp.float32)
  box = jax.jit(jax.vmap(lambda k: views._random_box(  # pylint: disable=protected-access
      views._clip_draws(k), size, area_range, aspect_range)))(keys)  # pylint: disable=protected-access
  return np.stack([np.asarray(side) for side in box], -1)


def _reference_crops(n, size, area_range, aspect_range, tries, seed=0):
  """NumPy: area fractions of the first of `tries` candidates that fits (the
  centred square where none does), and of the first candidate clipped to the
  region (the old crop)."""
  rng = np.random.default_rng(seed)
  h, w = size
  area = rng.uniform(*area_range, (n, tries))
  aspect = np.exp(rng.uniform(*np.log(aspect_range), (n, tries)))
  aspect = np.where(rng.random((n, tries)) < 0.5, 1 / aspect, aspect)
  crop_w, crop_h = np.sqrt(area * h * w * aspect), np.sqrt(area * h * w / aspect)
  fits = (crop_w <= w) & (crop_h <= h)
  first = area[np.arange(n), fits.argmax(1)]
  redrawn = np.where(fits.any(1), first, min(h, w)**2 / (h * w))
  clipped = np.minimum(crop_w[:, 0], w) * np.minimum(crop_h[:, 0], h) / (h * w)
  return redrawn, clipped


def test_crop_redraws_boxes_that_do_not_fit():
  # UCF-101's 128 x 171 frames: about half the first candidates do not fit.
  h, w = UCF_SIZE
  y0, x0, crop_h, crop_w = _boxes(20000, UCF_SIZE, UCF_AREA, UCF_ASPECT).T
  eps = 1e-3
  assert (y0 > -eps).all() and (x0 > -eps).all()
  assert (y0 + crop_h < h + eps).all() and (x0 + crop_w < w + eps).all()
  fallback = (crop_h == h) & (crop_w == h)  # the centred 128 x 128 square
  np.testing.assert_allclose(x0[fallback], (w - h) / 2)
  np.testing.assert_allclose(y0[fallback], 0.0)
  assert fallback.mean() < 0.01  # ten tries almost always find a box
  # Every other box is a candidate as drawn, uncut: its area and aspect in range.
  area, aspect = crop_h * crop_w / (h * w), crop_w / crop_h
  kept = ~fallback
  assert (area[kept] > UCF_AREA[0] - 1e-5).all() and (area[kept] < UCF_AREA[1] + 1e-5).all()
  assert (aspect[kept] > UCF_ASPECT[0] - 1e-5).all()
  assert (aspect[kept] < UCF_ASPECT[1] + 1e-5).all()
  # Offsets uniform over what is left.
  for offset, room in ((y0, h - crop_h), (x0, w - crop_w)):
    position = offset[kept] / room[kept]
    assert abs(position.mean() - 0.5) < 0.02 and position.std() > 0.25
  # The area fraction is that of the first fitting candidate, not the clipped
  # first candidate's (which keeps large draws, cut: mean about 0.71 against 0.66).
  redrawn, clipped = _reference_crops(100000, UCF_SIZE, UCF_AREA, UCF_ASPECT,
                                      views._CROP_TRIES)  # pylint: disable=protected-access
  assert abs(area.mean() - redrawn.mean()) < 0.005
  assert abs(clipped.mean() - redrawn.mean()) > 0.03
  # The distribution too, not just its mean.
  np.testing.assert_allclose(np.quantile(area, [0.1, 0.5, 0.9]),
                             np.quantile(redrawn, [0.1, 0.5, 0.9]), atol=0.01)


def test_crop_falls_back_to_the_centred_square():
  # Area 1 at aspect 2..3 never fits: the box is the largest centred square,
  # the whole region if square.
  for (h, w), want in (((64, 64), (0, 0, 64, 64)), (UCF_SIZE, (0, 21.5, 128, 128)),
                       ((171, 128), (21.5, 0, 128, 128))):
    boxes = _boxes(64, (h, w), (1.0, 1.0), (2.0, 3.0))
    np.testing.assert_allclose(boxes, np.broadcast_to(want, boxes.shape), atol=1e-4)
  # And a box that fits exactly is taken: area 1, aspect 1, a square region.
  boxes = _boxes(64, (48, 48), (1.0, 1.0), (1.0, 1.0))
  np.testing.assert_allclose(boxes, np.broadcast_to((0, 0, 48, 48), boxes.shape), atol=1e-4)


def test_supervised_crops_are_redrawn_not_clipped():
  # Through train_clip_views (the pretraining views' crop too): read each box
  # back from a ramp (red = x, green = y) in a 128 x 171 region of a padded
  # canvas. With area 0.9..1, a candidate fits only if wide (aspect >= 1.2) and
  # most first candidates do not: clipping them to the region (the old crop)
  # cut boxes of area under 0.9 at random offsets; redrawing keeps the area, or
  # falls back to the centred square.
  h, w = UCF_SIZE
  n = 16
  y, x = np.mgrid[:h + 8, :w + 9]
  ramp = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
  frames = _padded(np.broadcast_to(ramp, (n, 1) + ramp.shape), [UCF_SIZE] * n)
  overrides = GEOMETRY_ONLY + (("crop_area", (0.9, 1.0)), ("crop_aspect", UCF_ASPECT))
  config = _config(overrides)
  fn = jax.jit(lambda f, k, s: views.train_clip_views(f, k, config, s))
  sizes = np.tile(UCF_SIZE, (n, 1)).astype(np.int32)
  out = np.concatenate([_denormalize(np.asarray(fn(frames, jax.random.key(k), sizes)),
                                     config) for k in range(2)])[:, 0]
  red, green = out[:, S // 2, :, 0], out[:, :, S // 2, 1]
  lo, hi = 8, S - 9
  step_x = np.abs(red[:, hi] - red[:, lo]) / (hi - lo)
  step_y = (green[:, hi] - green[:, lo]) / (hi - lo)
  x0 = np.minimum(red[:, lo], red[:, hi]) + 0.5 - (lo + 0.5) * step_x
  y0 = green[:, lo] + 0.5 - (lo + 0.5) * step_y
  crop_w, crop_h = S * step_x, S * step_y
  tol = 0.3
  assert (x0 > -tol).all() and (x0 + crop_w < w + tol).all()
  assert (y0 > -tol).all() and (y0 + crop_h < h + tol).all()
  square = ((np.abs(crop_h - h) < tol) & (np.abs(crop_w - h) < tol)
            & (np.abs(x0 - (w - h) / 2) < tol) & (np.abs(y0) < tol))
  area = crop_w * crop_h / (h * w)
  drawn = (area > 0.9 - 0.01) & (crop_w / crop_h > 0.9 * w * h / h**2 - 0.01)
  assert (square | drawn).all(), np.stack([y0, x0, crop_h, crop_w], -1)[~(square | drawn)]
  assert square.any() and drawn.any()


def test_grayscale_then_jitter_stays_grey():
  config = _config((("gray_prob", 1.0),))
  out = _denormalize(_pretrain(_random_frames(), (("gray_prob", 1.0),))[:, :4], config)
  np.testing.assert_allclose(out[..., 1:], np.broadcast_to(out[..., :1], out[..., 1:].shape),
                             atol=1e-3)


def test_channel_grayscale_takes_one_rgb_channel_per_frame():
  # The authors' grayscale: frames of constant R, G, B come out as one of the
  # three values, in all channels, drawn frame by frame (static views too: their
  # copies of the one frame differ, as in the authors' code).
  rgb = np.array([30, 120, 210], np.uint8)
  frames = np.broadcast_to(rgb, (B, 2 * T, H, W, 3)).copy()
  gray = GEOMETRY_ONLY[1:] + (("gray_prob", 1.0), ("gray", "channel"))
  out = np.round(_denormalize(_pretrain(frames, gray)[:, :4]))  # v1 v2 s1 s2
  assert np.ptp(out, axis=(-3, -2, -1)).max() == 0  # each frame one grey level
  levels = out[..., 0, 0, 0]  # [B, 4, T]
  assert set(np.unique(levels)) == set(rgb.tolist())
  assert all(len(np.unique(clip)) > 1 for clip in levels.reshape(-1, T)[:4])
  # Not grayed (p = 0): the colours are kept.
  kept = np.round(_denormalize(_pretrain(frames, GEOMETRY_ONLY + (("gray", "channel"),))))
  np.testing.assert_array_equal(kept[:, :4], np.broadcast_to(rgb, kept[:, :4].shape))
  with pytest.raises(ValueError, match=r"config.input.gray='lumma': use 'luma'"):
    _pretrain(frames, (("gray", "lumma"),))
  with pytest.raises(ValueError, match=r"config.input.gray='lumma': use 'luma'"):
    _pretrain(frames, GEOMETRY_ONLY + (("gray", "lumma"),))  # named though unused
  with pytest.raises(ValueError, match=r"config.input.gray='lumma': use 'luma'"):
    views.train_clip_views(frames[:, :T], jax.random.key(0),  # downstream's too
                           _config(GEOMETRY_ONLY + (("gray", "lumma"),)))


def test_no_grayscale_work_at_gray_prob_0():
  # gray_prob = 0 traces no grayscale, and 'channel' then cuts each still once
  # instead of T times: the same program as 'luma'.
  frames, key = _random_frames(), jax.random.key(0)
  sizes = np.tile([H, W], (B, 1)).astype(np.int32)

  def program(overrides):
    config = _config(overrides)
    return str(jax.make_jaxpr(lambda f: views.pretrain_views(f, key, config, sizes))(frames))

  never = (("gray_prob", 0.0),)
  assert program(never + (("gray", "channel"),)) == program(never + (("gray", "luma"),))
  for kind in ("luma", "channel"):  # grey's equations are traced only where used
    kind = (("gray", kind),)
    used = program(GEOMETRY_ONLY + (("gray_prob", 0.5),) + kind).count("\n")
    assert program(GEOMETRY_ONLY + kind).count("\n") < used


def test_brightness_is_one_factor_per_clip():
  # torchvision brightness multiplies by b ~ U[0.5, 1.5]; dark frames never clip.
  overrides = GEOMETRY_ONLY + WHOLE_REGION + (
      ("flip_prob", 0.0), ("jitter_prob", 1.0), ("jitter", (0.5, 0.0, 0.0, 0.0)))
  sizes = [[S, S]] * B
  frames = _padded(_random_frames(lo=20, hi=160), sizes)
  out = _denormalize(_pretrain(frames, overrides, sizes=sizes))
  ratio = out[:, :2] / frames[:, :, :S, :S].reshape(B, 2, T, S, S, 3)
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :, :1, :1, :1, :1],
                                                    ratio.shape), rtol=1e-4)
  factors = ratio[:, :, 0, 0, 0, 0]
  assert ((factors > 0.5) & (factors < 1.5)).all()
  assert np.abs(factors[:, 0] - factors[:, 1]).min() > 1e-3


def test_sharded_batch_matches_one_device():
  devices = jax.devices()
  assert len(devices) == 8, "tests/conftest.py should give 8 CPU devices"
  frames = _random_frames(8)
  sizes = np.array([[40, 48], [23, 31], [17, 45], [40, 20]] * 2, np.int32)
  mesh = Mesh(np.array(devices), ("data",))
  shard = NamedSharding(mesh, P("data"))
  got = _pretrain_fn()(jax.device_put(frames, shard), jax.random.key(5),
                       jax.device_put(sizes, shard))
  assert got.sharding.is_equivalent_to(shard, got.ndim)
  # Videos 0..2 live on devices 0..2 here, all on one device below: a video's
  # views depend on its global index only (and this reuses a compiled B = 3).
  want = _pretrain(frames[:B], key=5, sizes=sizes[:B])
  np.testing.assert_allclose(np.asarray(got)[:B], want, atol=1e-5)


def test_eval_views():
  config = _config()
  n = 2
  frames = RNG.integers(0, 256, (B, n, T, H, W, 3), dtype=np.uint8)
  sizes = np.array([[32, 48], [40, 48], [36, 30]])
  frames[1:] = 100
  frames = _padded(frames, sizes)
  out = np.asarray(jax.jit(lambda f, s: views.eval_views(f, config, s))(frames, sizes))
  assert out.shape == (B, n, T, S, S, 3)
  # Short side already S: the centre crop is the middle S columns, pixel for pixel.
  np.testing.assert_allclose(out[0], _expected(frames[0, :, :, :S, 8:8 + S], config),
                             atol=1e-5)
  # Resized regions of a flat grey stay flat grey: the padding is never read.
  np.testing.assert_allclose(out[1:], np.broadcast_to(_expected(np.uint8(100), config),
                                                      out[1:].shape), atol=1e-5)
  # Without sizes, the whole H x W canvas; no randomness.
  canvas = np.array([[H, W]])
  full = np.asarray(views.eval_views(frames[:1], config))
  np.testing.assert_allclose(full, np.asarray(views.eval_views(frames[:1], config, canvas)),
                             atol=1e-6)
  assert np.abs(full - np.asarray(views.eval_views(frames[:1], config, canvas[:, ::-1]))
                ).max() > 0.1  # (W, H) would be another crop


def test_blur_is_dm_pix_gaussian_blur_with_reflect_padding():
  # One compilation per kernel size (sigma traced): op by op took 17 s here.
  blur = jax.jit(views._gaussian_blur, static_argnums=2)  # pylint: disable=protected-access

  # What views.py ran before the blur became two matrices: torchvision's reflect
  # padding, then dm-pix's depthwise convolutions.
  @functools.partial(jax.jit, static_argnums=2)
  def reference(x, sigma, kernel_size):
    r = kernel_size // 2
    x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    return pix.gaussian_blur(x, sigma, kernel_size, padding="VALID")

  x = RNG.random((2, 12, 9, 3), np.float32)  # H != W: each axis its own matrix
  for sigma, kernel_size in ((0.1, 3), (0.7, 3), (1.3, 5), (5.0, 17)):
    np.testing.assert_allclose(blur(x, sigma, kernel_size), reference(x, sigma, kernel_size),
                               atol=1e-6)
  # Constant frames stay constant (the weights sum to 1 on every pixel, edges too).
  grey = np.full((1, 8, 8, 3), 0.3, np.float32)
  np.testing.assert_allclose(blur(grey, 1.5, 7), grey, atol=1e-6)
  with pytest.raises(ValueError, match="radius 9 cannot reflect at the edges of 9"):
    blur(x, 2.0, 19)
