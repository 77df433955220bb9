"""Downstream metrics on hand-made cases (SPEC 6)."""

import numpy as np
import pytest

from cvc_jax.downstream import metrics


def test_retrieval_recall_on_a_toy_case():
  # Gallery on a circle; queries' nearest neighbours by cosine are known.
  angle = lambda d: [np.cos(np.radians(d)), np.sin(np.radians(d))]
  gallery = np.array([angle(0), angle(10), angle(90), angle(180), angle(230)])
  g_labels = np.array([0, 1, 2, 3, 4])
  queries = np.array([angle(2), angle(100), angle(175)])
  q_labels = np.array([1, 4, 0])
  # Angular distances (no ties): query 2 deg -> 0,10,90,180,230: label 1 at rank 2.
  # Query 100 deg -> 90,180,10,0,230: label 4 at rank 5.
  # Query 175 deg -> 180,230,90,10,0: label 0 at rank 5.
  got = metrics.retrieval_recall(queries, q_labels, gallery, g_labels, ks=(1, 2, 4, 5, 50))
  assert got == {"R@1": 0.0, "R@2": 1 / 3, "R@4": 1 / 3, "R@5": 1.0, "R@50": 1.0}
  values = list(got.values())
  assert values == sorted(values)  # monotone in k


def test_retrieval_is_scale_invariant():
  rng = np.random.default_rng(0)
  g, q = rng.normal(size=(30, 8)), rng.normal(size=(10, 8))
  gl, ql = rng.integers(0, 3, 30), rng.integers(0, 3, 10)
  a = metrics.retrieval_recall(q, ql, g, gl)
  b = metrics.retrieval_recall(5 * q, ql, 0.1 * g, gl)
  assert a == b


def test_classification_metrics_by_hand():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
  labels = np.array([0, 1, 1, 2])
  got = metrics.classification_metrics(probs, labels, ["a", "b", "c"])
  assert got["top1"] == 0.5 and got["top5"] == 1.0
  assert got["confusion"] == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]
  assert got["per_class"] == {"a": 1.0, "b": 0.0, "c": 1.0}
  # Top-5 over 7 classes: the true class ranked 5th counts, 6th does not.
  ranks = np.array([[0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05]] * 2)
  top5 = metrics.classification_metrics(ranks, np.array([4, 5]), list("abcdefg"))["top5"]
  assert top5 == 0.5


def test_gather_counts_each_video_once():
  idx = np.array([2, 0, 1, 0, 3])
  mask = np.array([1, 1, 1, 0, 1])  # the second row of video 0 is padding
  (vals,) = metrics.gather_by_video(idx, mask, np.array([20, 0, 10, 99, 30]), num_videos=4)
  np.testing.assert_array_equal(vals, [0, 10, 20, 30])
  with pytest.raises(ValueError, match="1 missing"):
    metrics.gather_by_video(idx, mask, idx, num_videos=5)
  with pytest.raises(ValueError, match="more than once"):
    metrics.gather_by_video(idx, np.ones(5), idx, num_videos=4)


def test_confusion_png(tmp_path):
  from PIL import Image
  path = str(tmp_path / "c.png")
  metrics.confusion_png([[2, 0], [1, 1]], path, cell=4)
  img = np.asarray(Image.open(path))
  assert img.shape == (8, 8, 3)
  assert tuple(img[0, 0]) == (0, 0, 255) and tuple(img[0, 7]) == (255, 255, 255)
