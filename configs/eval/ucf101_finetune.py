"""Finetune on ucf101 (SPEC section 6); see configs/eval/common.py.

    python -m cvc_jax.main --config=configs/eval/ucf101_finetune.py \
        --config.init_from=PATH --workdir=DIR
"""

from configs.eval import common


def get_config(arg=None):
  return common.get_config("ucf101", "finetune", arg)
