"""Pretraining on UCF-101 split 1 with the paper's defaults.

    python -m cvc_jax.main --config=configs/ucf101.py --workdir=DIR

R(2+1)D-18 (blocks [2,2,2,2]) at 16x112x112, K = 50 concepts per kind, sigma
identity, decoder 512, K_valid 5, local loss from epoch 5, Adam 1e-3 for 300
epochs with x0.1 at 200. The supplementary reports a UCF-101 linear probe of
72.1% (HMDB-51 45.9%) after 100 epochs of this setup.

Variants (comma separated after ":"): sigma=identity|linear|mlp,
decoder=linear|128|512, topk=2|5|10, encoders=shared|separate,
backbone=r2plus1d18|r2plus1d18_224|r3d34, runlocal.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.input.dataset = "ucf101"
  return common.apply_variants(c, arg)
