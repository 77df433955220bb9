"""A few-minute demo on the built-in synthetic data set, sized for 2 CPU cores.

    python -m cvc_jax.main --config=configs/demo.py --workdir=/tmp/cvc_demo

Builds `synthetic_motion` (procedural videos with a static and a dynamic label) on
first use, then pretrains a width-8 R(2+1)D on 8-frame 32x32 clips with every loss
term of the paper (L_loc joins at epoch 2), then compares the pretrained encoder
with a randomly initialised one on the static and the dynamic label, by a linear
probe and by retrieval, and prints the table.
"""

from configs import common


def get_config(arg=None):
  c = common.base()
  c.input.dataset = "synthetic_motion"
  # 8 frames, not 4: with 4 the pretrained encoder stayed at chance on the
  # dynamic label (32.0 linear probe vs 22.7 for its initialisation, R@1 33.6 vs
  # 34.4). With 8 it is still not a reliable gain: seeds 0, 1, 2 gave 39.1 vs
  # 43.0, 29.7 vs 33.6, 46.1 vs 41.4 (linear) and R@1 48.4 vs 46.1, 39.1 vs 46.9,
  # 42.2 vs 43.0 (27 Nov 2026, README).
  c.input.num_frames = 8
  c.input.max_rate = 2.0
  c.input.raw_size = (40, 48)
  c.input.crop_size = 32
  # Milder augmentation than the paper's: on 32x32 synthetic clips whose classes
  # are colours and textures, hue jitter 0.25, grayscale 0.5 and blur left the
  # InfoNCE terms at chance for the whole demo (I_vv 2.80 = ln 16 at step 192);
  # with these it fell to 1.67.
  c.input.jitter = (0.4, 0.4, 0.4, 0.05)
  c.input.gray_prob = 0.1
  c.input.blur = False
  c.input.crop_area = (0.6, 1.0)
  # With short clips the reference's wrapped difference (frame 0 minus frame T-1)
  # is a large share of every d view and cancels the others' sum over time;
  # without it the probes went from 88.3 / 21.9 to 93.8 / 35.2 (static / dynamic,
  # 4-frame clips, lr 1e-3, one run each).
  c.input.diff_wrap = False
  c.batch_size = 16
  c.num_epochs = 12
  c.checkpoint_every_steps = 32
  c.log_every_steps = 8
  c.model.encoder.width = 8
  c.model.encoder.blocks = (1, 1, 1, 1)
  c.model.num_concepts = 8
  c.model.decoder_hidden = 64
  c.model.proj_hidden = 64
  c.model.proj_dim = 32
  c.loss.loc_topk = 2
  c.loss.loc_start_epoch = 2
  c.loss.queue_size = 128
  c.optim.decay_epochs = (10,)
  # I_vd weighs 6, not 1, and the run is 12 epochs, not 6: with the paper's
  # weights the static terms (I_vv, I_vs) win the small shared encoder and I_vd
  # stays near chance (4.7-5.2 of 2 ln 16 = 5.5 at step 192, seeds 0-2), so the
  # dynamic label is not learnt. I_vd alone learns it (seed 1: probe 79.7 vs 33.6
  # for the initialisation); weight 3 failed at seed 1 even over 12 epochs (33.6),
  # weight 6 over 6 epochs cost the static label (78.1 vs 82.8); weight 6 over 12
  # epochs bought both (27 Nov 2026, README).
  c.loss.weights.I_vd = 6.0
  # 3x the paper's rate: in 192 steps at 1e-3 the InfoNCE terms were still near
  # chance (I_vv 2.1 of ln 16 = 2.8); at 3e-3 I_vv reached 1.4 = ln 4, i.e. the
  # four static classes, by step 190.
  c.optim.lr = 3e-3
  # Afterwards: linear probe and retrieval on both labels, pretrained vs random.
  c.eval_after_pretraining = True
  c.init_from = ""
  c.eval.labels = ("label_static", "label_dynamic")
  return common.apply_variants(c, arg)
