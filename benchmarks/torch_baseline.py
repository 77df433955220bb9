r"""PyTorch baseline: the authors' pretraining step on random views, timed.

    python benchmarks/torch_baseline.py --batch_size=2 --frames=16 --size=128 \
        --blocks=1,1,1,1 --concepts=50 --sigma=mlp [--amp bf16] [--channels_last] \
        [--compile] [--keep_host_memory] [--json FILE]
    python benchmarks/torch_baseline.py --config=configs/ucf101.py --batch_size=16

One step is what the authors' `train.py` does per batch: the prototypes
renormalised, the six views of B videos through one R(2+1)D as one batch of 6B
clips, the five projections, sigma, codes, decoders and the local concept
aggregation, every loss term of SPEC section 4 (queue in the Sinkhorn, L_loc in
the total), backward, Adam with L2 weight decay, and the queue push. The views
arrive already built and on the device: the authors build them in their data
loader's CPU workers, so unlike `python -m cvc_jax.benchmark` this times no view
construction.

The model is `tests/torch_reference` (an independent re-implementation of the
authors' `model.py` with torchvision's R(2+1)D layout); `--encoder=torchvision`
uses torchvision's own `VideoResNet` instead where torchvision is installed. The
loss is composed here without host synchronisation (the oracle's `loss_terms`
reads every term back as a float), so a step runs asynchronously on a GPU and
compiles as one graph.

Prints the same table as `cvc_jax.benchmark`; FLOPs come from
`torch.utils.flop_counter` (matrix products and convolutions, forward and
backward) on one eager step.
"""

import argparse
import importlib.util
import os
import resource
import sys
import time

# The table code lives in cvc_jax.benchmark, which imports JAX: keep JAX off the
# GPU so it cannot take the memory this process measures.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# glibc malloc as PyTorch users run it, unless --keep_host_memory asks for what
# `import cvc_jax` does with CVC_JAX_KEEP_HOST_MEMORY=1 (cvc_jax/host_memory.py).
# It has to be decided before torch starts threads, so before the flags are parsed.
os.environ["CVC_JAX_KEEP_HOST_MEMORY"] = "1" if "--keep_host_memory" in sys.argv else "0"
import cvc_jax  # pylint: disable=g-import-not-at-top,unused-import

import torch  # pylint: disable=g-import-not-at-top
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cvc_jax import benchmark  # pylint: disable=g-import-not-at-top
from cvc_jax import costs  # pylint: disable=g-import-not-at-top
from tests.torch_reference import cvc_model as ref
from tests.torch_reference.video_resnet import TorchVideoResNet

TAU = ref.SWAP_TEMPERATURE


def parse_args(argv=None):
  """Flags; `--config=FILE[:variants]` first sets those a cvc_jax config implies."""
  argv = list(sys.argv[1:] if argv is None else argv)
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config")
  config_path = pre.parse_known_args(argv)[0].config
  if config_path:
    argv = config_flags(load_config(config_path)) + argv  # later flags win
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", help="a cvc_jax config (FILE[:variants]) to copy sizes from")
  p.add_argument("--batch_size", type=int, default=2, help="videos per step")
  p.add_argument("--frames", type=int, default=16, help="T, frames per clip")
  p.add_argument("--size", type=int, default=128, help="S, crop size")
  p.add_argument("--blocks", default="1,1,1,1", help="blocks per R(2+1)D stage")
  p.add_argument("--width", type=int, default=64, help="channels of the first stage")
  p.add_argument("--concepts", type=int, default=50, help="K, concepts per kind")
  p.add_argument("--sigma", default="mlp", choices=["identity", "linear", "mlp"])
  p.add_argument("--sigma_dim", type=int, default=0, help="0: the encoder width D")
  p.add_argument("--decoder_hidden", type=int, default=512)
  p.add_argument("--proj_hidden", type=int, default=512)
  p.add_argument("--proj_dim", type=int, default=128)
  p.add_argument("--queue", type=int, default=1024, help="rows of the code queue")
  p.add_argument("--topk", type=int, default=10, help="K_valid of the local loss")
  p.add_argument("--topk_rule", default="strict", choices=["strict", "exact"],
                 help="the authors' '>' against the k-th score, or the exact top-k")
  p.add_argument("--encoder", default="ours", choices=["ours", "torchvision"])
  p.add_argument("--amp", default="none", choices=["none", "bf16"],
                 help="autocast compute dtype (parameters stay float32)")
  p.add_argument("--channels_last", action="store_true",
                 help="channels_last_3d layout for the encoder and its input")
  p.add_argument("--compile", action="store_true", help="torch.compile the forward+loss")
  p.add_argument("--cudnn_benchmark", action="store_true",
                 help="torch.backends.cudnn.benchmark: time cuDNN's algorithms for each "
                 "convolution shape in the first step (off by default, and in the "
                 "authors' code)")
  p.add_argument("--keep_host_memory", action="store_true",
                 help="glibc malloc keeps freed memory, as CVC_JAX_KEEP_HOST_MEMORY=1 "
                 "does for cvc_jax")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--json", default=None, help="also write the results here")
  return p.parse_args(argv)


