"""Writes notebooks/cvc_jax_colab.ipynb from the cells below (edit here, rerun).

    python notebooks/build_notebook.py

The notebook is generated, so its JSON stays free of outputs and execution counts
and every change is reviewed as Python. tests/test_notebook.py executes it.
"""

import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))

INTRO = """\
# cvc_jax: static and dynamic concepts, end to end

A JAX/Flax implementation of *Static and Dynamic Concepts for Self-supervised Video
Representation Learning* (Qian, Ding, Liu, Lin, ECCV 2022). This notebook installs the
project, builds the synthetic data set (procedural videos of one moving object, with a
static and a dynamic label), pretrains the small demo model, runs the linear probe,
draws where the most active concepts look, and exports the encoder.

**In Colab:** *Runtime > Change runtime type* picks a TPU, a GPU or the CPU; set
`REPO_URL` in the next cell to a git URL of this repository (your fork or mirror),
then *Runtime > Run all*. The sizes below are the demo's (its pretraining and
evaluation take about 4 minutes on 2 CPU cores, much less on an accelerator). Run
inside a clone of the repository (as CI does), the notebook uses that clone and
needs no URL."""

PARAMETERS = """\
# Parameters (papermill-style: CI replaces them with smaller sizes).
REPO_URL = ""  # git URL of cvc_jax, for Colab; unused inside a clone
WORKDIR = "/tmp/cvc_colab"  # checkpoints, TensorBoard events, results, pictures
DATA_DIR = "/tmp/cvc_colab/tfds"  # where the synthetic data set is built
DATASET = "synthetic_motion"  # 512 train / 128 test videos; "synthetic_motion/tiny": 16 / 8
NUM_EPOCHS = 12  # pretraining epochs (the demo's 12: 384 steps)
BATCH_SIZE = 16  # global; a multiple of the number of devices
NUM_CLIPS = 10  # evaluation clips per video (SPEC 6)
VIDEO_INDEX = 11  # synthetic test video to draw the concepts on (a horizontal mover)"""

INSTALL = """\
# Install: use the clone this notebook runs in, or clone REPO_URL (Colab).
import glob
import os
import subprocess
import sys


def find_repo(start):
  path = os.path.abspath(start)
  while path != os.path.dirname(path):
    if os.path.exists(os.path.join(path, "cvc_jax", "main.py")):
      return path
    path = os.path.dirname(path)
  return None


REPO = find_repo(os.getcwd())
if REPO is None:
  if not REPO_URL:
    raise ValueError("Not inside a clone of cvc_jax: set REPO_URL in the parameters "
                     "cell to a git URL of the repository and run again.")
  if not os.path.isdir("cvc_jax_repo"):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "cvc_jax_repo"], check=True)
  REPO = os.path.abspath("cvc_jax_repo")
try:
  import clu, flax, grain, orbax.checkpoint, tensorflow_datasets  # noqa: F401
except ImportError:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{REPO}[data]"],
                 check=True)
  if os.environ.get("COLAB_TPU_ADDR") or glob.glob("/dev/accel*"):
    # A TPU runtime: JAX with the matching libtpu.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax[tpu]"], check=True)
os.chdir(REPO)  # configs/ and `python -m cvc_jax...` are read from the repository root
sys.path.insert(0, REPO)
print("cvc_jax from", REPO)"""

DEVICES = """\
# Which accelerator: TPU, GPU or CPU.
import jax

kind = {"tpu": "TPU", "gpu": "GPU", "cpu": "CPU"}.get(jax.default_backend(),
                                                      jax.default_backend())
print(f"Running on {kind}: {jax.device_count()} device(s), {jax.devices()[0].device_kind}")
if BATCH_SIZE % jax.device_count():
  BATCH_SIZE = jax.device_count() * max(1, BATCH_SIZE // jax.device_count())
  print("Batch size rounded to a multiple of the devices:", BATCH_SIZE)"""

DATA = """\
# Build the synthetic data set (once; TFDS shows its progress).
from configs import demo
from cvc_jax import datasets

config = demo.get_config()
with config.unlocked():
  config.input.dataset, config.input.data_dir = DATASET, DATA_DIR
  config.num_epochs, config.batch_size = NUM_EPOCHS, BATCH_SIZE
  config.eval.num_clips = NUM_CLIPS
builder = datasets.ensure_built(config)
print({split: info.num_examples for split, info in builder.info.splits.items()})"""

PRETRAIN_MD = """\
## Pretraining

The same command as on any machine (it resumes if run again); clu reports the loss
terms, steps per second and the time left."""

