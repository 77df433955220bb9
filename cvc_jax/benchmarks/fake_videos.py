"""Fake UCF-101-like videos for benchmarks: 320 x 240 XviD .avi at 25 fps.

What matters for the input pipeline is the stored JPEG frames' size and
count, so the videos have UCF-101's frame size, rate and average length
(about 7 s), and content that compresses like camera footage: a smooth
textured background that pans, moving shapes, and sensor noise. (Pure noise
would make JPEGs several times larger than real frames; flat colour far
smaller.)
"""

import concurrent.futures
import csv
import multiprocessing
import os

import av
import numpy as np

HEIGHT, WIDTH, FPS = 240, 320, 25
MEAN_FRAMES = 180


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Low-frequency colour texture, float [height, width, 3] in 0..255."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.zeros((height, width, 3), np.float32) + rng.uniform(60, 160, 3)
  for _ in range(12):
    fy, fx = rng.uniform(0.005, 0.3, 2) * rng.choice([-1, 1], 2)
    phase = rng.uniform(0, 2 * np.pi)
    image += (rng.uniform(-30, 30, 3) *
              np.sin(fy * y + fx * x + phase)[..., None])
  return image


def write_video(path: str, seed: int) -> int:
  """Writes one fake video; returns its frame count."""
  rng = np.random.default_rng(seed)
  num_frames = int(rng.integers(MEAN_FRAMES // 2, MEAN_FRAMES * 3 // 2))
  pan = rng.uniform(-1.5, 1.5, 2)
  margin = int(np.ceil(np.abs(pan).max() * num_frames)) + 1
  scene = _background(rng, HEIGHT + 2 * margin, WIDTH + 2 * margin)
  shapes = [(rng.uniform(0, HEIGHT, 2) * [1, WIDTH / HEIGHT],
             rng.uniform(-3, 3, 2), rng.integers(10, 50), rng.uniform(0, 255, 3))
            for _ in range(4)]
  # Sensor noise from a small bank: drawing it anew per frame is the slowest
  # part of writing, and a repeating pattern compresses the same.
  noise = rng.normal(0, 5, (8, HEIGHT, WIDTH, 3)).astype(np.float32)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(path, "w", format="avi") as container:
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.codec_context.codec_tag = "XVID"
    stream.bit_rate = 600_000  # UCF-101's files: about 0.5-0.7 Mbit/s.
    for t in range(num_frames):
      top, left = (margin + pan * t).astype(int)
      frame = scene[top:top + HEIGHT, left:left + WIDTH].copy()
      for centre, velocity, radius, colour in shapes:
        cy, cx = (centre + velocity * t) % [HEIGHT, WIDTH]
        top, left = int(max(0, cy - radius)), int(max(0, cx - radius))
        patch = frame[top:int(cy + radius) + 1, left:int(cx + radius) + 1]
        py, px = np.ogrid[top:top + patch.shape[0], left:left + patch.shape[1]]
        patch[(py - cy) ** 2 + (px - cx) ** 2 < radius ** 2] = colour
      frame += noise[t % len(noise)]
      image = np.clip(frame, 0, 255).astype(np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, "rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return num_frames


def write_folder(root: str, num_videos: int, num_classes: int = 8) -> None:
  """`num_videos` fake videos in the video_folder layout (2/3 train, 1/3 test).

  Videos already there are kept, so a second run reuses them.
  """
  rows = []
  with concurrent.futures.ProcessPoolExecutor(
      mp_context=multiprocessing.get_context("spawn")) as pool:
    for i in range(num_videos):
      label = f"class_{i % num_classes:02d}"
      path = f"{label}/v_{i:05d}.avi"
      if not os.path.exists(os.path.join(root, path)):
        pool.submit(write_video, os.path.join(root, path), seed=i)
      rows.append({"path": path, "label": label,
                   "split": "test" if i % 3 == 2 else "train"})
  with open(os.path.join(root, "annotations.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, ["path", "label", "split"])
    writer.writeheader()
    writer.writerows(rows)
