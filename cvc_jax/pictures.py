"""Pictures of concept attention with Pillow: overlays, PNG grids, GIFs, bar charts.

Used by `cvc_jax.visualize`; numpy and Pillow only.
"""

import json
import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_HEAT = np.array([[0, 0, 0], [120, 0, 160], [230, 40, 40], [255, 200, 0],
                  [255, 255, 255]], np.float32)  # black-purple-red-yellow-white


def _heat(values: np.ndarray) -> np.ndarray:
  """[...] in [0, 1] -> [..., 3] float RGB, a perceptual-ish "hot" colour map."""
  x = np.clip(values, 0, 1) * (len(_HEAT) - 1)
  lo = np.floor(x).astype(int).clip(0, len(_HEAT) - 2)
  f = (x - lo)[..., None]
  return _HEAT[lo] * (1 - f) + _HEAT[lo + 1] * f


def overlay(frame: np.ndarray, attention: np.ndarray, alpha: float = 0.6) -> np.ndarray:
  """A frame [H, W, 3] uint8 with an attention map [H, W] laid over it.

  The map is scaled to its own maximum, so the picture shows where a concept
  looks, not how strongly.
  """
  a = attention / max(float(attention.max()), 1e-12)
  mixed = (1 - alpha * a[..., None]) * frame + alpha * a[..., None] * _heat(a)
  return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _cell(image: np.ndarray, height: int) -> Image.Image:
  scale = max(1, round(height / image.shape[0]))
  return Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale),
                                       Image.NEAREST)


def _row(frame, maps, height):
  """One picture row: the frame, then each map [H, W] laid over it."""
  cells = [_cell(frame, height)] + [_cell(overlay(frame, m), height) for m in maps]
  w, h = cells[0].size
  row = Image.new("RGB", (len(cells) * (w + 2), h), "white")
  for i, cell in enumerate(cells):
    row.paste(cell, (i * (w + 2), 0))
  return row


def _with_header(row: Image.Image, labels, height=14) -> Image.Image:
  image = Image.new("RGB", (row.width, row.height + height), "white")
  image.paste(row, (0, height))
  draw = ImageDraw.Draw(image)
  for i, label in enumerate(labels):
    draw.text((i * row.width // len(labels) + 2, 1), label, fill="black")
  return image


def write_pictures(out: str, frames: np.ndarray, columns: list[tuple[str, np.ndarray]],
                   *, grid_frames: int = 8, cell_height: int = 128,
                   gif_height: int = 96) -> list[str]:
  """concepts.png (frames x concepts grid) and concepts.gif (every frame).

  Args:
    out: the folder.
    frames: uint8 [N, H, W, 3].
    columns: (label, attention [N, H, W]) per concept.
    grid_frames: rows of the PNG, evenly spaced over the video.
    cell_height, gif_height: pixels per frame in the PNG and in the GIF
      (frames are enlarged by whole factors).

  Returns:
    The paths written.
  """
  os.makedirs(out, exist_ok=True)
  labels = ["frame"] + [label for label, _ in columns]
  maps = np.stack([m for _, m in columns], axis=1)  # [N, C, H, W]
  picks = np.unique(np.linspace(0, len(frames) - 1, min(grid_frames, len(frames)))
                    .round().astype(int))
  rows = [_row(frames[i], maps[i], cell_height) for i in picks]
  grid = Image.new("RGB", (rows[0].width, len(rows) * (rows[0].height + 2)), "white")
  for j, row in enumerate(rows):
    grid.paste(row, (0, j * (row.height + 2)))
  paths = [os.path.join(out, "concepts.png"), os.path.join(out, "concepts.gif")]
  _with_header(grid, labels).save(paths[0])
  animated = [_with_header(_row(frames[i], maps[i], gif_height), labels)
              for i in range(len(frames))]
  animated[0].save(paths[1], save_all=True, append_images=animated[1:], duration=120,
                   loop=0)
  return paths



def write_histogram(out: str, usage: dict[str, Any], title: str) -> list[str]:
  """histogram.png (two bar charts over the 2K concepts) and histogram.json."""
  os.makedirs(out, exist_ok=True)
  share, mean = np.asarray(usage["top_share"]), np.asarray(usage["mean_code"])
  k = len(share) // 2
  bar, gap, height, left = max(4, 600 // len(share)), 2, 120, 40
  width = left + len(share) * (bar + gap) + 10
  image = Image.new("RGB", (width, 2 * height + 80), "white")
  draw = ImageDraw.Draw(image)
  draw.text((left, 4), title, fill="black")
  colours = ["#3b6fb6"] * k + ["#e07b39"] * k  # static blue, dynamic orange
  panels = (("share of videos where most active", share, 1.0),
            ("mean code", mean, max(float(np.abs(mean).max()), 1e-6)))
  for p, (name, values, top_value) in enumerate(panels):
    y0 = 24 + p * (height + 24)
    base = y0 + height if values.min() >= 0 else y0 + height // 2
    draw.text((left, y0 - 12), f"{name} (max {top_value:.2f})", fill="black")
    draw.line([(left, base), (width - 10, base)], fill="gray")
    scale = (base - y0) / top_value
    for i, v in enumerate(values):
      x = left + i * (bar + gap)
      y = base - v * scale
      draw.rectangle([x, min(y, base), x + bar - 1, max(y, base)], fill=colours[i])
  draw.text((left, 2 * height + 60), f"static S0..S{k - 1} (blue), dynamic D0..D{k - 1} "
            f"(orange); {usage['num_videos']} videos", fill="black")
  paths = [os.path.join(out, "histogram.png"), os.path.join(out, "histogram.json")]
  image.save(paths[0])
  with open(paths[1], "w") as f:
    json.dump(usage, f, indent=2)
  return paths