class TorchvisionEncoder(nn.Module):
  """torchvision's R(2+1)D with any blocks per stage, returning (pooled, map)."""

  def __init__(self, blocks):
    super().__init__()
    from torchvision.models.video import resnet as tv  # pylint: disable=g-import-not-at-top
    self.net = tv.VideoResNet(tv.BasicBlock, [tv.Conv2Plus1D] * 4, list(blocks),
                              tv.R2Plus1dStem)
    self.net.fc = nn.Identity()  # no classifier in pretraining

  def forward(self, x):
    n = self.net
    x = n.layer4(n.layer3(n.layer2(n.layer1(n.stem(x)))))
    return x.mean(dim=(2, 3, 4)), x


def build_model(args) -> ref.TorchCVC:
  blocks = tuple(int(b) for b in args.blocks.split(","))
  if args.encoder == "torchvision":
    if args.width != 64:
      raise ValueError("--encoder=torchvision has width 64 only.")
    encoder = TorchvisionEncoder(blocks)
  else:
    encoder = TorchVideoResNet("r2plus1d", blocks=blocks, width=args.width)
  dim = args.width * 8
  return ref.TorchCVC(encoder, dim=dim, concepts=args.concepts, sigma=args.sigma,
                      sigma_dim=args.sigma_dim or dim, decoder_hidden=args.decoder_hidden,
                      proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
                      queue_size=args.queue)


@torch.no_grad()
def sinkhorn(scores, eps=ref.SINKHORN_EPS, iters=ref.SINKHORN_ITERS):
  """The oracle's Sinkhorn ([N, C] -> [N, C]) without its data-dependent inf guard,
  which reads a value back to the host every call."""
  q = torch.exp((scores - scores.max()) / eps).t()
  q = q / q.sum()
  c, n = q.shape
  for _ in range(iters):
    q = q / q.sum(dim=1, keepdim=True) / c
    q = q / q.sum(dim=0, keepdim=True) / n
  return (q / q.sum(dim=0, keepdim=True)).t()


def swapped_prediction(codes, sk_input, views):
  """Each view's Sinkhorn target supervises every other view's softmax (SPEC 4)."""
  b = codes.shape[0]
  total = 0.0
  for i in views:
    target = sinkhorn(sk_input[:, i])[:b]
    partners = [k for k in views if k != i]
    total = total + sum(-(target * F.log_softmax(codes[:, k] / TAU, dim=1)).sum(1).mean()
                        for k in partners) / len(partners)
  return total / len(views)


