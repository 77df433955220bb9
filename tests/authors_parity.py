"""Compares every loss term with the authors' own PyTorch code, at full size.

Not part of the suite (their code is not ours to ship): point it at a checkout of
github.com/shvdiwnkozbw/Self-supervised-Video-Concept and run

    python tests/authors_parity.py --authors_repo=PATH [--batch=2]

It builds their `GreatModel(50)` (R(2+1)D [1,1,1,1]), renormalises its prototypes
as their train loop does, computes the 13 terms of their train.py step on random
16x128x128 views at epoch 0 (no queue) and epoch 12 (their randn queue on, L_loc
on), converts the weights with `cvc_jax.convert.from_torch` and prints our terms
beside theirs with the relative difference.
"""

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import reference  # pylint: disable=g-import-not-at-top
from cvc_jax import convert, pretrain  # pylint: disable=g-import-not-at-top


def _nce(q, k):
  logits = F.normalize(q) @ F.normalize(k).detach().T / 0.07
  return F.cross_entropy(logits, torch.arange(q.shape[0]))


def their_terms(model, views, epoch, loc_start_epoch=10):
  """The step of their train.py, as numbers."""
  (prob, align_s, align_d, ent_s, ent_d, rec_v, rec_s, rec_d, loc_v, loc_s, loc_d), mi = (
      model(views, 1 if epoch > 0 else 0))
  v1, v2, vs1, vs2, vd1, vd2, sv1, sv2, dv1, dv2 = mi
  t = dict(
      I_vv=(_nce(v1, v2) + _nce(v2, v1)) / 2,
      I_vs=(_nce(vs1, sv2) + _nce(vs2, sv1) + _nce(sv1, vs2) + _nce(sv2, vs1)) / 2,
      I_vd=(_nce(vd1, dv2) + _nce(vd2, dv1) + _nce(dv1, vd2) + _nce(dv2, vd1)) / 2,
      align_s=align_s, align_d=align_d, entropy_s=ent_s, entropy_d=ent_d, rec_v=rec_v,
      rec_s=rec_s, rec_d=rec_d, loc_v=loc_v, loc_s=loc_s, loc_d=loc_d)
  t = {k: float(v) for k, v in t.items()}
  t["total"] = (sum(t[k] for k in ("I_vv", "I_vs", "I_vd", "align_s", "align_d", "rec_v",
                                   "rec_s", "rec_d")) + 0.1 * (t["entropy_s"] + t["entropy_d"]))
  if epoch >= loc_start_epoch:
    t["total"] += t["loc_v"] + t["loc_s"] + t["loc_d"]
  return t


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--authors_repo", required=True)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args()
  sys.path.insert(0, args.authors_repo)
  from model import GreatModel  # pylint: disable=g-import-not-at-top,import-error

  torch.manual_seed(0)
  model = GreatModel(50).train()
  with torch.no_grad():  # their train loop renormalises before every step
    for name in ("prototype", "prototype_s", "prototype_d"):
      weight = getattr(model, name).weight
      weight.copy_(F.normalize(weight, dim=1))
  views = torch.randn(args.batch, 6, 3, 16, 128, 128)
  config = reference.get_config()
  worst = 0.0
  for epoch in (0, 12):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
      want = their_terms(model, views, epoch)
    variables = convert.from_torch(state, config)
    got = pretrain.loss_terms(variables, views.permute(0, 1, 3, 4, 5, 2).numpy(), config,
                              queue=np.asarray(variables["queue"]), epoch=epoch)
    for name, value in want.items():
      rel = abs(got[name] - value) / max(abs(value), 1e-12)
      worst = max(worst, rel)
      print(f"epoch {epoch:2d}  {name:9s}  theirs {value: .6f}  ours {got[name]: .6f}  "
            f"rel {rel:.1e}")
  print(f"worst relative difference: {worst:.2e}")


if __name__ == "__main__":
  main()
