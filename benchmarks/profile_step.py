r"""Where the train step's time goes: a jax.profiler trace, summed per XLA op.

    python benchmarks/profile_step.py --config=configs/reference.py \
        --config.batch_size=2 --logdir=/tmp/cvc_profile [--top=25]

Compiles the step of `python -m cvc_jax.benchmark`, runs `--warmup` steps, then
traces `--steps` steps with `jax.profiler` (the trace in --logdir opens in
TensorBoard's profile plugin or Perfetto). Prints the XLA ops that took the most
time, summed over the traced steps, each with its share of the step, its shape and
convolution window from the optimised HLO, and the JAX operation it came from, so
"the transposed 3x1x1 convolution of layer2" can be told from its forward pass.
On GPU the time is the kernels' (device) time. `--read=DIR` reads a trace that
`benchmarks/fit_batch.py --trace_dir=DIR` wrote on another machine. Flags: those
of `cvc_jax.benchmark` and the ones below.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from cvc_jax import benchmark
from hlo_reading import Hlo, read_hlo  # pylint: disable=g-bad-import-order

FLAGS = flags.FLAGS
benchmark.define_flags()
_LOGDIR = flags.DEFINE_string("logdir", "/tmp/cvc_profile", "Where the trace goes.")
_TOP = flags.DEFINE_integer("top", 25, "Ops to list.")
_READ = flags.DEFINE_string(
    "read", None, "Read the trace and step.hlo that `fit_batch.py --trace_dir` wrote "
    "to this folder instead of compiling and tracing here.")
_FLOOR_GBS = flags.DEFINE_float(
    "floor_gbs", None, "With a GPU trace, also print the step's device time if every "
    "XLA kernel moved its operands and results at this many GB/s (e.g. 4800, an "
    "H200's rated memory bandwidth) and cuDNN padded no channels (`step_floor`).")
_HLO_OUT = flags.DEFINE_string(
    "hlo_out", None, "Also write the optimised HLO here, to read the trace elsewhere.")

def step_part(desc: str) -> str:
  """Which part of the train step an op of `hlo_ops` belongs to, by its JAX op name.

  A fusion carries its root's name, so the split is that of the fusions' roots.
  """
  name = desc.partition(" <- ")[2]
  if "/views/" in name:
    return "views"
  if "transpose(" in name:
    return "backward"
  if "jvp(" in name:
    return "forward"
  return "other (update, queue, unnamed)"


def _kernel_op(event: dict, known) -> str:
  """The XLA op a GPU kernel's trace event ran for.

  A kernel's event names its op in `args.hlo_op`, except inside a command buffer
  (XLA replays runs of ops as one CUDA graph): there `hlo_op` names the buffer,
  and the kernel is named after its op with "_" for the HLO name's "."
  (`loop_convert_fusion_3` ran `loop_convert_fusion.3`). `known` holds the HLO's
  op names; a kernel matching none stays with its buffer.
  """
  op = event["args"]["hlo_op"]
  if op in known and not op.startswith("command_buffer"):
    return op
  return _named_op(event["name"], known) or op


def _named_op(kernel: str, known) -> str | None:
  """The op of `known` that a kernel is named after (XLA emitted it), if any."""
  for name in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if name in known:
      return name
  return None


def op_times(logdir: str, known=frozenset()) -> tuple[collections.Counter,
                                                      collections.Counter,
                                                      collections.Counter]:
  """Microseconds per XLA op, XLA kernel runs per op, and microseconds per GPU
  kernel, in the newest trace under logdir.

  On CPU an op's events carry its name, and there are no kernels. On GPU the
  kernels are the device time, each counted to its op (`_kernel_op`, `known` the
  HLO's op names) and by its own name: cuDNN's layout transposes and channel
  padding run as kernels of the convolution they serve. A run is a kernel
  event that XLA emitted (named after an op): the group of ops sharing one
  kernel (`kernel_sharers`) gets all their runs.
  """
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  complete = [e for e in events if e.get("ph") == "X"]
  on_device = [e for e in complete if "hlo_op" in e.get("args", {})]
  times, runs, kernels = (collections.Counter(), collections.Counter(),
                          collections.Counter())
  for e in on_device:
    op = _kernel_op(e, known)
    times[op] += e["dur"]
    kernels[e["name"]] += e["dur"]
    if _named_op(e["name"], known):
      runs[op] += 1
  if not on_device:
    for e in complete:
      times[e["name"]] += e["dur"]
  return times, runs, kernels


def _on_gpu(kernels, ops) -> bool:
  """Whether a trace's device events are GPU kernels, not CPU thunks named as ops."""
  return bool(kernels) and bool(set(kernels) - set(ops))


def print_table(hlo: Hlo, times: collections.Counter, step_us: float, steps: int,
                runs: collections.Counter | None = None,
                kernels: collections.Counter | None = None,
                time_kind: str = "wall time", top: int = 25) -> None:
  """The ops of `hlo` that took the most of `times`, as shares of `step_us`, after
  the GPU kernels that took the most (`kernels`), if any. Where XLA kernels ran
  (`runs`, GPU), each op's runs per step and its operands' and result's bytes
  over its time per run."""
  ops = hlo.ops
  per_op = {n: t for n, t in times.items() if n in ops}
  print(f"{steps} traced steps, {step_us / steps / 1e6:.4f} s per step; XLA ops "
        f"account for {sum(per_op.values()) / step_us:.0%} of the {time_kind} (ops on "
        "several threads can add up to more than 100%).")
  if _on_gpu(kernels, ops):
    print("Kernels: " + "; ".join(f"{k[:70]} {t / step_us:.1%}"
                                  for k, t in kernels.most_common(6)))
  by_kind = collections.Counter()
  for name, t in per_op.items():
    by_kind[ops[name].split()[0]] += t
  print("By opcode: " + ", ".join(f"{k} {t / step_us:.1%}"
                                  for k, t in by_kind.most_common(8)))
  by_part = collections.Counter()
  for name, t in per_op.items():
    by_part[step_part(ops[name])] += t
  print("By part: " + ", ".join(f"{k} {t / step_us:.1%}" for k, t in by_part.most_common()))
  moved = {n: hlo.nbytes.get(n, 0) * runs[n] for n in per_op} if runs else {}
  if any(moved.values()):
    # A fusion's kind: kLoop elementwise, kInput a reduction, ... (hlo_ops' "kind=").
    kind = lambda n: (re.findall(r"kind=(\w+)", ops[n]) or ["?"])[0]
    rates = collections.defaultdict(lambda: [0, 0])
    for name, nbytes in moved.items():
      if nbytes:
        rates[kind(name)][0] += nbytes
        rates[kind(name)][1] += per_op[name]
    print("XLA kernels' operands and results over their time: " + ", ".join(
        f"{k} {b / steps / 1e9:.3g} GB per step at {b / t / 1e3:.0f} GB/s"
        for k, (b, t) in sorted(rates.items(), key=lambda kv: -kv[1][1])))
    print("Columns: share, ms per step, runs of the op's XLA kernel per step (ops that "
          "share a kernel are one row), GB/s of its operands and result per run.")
  for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
    row = f"{t / step_us:6.1%} {t / steps / 1e3:9.1f} ms"
    if moved:
      row += (f" {runs[name] / steps:4.0f}x {moved[name] / t / 1e3:6.0f} GB/s"
              if moved[name] else " " * 17)
    shared = hlo.sharers.get(name)
    also = f" [one kernel with {', '.join(shared)}]" if shared and moved else ""
    print(f"{row}  {name}: {ops[name]}{also}")


def step_floor(hlo: Hlo, times: collections.Counter, runs: collections.Counter,
               kernels: collections.Counter, steps: int, gbs: float) -> dict[str, float]:
  """Milliseconds per step of a GPU trace's parts, and their sum if the XLA
  kernels moved their bytes (`op_bytes`) at `gbs` and cuDNN's channel padding
  kernels (`nhwcAddPaddingKernel`, widths not a multiple of 8) took nothing:
  how far faster fusions and padded widths alone could take the step."""
  ms = lambda us: us / steps / 1e3
  ops = [n for n in times if n in hlo.ops]
  cudnn = ms(sum(times[n] for n in ops if hlo.ops[n].startswith("custom-call")))
  padding = ms(sum(t for k, t in kernels.items() if "AddPadding" in k))
  xla = ms(sum(times[n] for n in ops if runs[n]))
  moved = sum(hlo.nbytes.get(n, 0) * runs[n] for n in ops) / steps
  rest = ms(sum(times.values())) - cudnn - xla
  at_rate = moved / (gbs * 1e9) * 1e3
  return {"cudnn_ms": cudnn, "padding_ms": padding, "xla_ms": xla, "xla_gb": moved / 1e9,
          "rest_ms": rest, "floor_ms": cudnn - padding + at_rate + rest}


def _print_floor(hlo, times, runs, kernels, steps) -> None:
  """`step_floor` at --floor_gbs, where it is set and the trace is a GPU's."""
  if not (_FLOOR_GBS.value and _on_gpu(kernels, hlo.ops)):
    return
  f = step_floor(hlo, times, runs, kernels, steps, _FLOOR_GBS.value)
  print(f"Floor: cuDNN calls {f['cudnn_ms']:.1f} ms less their channel padding "
        f"{f['padding_ms']:.1f} ms, XLA kernels' {f['xla_gb']:.1f} GB at "
        f"{_FLOOR_GBS.value:.0f} GB/s (now {f['xla_ms']:.1f} ms), the rest "
        f"{f['rest_ms']:.1f} ms: {f['floor_ms']:.1f} ms of device time per step.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _READ.value:
    # A trace written elsewhere (`fit_batch.py --trace_dir`: 3 steps and step.hlo).
    with open(os.path.join(_READ.value, "step.hlo")) as f:
      hlo = read_hlo(f.read())
    times, runs, kernels = op_times(_READ.value, hlo.ops.keys())
    # No wall time in a read trace: shares of the kernels' (GPU) or ops' (CPU) sum.
    print_table(hlo, times, sum(times.values()), 3, runs, kernels,
                "device time" if kernels else "ops' summed time", _TOP.value)
    _print_floor(hlo, times, runs, kernels, 3)
    return
  step = benchmark.TrainStep(FLAGS.config, remat=FLAGS.remat,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
  benchmark.time_steps(step, steps=0, warmup=max(FLAGS.warmup, 1))
  jax.profiler.start_trace(_LOGDIR.value)
  times = benchmark.time_steps(step, steps=FLAGS.steps, warmup=0)
  jax.profiler.stop_trace()
  hlo_text = step.compiled.as_text()
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(hlo_text)
  hlo = read_hlo(hlo_text)
  op_us, runs, kernels = op_times(_LOGDIR.value, hlo.ops.keys())
  print_table(hlo, op_us, sum(times) * 1e6, len(times), runs, kernels, top=_TOP.value)
  _print_floor(hlo, op_us, runs, kernels, len(times))


if __name__ == "__main__":
  app.run(main)