def total_loss(model: ref.TorchCVC, views, queue, topk: int, strict: bool):
  """The total of every term of SPEC section 4 at a late epoch; the codes to queue.

  views: [B, 6, 3, T, S, S]; queue: [Q, 6, 2K]. Follows `ref.loss_terms`.
  """
  k = model.concepts
  h, maps = model.encode(views)
  h, maps = h.float(), maps.float()
  codes = model.concept_codes(h).float()
  proj = lambda head, i: head(h[:, i]).float()
  nce = ref.info_nce
  vv = [proj(model.fvv, i) for i in (0, 1)]
  vs, sv = [proj(model.fvs, i) for i in (0, 1)], [proj(model.fsv, i) for i in (2, 3)]
  vd, dv = [proj(model.fvd, i) for i in (0, 1)], [proj(model.fdv, i) for i in (4, 5)]
  loss = (nce(vv[0], vv[1]) + nce(vv[1], vv[0])) / 2
  for a, c in ((vs, sv), (vd, dv)):
    loss = loss + (nce(a[0], c[1]) + nce(a[1], c[0]) + nce(c[0], a[1]) + nce(c[1], a[0])) / 2
  sk_input = torch.cat([codes.detach(), queue], dim=0)
  static, dynamic = codes[..., :k], codes[..., k:]
  loss = loss + swapped_prediction(static, sk_input[..., :k], (0, 1, 2, 3))
  loss = loss + swapped_prediction(dynamic, sk_input[..., k:], (0, 1, 4, 5))
  loss = loss + ref.ENTROPY_WEIGHT * (ref.negative_entropy(static, (4, 5)) +
                                      ref.negative_entropy(dynamic, (2, 3)))
  loss = loss + ref.reconstruction_loss(codes[:, 0:2], h[:, 0:2], model.gv)
  loss = loss + ref.reconstruction_loss(codes[:, 2:4, :k], h[:, 2:4], model.gs)
  loss = loss + ref.reconstruction_loss(codes[:, 4:6, k:], h[:, 4:6], model.gd)
  templates = (model.prototype.weight, model.prototype_s.weight[:k],
               model.prototype_d.weight[k:])
  parts = (codes[:, 0:2], codes[:, 2:4, :k], codes[:, 4:6, k:])
  for i, (tmpl, part) in enumerate(zip(templates, parts)):
    loss = loss + ref.local_concept_contrast(model.lit, maps[:, 2 * i:2 * i + 2], tmpl,
                                             part, topk, strict)
  return loss, codes.detach()


class TorchStep:
  """The model, optimiser and views of `args` on one device, ready to time.

  Calling it runs one training step to completion; `result(times)` makes the
  `benchmark.Result`. Building it counts the FLOPs of one eager step and runs
  one step of the timed kind (which compiles under --compile).
  """

  def __init__(self, args):
    self.args = args
    self.device = device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    self.model = model = build_model(args).to(device).train()
    fmt = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    if args.channels_last:
      model.backbone.to(memory_format=fmt)
    # torch Adam adds the weight decay to the gradient, as the authors ran it.
    self.opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5,
                                fused=device.type == "cuda")
    b, t, s = args.batch_size, args.frames, args.size
    views = torch.randn(b * 6, 3, t, s, s, device=device).contiguous(memory_format=fmt)
    self.views = views.view(b, 6, 3, t, s, s)
    self.queue = torch.randn(args.queue, 6, 2 * args.concepts, device=device)
    self.loss_fn = torch.compile(total_loss) if args.compile else total_loss
    # FLOPs of one eager step, counted from the operators' shapes.
    counter = FlopCounterMode(display=False)
    with counter:
      self._step(total_loss)
    self.flops = float(counter.get_total_flops())
    self._sync()
    start = time.perf_counter()
    self()
    self.compile_time = time.perf_counter() - start
    if device.type == "cuda":
      # The peak of the steps timed from here: the eager step above (and, with
      # torch.compile, the compiling one) may hold more than the step timed.
      torch.cuda.reset_peak_memory_stats(device)

  def _sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def _step(self, loss_fn):
    b = self.args.batch_size
    self.model.normalize_prototypes_()
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device.type, dtype=torch.bfloat16,
                        enabled=self.args.amp == "bf16"):
      loss, codes = loss_fn(self.model, self.views, self.queue, self.args.topk,
                            self.args.topk_rule == "strict")
    loss.backward()
    self.opt.step()
    self.queue = torch.cat([self.queue[b:], codes], dim=0)
    return loss

  def launch(self):
    """Queues one step (on a GPU) and returns its loss, not waited for."""
    return self._step(self.loss_fn)

  def finish(self, loss) -> None:
    """Reads the loss of a queued step, which waits for it, as a training loop
    that logs or checks it does."""
    self.loss = loss
    float(loss.detach())

  def wait(self) -> None:
    self._sync()

  def __call__(self) -> None:
    self.loss = self._step(self.loss_fn)
    self._sync()

  def result(self, times: list[float]) -> benchmark.Result:
    args = self.args
    if not torch.isfinite(self.loss):
      print("Warning: the last step's loss is not finite.", file=sys.stderr)
    if self.device.type == "cuda":
      kind = torch.cuda.get_device_name(self.device)
      memory = torch.cuda.max_memory_allocated(self.device)
      memory_source = "torch allocator peak"
    else:
      kind = "cpu"
      memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
      memory_source = "process peak RSS, host"
    dtype = "bfloat16" if args.amp == "bf16" else "float32"
    tuned = [n for n, on in (("AMP bf16", args.amp == "bf16"),
                             ("channels_last", args.channels_last),
                             ("torch.compile", args.compile),
                             ("cudnn.benchmark", args.cudnn_benchmark),
                             ("host memory kept", cvc_jax.HOST_MEMORY_KEPT)) if on]
    how = ", ".join(tuned) or "eager"
    if (self.device.type == "cuda" and dtype == "float32" and
        torch.backends.cudnn.allow_tf32):
      # PyTorch's default: float32 convolutions run on the tensor cores in TF32
      # (the MFU column still counts against the float32 peak).
      how += ", cuDNN convolutions in TF32 (PyTorch's default)"
    return benchmark.Result(
        framework=f"torch {torch.__version__}", device_kind=kind, device_count=1,
        dtype=dtype, global_batch=args.batch_size,
        clip_shape=(args.frames, args.size, args.size), step_times_s=times,
        flops_per_step=self.flops, flops_source="torch flop_counter",
        peak_tflops_per_device=costs.peak_tflops(kind, dtype),
        peak_memory_bytes=int(memory), peak_memory_source=memory_source,
        compile_time_s=self.compile_time,
        notes=("fwd+bwd+Adam on prebuilt views, " + how +
               f", {args.encoder} encoder; compile time = first timed-kind step"))


