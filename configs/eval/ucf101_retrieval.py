"""Retrieval on ucf101 (SPEC section 6); see configs/eval/common.py.

    python -m cvc_jax.main --config=configs/eval/ucf101_retrieval.py \
        --config.init_from=PATH --workdir=DIR
"""

from configs.eval import common


def get_config(arg=None):
  return common.get_config("ucf101", "retrieval", arg)