PRETRAIN = """\
import collections

overrides = [f"--config.input.dataset={DATASET}", f"--config.input.data_dir={DATA_DIR}",
             f"--config.num_epochs={NUM_EPOCHS}", f"--config.batch_size={BATCH_SIZE}",
             "--config.eval_after_pretraining=False"]
command = [sys.executable, "-m", "cvc_jax.main", "--config=configs/demo.py",
           f"--workdir={WORKDIR}", *overrides]
print(" ".join(command))
last = collections.deque(maxlen=40)
with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                      text=True) as run:
  for line in run.stdout:  # the progress lines and the loss terms, as they come
    last.append(line)
    if "logging_writer" in line or "Resumed" in line:
      print(line.rstrip()[-220:])
if run.returncode:
  print("".join(last))
  raise RuntimeError(f"Pretraining failed (exit code {run.returncode}).")"""

PROBE_MD = """\
## Linear probe and retrieval

The pretrained encoder against the same encoder at its initialisation, on the static
label (what is seen) and on the dynamic label (how it moves)."""

PROBE = """\
from IPython.display import Markdown, display
from cvc_jax.downstream import demo as demo_eval

table = demo_eval.compare(config, WORKDIR)
display(Markdown(table))"""

CONCEPTS_MD = """\
## Where the concepts look

For one synthetic video: the attention of the three most active static concepts (on
still frames) and dynamic concepts (on frame differences) over the encoder's feature
map, laid over the frames. Then how often each concept is the most active one over the
test videos. The same as `python -m cvc_jax.visualize --init_from=WORKDIR
--video=FILE --out=DIR [--dataset=...]`."""

CONCEPTS = """\
import numpy as np
from IPython.display import Image
from cvc_jax import concepts
from cvc_jax import visualize
from tfds_builders.synthetic_motion import synthetic_motion_dataset_builder as motion

video = os.path.join(WORKDIR, "video.npy")
np.save(video, motion.make_video("test", VIDEO_INDEX)["video"])
picture_dir = os.path.join(WORKDIR, "concepts")
loaded = concepts.load(WORKDIR)  # (config, models, variables): read once, used twice
drawn = visualize.draw(*loaded, video, picture_dir)
print("most active static concepts:", drawn["static"][0], "dynamic:", drawn["dynamic"][0])
display(Image(filename=os.path.join(picture_dir, "concepts.png"), width=700))
display(Image(filename=os.path.join(picture_dir, "concepts.gif"), width=700))"""

HISTOGRAM = """\
from cvc_jax import pictures

usage = concepts.concept_usage(*loaded, dataset=DATASET, split="test",
                               data_dir=DATA_DIR, num_clips=NUM_CLIPS)
png, _ = pictures.write_histogram(picture_dir, usage, f"{DATASET} test")
display(Image(filename=png))"""

EXPORT_MD = """\
## Export the encoder

An orbax checkpoint with its architecture in `encoder.json`, restorable with
`cvc_jax.models` alone, and a torchvision-layout state dict for PyTorch
(`python -m cvc_jax.export --workdir=WORKDIR --out=PATH [--format=torch]`)."""

EXPORT = """\
from cvc_jax import export
from cvc_jax.models import exported

folder = os.path.join(WORKDIR, "encoder")
if not exported.is_exported(folder):
  export.export(WORKDIR, folder)
module, encoder_vars = exported.load_encoder(folder)
size = config.input.crop_size
clips = np.zeros((1, config.input.num_frames, size, size, 3), np.float32)
pooled, feature_map = module.apply(encoder_vars, clips, train=False)
print("restored", exported.read_info(folder)["encoder"], "features", pooled.shape,
      "feature map", feature_map.shape)
torch_path = os.path.join(WORKDIR, "r2plus1d")  # an export never replaces one
if not os.path.exists(torch_path + ".safetensors"):
  print("wrote", export.export(WORKDIR, torch_path, fmt="torch"))"""


def build() -> nbformat.NotebookNode:
  cells = [v4.new_markdown_cell(INTRO)]
  params = v4.new_code_cell(PARAMETERS)
  params.metadata["tags"] = ["parameters"]
  cells += [params, v4.new_code_cell(INSTALL), v4.new_code_cell(DEVICES),
            v4.new_code_cell(DATA), v4.new_markdown_cell(PRETRAIN_MD),
            v4.new_code_cell(PRETRAIN), v4.new_markdown_cell(PROBE_MD),
            v4.new_code_cell(PROBE), v4.new_markdown_cell(CONCEPTS_MD),
            v4.new_code_cell(CONCEPTS), v4.new_code_cell(HISTOGRAM),
            v4.new_markdown_cell(EXPORT_MD), v4.new_code_cell(EXPORT)]
  for i, cell in enumerate(cells):
    cell.id = f"cell-{i}"  # stable ids: a rebuild changes only what was edited
  notebook = v4.new_notebook(cells=cells)
  notebook.metadata.update(
      kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
      language_info={"name": "python"},
      colab={"name": "cvc_jax_colab.ipynb", "provenance": []},
      accelerator="TPU")
  return notebook


if __name__ == "__main__":
  path = os.path.join(HERE, "cvc_jax_colab.ipynb")
  nbformat.write(build(), path)
  print("Wrote", path)