def load_config(path: str):
  """`get_config(variants)` of a cvc_jax config file given as FILE[:variants]."""
  path, _, variants = path.partition(":")
  spec = importlib.util.spec_from_file_location("_benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variants or None)


def config_flags(config) -> list[str]:
  """The flags that give the batch shape and model of a cvc_jax config."""
  c, m = config, config.model
  if m.encoder.arch != "r2plus1d" or m.separate_encoders:
    raise ValueError("The PyTorch baseline has one shared R(2+1)D only.")
  return [
      f"--batch_size={c.batch_size}", f"--frames={c.input.num_frames}",
      f"--size={c.input.crop_size}", f"--blocks={','.join(map(str, m.encoder.blocks))}",
      f"--width={m.encoder.width}", f"--concepts={m.num_concepts}", f"--sigma={m.sigma}",
      f"--sigma_dim={m.sigma_dim or 0}", f"--decoder_hidden={m.decoder_hidden}",
      f"--proj_hidden={m.proj_hidden}", f"--proj_dim={m.proj_dim}",
      f"--queue={c.loss.queue_size}", f"--topk={c.loss.loc_topk}",
      f"--topk_rule={'strict' if c.loss.loc_topk_strict else 'exact'}",
      f"--amp={'bf16' if c.dtype == 'bfloat16' else 'none'}"]


def args_from_config(config, extra=()) -> argparse.Namespace:
  """The arguments for a cvc_jax config, then `extra` flags over them."""
  return parse_args(config_flags(config) + list(extra))


def run(args) -> benchmark.Result:
  """Builds the model and optimiser, then times `args.steps` training steps."""
  return benchmark.measure(TorchStep(args), steps=args.steps,
                           warmup=max(args.warmup - 1, 0))


def main(argv=None):
  args = parse_args(argv)
  result = run(args)
  print(benchmark.format_table(result))
  if args.json:
    benchmark.write_json(result, args.json)


if __name__ == "__main__":
  main()
