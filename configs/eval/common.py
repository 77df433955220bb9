"""Shared downstream settings (SPEC section 6); each eval config picks one.

    python -m cvc_jax.main --config=configs/eval/ucf101_linear.py \
        --config.init_from=PRETRAIN_WORKDIR_OR_WEIGHTS --workdir=DIR

`init_from` empty means a randomly initialised encoder: the baseline. The test
protocol is fixed by the paper: ten uniformly spaced 16-frame clips per video,
centre crop 112, softmax averaged over the clips. The training schedules below
are this project's choice (the paper does not give them): linear probe Adam 1e-3,
finetune Adam 1e-4, both 100 epochs with x0.1 at 60 and 80, L2 weight decay
1e-3 (on the head alone in the linear probe), dropout 0.5. Training clips get
pretraining's augmentation (random resized crop of 0.5-1 of the area, flip,
colour jitter 0.5/0.5/0.5/0.25) with grayscale at p 0.2 and no blur; every key
can be overridden (`--config.input.jitter_prob=0`, `--config.optim.name=adamw`).

The variant `coclr` (`--config=configs/eval/ucf101_linear.py:coclr`) switches to
what CoCLR's evaluation code does, which the authors' README says their numbers
follow: linear probe features L2-normalised, then a trained BatchNorm, then the
linear layer, no dropout; finetune dropout 0.9; training crops of 0.2-1 of the
area, colour jitter 0.4/0.4/0.4/0.1 with p 0.3, no grayscale; retrieval features
L2-normalised per clip, averaged, each split's mean subtracted, then cosine. The
test clips stay SPEC 6's, and the schedules stay these.
"""

import ml_collections

from configs import common

# Dataset -> (TFDS name with builder config, test split).
DATASETS = {
    "ucf101": ("ucf101/split1", "test"),
    "hmdb51": ("hmdb51/split1", "test"),
    "diving48": ("diving48/v2", "test"),
}


# Variants of configs/common.py that change only the pretraining model or losses.
PRETRAINING_ONLY = {"sigma", "decoder", "topk", "encoders"}


def get_config(dataset: str, protocol: str, arg=None) -> ml_collections.ConfigDict:
  """The config of one downstream protocol ('linear', 'finetune', 'retrieval')."""
  c = common.base()
  c.mode = protocol
  c.init_from = ""
  c.input.dataset, c.eval.test_split = DATASETS[dataset]
  c.input.blur = False
  c.input.gray_prob = 0.2
  c.model.dropout = 0.5
  c.model.head_l2_norm = False  # L2-normalise the pooled features before the head
  c.model.head_batch_norm = False  # a trained BatchNorm before the linear layer
  # "mean": each video's clip-averaged features, compared by cosine (SPEC 6);
  # "centred": clips L2-normalised before averaging, each split's mean removed.
  c.eval.retrieval_features = "mean"
  c.num_epochs = 100
  c.batch_size = 64
  c.optim.lr = 1e-4 if protocol == "finetune" else 1e-3
  c.optim.weight_decay = 1e-3
  c.optim.decay_epochs = (60, 80)
  c.log_every_steps = 50
  names = [item.partition("=")[0] for item in (arg or "").split(",")]
  unused = sorted(set(names) & PRETRAINING_ONLY)
  if unused:
    raise ValueError(f"Config variant {unused[0]!r} changes pretraining only and would "
                     "do nothing here: the encoder comes from init_from (or, random, "
                     "from model.encoder and the backbone= variant).")
  if "coclr" in names:
    _coclr(c, protocol)
  return common.apply_variants(c, arg, applied=("coclr",))


def _coclr(c: ml_collections.ConfigDict, protocol: str) -> None:
  """CoCLR's evaluation settings (module docstring)."""
  c.input.crop_area = (0.2, 1.0)
  c.input.jitter = (0.4, 0.4, 0.4, 0.1)
  c.input.jitter_prob = 0.3
  c.input.gray_prob = 0.0
  if protocol == "linear":
    c.model.head_l2_norm = c.model.head_batch_norm = True
    c.model.dropout = 0.0
  elif protocol == "finetune":
    c.model.dropout = 0.9
  c.eval.retrieval_features = "centred"
