"""The authors' public PyTorch code's choices, for parity with their checkpoints.

    python -m cvc_jax.main --config=configs/reference.py --workdir=DIR

Where their code differs from the paper (SPEC.md): R(2+1)D with blocks [1,1,1,1],
128 px crops, sigma an MLP with BatchNorm, K = 50, top-10 valid concepts with the
strict ">" rule (keeps 9), local loss from epoch 10, no Gaussian blur, and a
grayscale that takes one random RGB channel per frame.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.input.crop_size = 128
  c.input.blur = False
  c.input.gray = "channel"
  c.model.encoder.blocks = (1, 1, 1, 1)
  c.model.sigma = "mlp"
  c.model.num_concepts = 50
  c.loss.loc_topk = 10
  c.loss.loc_topk_strict = True
  c.loss.loc_start_epoch = 10
  return common.apply_variants(c, arg)
