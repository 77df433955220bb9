"""Pretraining on Kinetics-400 (train split) with the paper's defaults.

    python -m cvc_jax.main --config=configs/kinetics400.py --workdir=DIR

As configs/ucf101.py but K = 100 concepts per kind and 100 epochs with the
learning rate x0.1 at epoch 70 (SPEC section 5). Same variants as ucf101.py.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.input.dataset = "kinetics400"
  c.model.num_concepts = 100
  c.loss.loc_topk = 10  # 10% of K
  c.num_epochs = 100
  c.optim.decay_epochs = (70,)
  return common.apply_variants(c, arg)
