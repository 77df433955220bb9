"""Defaults shared by every pretraining config, and the variant-string parser.

A config file's `get_config(arg)` starts from `base()` and applies the variants
named in `arg`, e.g. `--config=configs/ucf101.py:sigma=linear,runlocal`.
"""

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
  """The paper's defaults (SPEC sections 1-5), UCF-101 pretraining."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters and losses
  # What the encoder's backward pass recomputes to save memory (a larger batch, 224
  # px, R3D-34/50): "none" keeps every activation (fastest); "dots" keeps only
  # convolution outputs per residual block and recomputes BatchNorm and ReLU;
  # "blocks" keeps only each block's input (least memory, ~1 more forward pass).
  c.remat = "none"
  c.num_epochs = 300
  c.batch_size = 64  # global, over all devices and hosts
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 50

  c.input = ml_collections.ConfigDict()
  c.input.dataset = "ucf101"  # a TFDS name, e.g. "ucf101/split1", "synthetic_motion"
  c.input.data_dir = ""  # TFDS data_dir; "" = TFDS's default (~/tensorflow_datasets)
  c.input.split = "train"
  c.input.num_frames = 16  # T, frames per clip; two clips per video
  c.input.max_rate = 3.0  # r_max of the random frame rate (SPEC 1)
  # Decoded frames are padded (bottom/right) into a fixed raw_size [H, W] array for
  # batching, with each video's true size alongside; larger ones are centre-cropped.
  c.input.raw_size = (128, 228)
  c.input.crop_size = 112  # S
  c.input.crop_area = (0.5, 1.0)  # random resized crop: area fraction range
  c.input.crop_aspect = (3 / 4, 4 / 3)  # and aspect-ratio range
  c.input.flip_prob = 0.5
  c.input.gray_prob = 0.5
  # "luma" (ITU-R 601, SPEC 1) or "channel": one random RGB channel per frame, what
  # the authors' code calls grayscale (a static view's T copies then differ).
  c.input.gray = "luma"
  c.input.jitter = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
  c.input.jitter_prob = 1.0
  c.input.blur = True  # Gaussian blur (supplementary); the reference has none
  c.input.blur_prob = 0.5
  c.input.blur_sigma = (0.1, 2.0)
  c.input.mean = (0.485, 0.456, 0.406)
  c.input.std = (0.229, 0.224, 0.225)
  c.input.diff_wrap = True  # d = v - roll(v, 1): frame 0 minus frame T-1 (reference)
  # The static views' crop and flip: "own" (drawn apart from v's, as the authors'
  # code does; SPEC 1) or "clip" (those of the RGB clip the frame comes from, as the
  # supplementary describes). Colour, grayscale and blur are always their own.
  c.input.static_crop = "own"
  c.input.prefetch = 2  # batches prepared ahead on the host
  # Decoding: 0 = threads of this process; N = N worker processes (grain's), for
  # hosts whose threads do not keep the cores busy (README, input pipeline).
  c.input.num_workers = 0
  c.input.num_threads = 0  # decoding threads; 0 = this process's cores, at most 16

  c.model = ml_collections.ConfigDict()
  c.model.encoder = ml_collections.ConfigDict(
      dict(arch="r2plus1d", blocks=(2, 2, 2, 2), width=64, depth=18, bottleneck=False))
  # How convolutions run, same parameters either way: "3d", "3d_pad8" (channels
  # zero-padded to a multiple of 8, for cuDNN; not yet timed), "2d1d" ((1,k,k) and
  # (k,1,1) kernels as 2D convolutions, kernel gradients written for XLA's CPU
  # backend), "2d" (the same with XLA's gradients, for cuDNN; not yet timed) or
  # "auto" (the one measured faster on the backend: 2d1d on CPU, 3d on GPU/TPU;
  # benchmarks/RESULTS.md).
  c.model.encoder.conv_impl = "auto"
  # How the stem's first convolution runs: "conv" (as conv_impl says),
  # "space_to_depth" (2x2 pixels to 12 channels, a 4x4 kernel at stride 1; same
  # parameters and function) or "auto" (space_to_depth for 16-bit compute on
  # NVIDIA GPUs, where it was measured faster, else conv; convolutions.STEM_IMPLS).
  c.model.encoder.stem_impl = "auto"
  c.model.separate_encoders = False
  c.model.num_concepts = 50  # K per kind (K_s = K_d)
  c.model.sigma = "identity"  # identity | linear | mlp
  # The concept space's width; unset: the encoder's feature width D (512 for
  # R(2+1)D-18, as the paper; the only width identity sigma allows).
  c.model.sigma_dim = config_dict.placeholder(int)
  c.model.decoder_hidden = 512  # 0: linear decoder
  c.model.proj_hidden = 512
  c.model.proj_dim = 128

  c.loss = ml_collections.ConfigDict()
  c.loss.nce_temperature = 0.07
  c.loss.concept_temperature = 0.1  # tau
  c.loss.sinkhorn_eps = 0.05
  c.loss.sinkhorn_iters = 3
  # Weight of each term in the total loss (SPEC 4: 1, but 0.1 for the entropy
  # terms); the loc_* terms also wait for loc_start_epoch. A weight of 0 drops a
  # term from the gradient; it is still computed and logged.
  c.loss.weights = ml_collections.ConfigDict({
      "I_vv": 1.0, "I_vs": 1.0, "I_vd": 1.0, "align_s": 1.0, "align_d": 1.0,
      "entropy_s": 0.1, "entropy_d": 0.1, "rec_v": 1.0, "rec_s": 1.0, "rec_d": 1.0,
      "loc_v": 1.0, "loc_s": 1.0, "loc_d": 1.0})
  c.loss.loc_topk = 5  # K_valid: 10% of the K = 50 concepts
  c.loss.loc_topk_strict = False  # reference: ">" against the k-th value
  c.loss.loc_margin = 1.4
  c.loss.loc_start_epoch = 5  # L_loc joins the total from this epoch on
  c.loss.queue_size = 1024
  c.loss.queue_start_epoch = 1  # the Sinkhorn uses the queue from this epoch on
  c.loss.freeze_prototypes_epochs = 1  # prototypes get no update in epoch 0

  # Downstream evaluation (SPEC 6), used by the eval configs and the demo.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_clips = 10  # uniformly spaced test clips per video
  c.eval.train_split = "train"
  c.eval.test_split = "test"
  c.eval.recall_ks = (1, 5, 10, 20, 50)
  c.eval.labels = ("label",)  # label features of the data set to evaluate on
  c.eval.linear_fast = ml_collections.ConfigDict(
      dict(lr=1e-2, weight_decay=1e-4, steps=500))  # probe on extracted features

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"  # adam: L2 added to the gradient (torch Adam); adamw
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 1e-5
  c.optim.decay_epochs = (200,)  # lr x decay_factor at each
  c.optim.decay_factor = 0.1
  return c


def runlocal(c: ml_collections.ConfigDict, keep_blocks: bool = False) -> None:
  """Shrinks a config to a CPU-sized model: width 8, 4 frames of 32x32.

  Blocks per stage drop to (1, 1, 1, 1) unless `keep_blocks` (a backbone variant
  chose them, and the variant is what is being tried).
  """
  c.batch_size = 8
  c.num_epochs = 2
  c.log_every_steps = 1
  c.input.num_frames = 4
  c.input.raw_size = (40, 48)
  c.input.crop_size = 32
  c.model.encoder.width = 8
  if not keep_blocks:
    c.model.encoder.blocks = (1, 1, 1, 1)
  c.model.num_concepts = 8
  c.model.decoder_hidden //= 16  # 512 -> 32; the variants' 128 -> 8, linear stays 0
  c.model.proj_hidden = 32
  c.model.proj_dim = 16
  c.loss.queue_size = 32
  c.loss.loc_topk = -(-c.loss.loc_topk * 4 // 5)  # 4/5, rounded up: 2, 5, 10 -> 2, 4, 8


# Ablation rows of the supplementary, each a named variant: name -> (key, value).
ABLATIONS = {
    "sigma": lambda c, v: setattr(c.model, "sigma", v),  # identity | linear | mlp
    "decoder": lambda c, v: setattr(
        c.model, "decoder_hidden", {"linear": 0, "128": 128, "512": 512}[v]),
    "topk": lambda c, v: setattr(c.loss, "loc_topk", int(v)),
    "encoders": lambda c, v: setattr(
        c.model, "separate_encoders", {"shared": False, "separate": True}[v]),
    "backbone": lambda c, v: _backbone(c, v),  # BACKBONES
}

# Supplementary Table 4, and SPEC 2's R3D-50 (torchvision layout, bottleneck
# blocks, D = 2048): name -> (encoder keys, crop size, raw frame size).
BACKBONES = {
    "r2plus1d18": (dict(arch="r2plus1d", blocks=(2, 2, 2, 2), bottleneck=False),
                   112, (128, 228)),
    "r2plus1d18_224": (dict(arch="r2plus1d", blocks=(2, 2, 2, 2), bottleneck=False),
                       224, (256, 456)),
    "r3d34": (dict(arch="r3d", blocks=(3, 4, 6, 3), bottleneck=False), 112, (128, 228)),
    "r3d50": (dict(arch="r3d", blocks=(3, 4, 6, 3), bottleneck=True), 112, (128, 228)),
}


def _backbone(c, name):
  encoder, crop, raw = BACKBONES[name]
  c.model.encoder.update(encoder)
  c.input.crop_size, c.input.raw_size = crop, raw


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   applied: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Applies a comma-separated variant string ("sigma=mlp,runlocal") and locks.

  `runlocal` is applied last, whatever its position, so it shrinks the sizes a
  variant chose. `applied` names variants the caller has applied itself.
  """
  items = [item.partition("=") for item in filter(None, (arg or "").split(","))]
  for name, _, value in items:
    if name == "runlocal" or name in applied:
      continue
    if name not in ABLATIONS:
      raise ValueError(f"Unknown config variant {name!r}; known: "
                       f"{', '.join(('runlocal',) + applied + tuple(sorted(ABLATIONS)))}.")
    try:
      ABLATIONS[name](c, value)
    except KeyError:
      raise ValueError(f"Config variant {name}={value}: unknown value {value!r}.") from None
  names = [name for name, _, _ in items]
  if "runlocal" in names:
    runlocal(c, keep_blocks="backbone" in names)
  c.lock()
  return c
