"""Shared downstream settings (SPEC section 6); each eval config picks one.

    python -m cvc_jax.main --config=configs/eval/ucf101_linear.py \
        --config.init_from=PRETRAIN_WORKDIR_OR_WEIGHTS --workdir=DIR

`init_from` empty means a randomly initialised encoder: the baseline. The test
protocol is fixed by the paper: ten uniformly spaced 16-frame clips per video,
centre crop 112, softmax averaged over the clips. The training schedules below
are this project's choice (the paper does not give them): linear probe Adam 1e-3,
finetune Adam 1e-4, both 100 epochs with x0.1 at 60 and 80, L2 weight decay
1e-3 (on `fc` alone in the linear probe), dropout 0.5. Training clips get
pretraining's augmentation (random resized crop of 0.5-1 of the area, flip,
colour jitter 0.5/0.5/0.5/0.25) with grayscale at p 0.2 and no blur; every key
can be overridden (`--config.input.jitter_prob=0`, `--config.optim.name=adamw`).
"""

import ml_collections

from configs import common

# Dataset -> (TFDS name with builder config, test split).
DATASETS = {
    "ucf101": ("ucf101/split1", "test"),
    "hmdb51": ("hmdb51/split1", "test"),
    "diving48": ("diving48/v2", "test"),
}


def get_config(dataset: str, protocol: str, arg=None) -> ml_collections.ConfigDict:
  """The config of one downstream protocol ('linear', 'finetune', 'retrieval')."""
  c = common.base()
  c.mode = protocol
  c.init_from = ""
  c.input.dataset, c.eval.test_split = DATASETS[dataset]
  c.input.blur = False
  c.input.gray_prob = 0.2
  c.model.dropout = 0.5
  c.num_epochs = 100
  c.batch_size = 64
  c.optim.lr = 1e-4 if protocol == "finetune" else 1e-3
  c.optim.weight_decay = 1e-3
  c.optim.decay_epochs = (60, 80)
  c.log_every_steps = 50
  return common.apply_variants(c, arg)
