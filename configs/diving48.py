"""Pretraining on Diving-48 (V2 train split).

    python -m cvc_jax.main --config=configs/diving48.py --workdir=DIR

The paper pretrains on Diving-48 with the UCF-101 recipe; this config keeps K = 50
and the 300-epoch schedule (x0.1 at 200). Same variants as ucf101.py.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.input.dataset = "diving48"
  return common.apply_variants(c, arg)
