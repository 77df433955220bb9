"""Downstream metrics (SPEC section 6): clip-averaged accuracy and retrieval R@k.

Pure NumPy on host arrays gathered from all processes; every video is counted
once, identified by its index in the split.
"""

import numpy as np


def gather_by_video(video_index: np.ndarray, mask: np.ndarray, *values: np.ndarray,
                    num_videos: int):
  """Orders per-video rows by video index, dropping padding, each video once.

  Args:
    video_index: int [N] index of each row's video in the split.
    mask: [N] 1 for real rows, 0 for padding.
    *values: arrays [N, ...] to reorder.
    num_videos: the split's size.

  Returns:
    The arrays [num_videos, ...] in video order.

  Raises:
    ValueError: if a video is missing or counted twice.
  """
  keep = np.asarray(mask) > 0
  idx = np.asarray(video_index)[keep]
  counts = np.bincount(idx, minlength=num_videos)
  if len(counts) != num_videos or np.any(counts != 1):
    missing, twice = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    raise ValueError(f"Evaluation must see every video once: {len(missing)} missing "
                     f"(e.g. {missing[:5].tolist()}), {len(twice)} more than once "
                     f"(e.g. {twice[:5].tolist()}).")
  order = np.argsort(idx)
  return tuple(np.asarray(v)[keep][order] for v in values)


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           class_names=None) -> dict:
  """Top-1/top-5 accuracy, per-class accuracy and the confusion matrix.

  Args:
    probs: [V, C] clip-averaged softmax of each video.
    labels: int [V] true classes.
    class_names: optional names, for the per-class table.
  """
  num_classes = probs.shape[1]
  ranked = np.argsort(-probs, axis=1)
  top1 = float(np.mean(ranked[:, 0] == labels))
  top5 = float(np.mean(np.any(ranked[:, :min(5, num_classes)] == labels[:, None], axis=1)))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels, ranked[:, 0]), 1)
  support = confusion.sum(1)
  per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
  names = class_names or [str(i) for i in range(num_classes)]
  return dict(top1=top1, top5=top5, confusion=confusion.tolist(),
              per_class={n: (None if np.isnan(a) else float(a))
                         for n, a in zip(names, per_class)})


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_recall(query_features, query_labels, gallery_features, gallery_labels,
                     ks=(1, 5, 10, 20, 50)) -> dict:
  """R@k: the fraction of queries with a same-class video among their k nearest.

  Features are compared by cosine similarity (SPEC 6: test videos query the
  training videos).

  Args:
    query_features: [Q, D]; query_labels: int [Q].
    gallery_features: [G, D]; gallery_labels: int [G].
    ks: the k of each R@k; k larger than G counts the whole gallery.

  Returns:
    {'R@k': fraction} for each k.
  """
  sim = l2_normalize(np.asarray(query_features, np.float64)) @ l2_normalize(
      np.asarray(gallery_features, np.float64)).T
  ranked = np.argsort(-sim, axis=1, kind="stable")
  hits = np.asarray(gallery_labels)[ranked] == np.asarray(query_labels)[:, None]
  first_hit = np.where(hits.any(1), hits.argmax(1), np.inf)
  return {f"R@{k}": float(np.mean(first_hit < k)) for k in ks}


def confusion_png(confusion, path: str, cell: int = 0) -> None:
  """Writes the confusion matrix as a PNG heat map (row-normalised, white = 0)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  m = np.asarray(confusion, np.float64)
  m = m / np.maximum(m.sum(1, keepdims=True), 1)
  cell = cell or max(2, min(16, 800 // max(len(m), 1)))
  shade = (255 * (1 - m)).astype(np.uint8)
  rgb = np.stack([shade, shade, np.full_like(shade, 255)], -1)  # white -> blue
  Image.fromarray(np.kron(rgb, np.ones((cell, cell, 1), np.uint8))).save(path)
