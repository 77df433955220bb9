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

FLAGS = flags.FLAGS
benchmark.define_flags()
_LOGDIR = flags.DEFINE_string("logdir", "/tmp/cvc_profile", "Where the trace goes.")
_TOP = flags.DEFINE_integer("top", 25, "Ops to list.")
_READ = flags.DEFINE_string(
    "read", None, "Read the trace and step.hlo that `fit_batch.py --trace_dir` wrote "
    "to this folder instead of compiling and tracing here.")
_HLO_OUT = flags.DEFINE_string(
    "hlo_out", None, "Also write the optimised HLO here, to read the trace elsewhere.")

# `name = type[shape] opcode(operands), window={...}, dim_labels=..., metadata=...`;
# a custom call's type is a tuple: `(bf16[...]{...}, u8[...]{0})`.
_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\((.*)$")


def hlo_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> "opcode result-shape [window] <- jax op" for every op."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    desc = [opcode, shape]
    for key in ("window", "dim_labels", "calls", "custom_call_target"):
      found = re.search(key + r"=(\{[^}]*\}|\"[^\"]*\"|[\w.\->]+)", rest)
      if found:
        desc.append(f"{key}={found.group(1)}")
    found = re.search(r'op_name="([^"]*)"', rest)
    if found:
      desc.append("<- " + found.group(1)[-90:])
    ops[name] = " ".join(desc)
  return ops


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
  op, kernel = event["args"]["hlo_op"], event["name"]
  if op in known and not op.startswith("command_buffer"):
    return op
  for name in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if name in known:
      return name
  return op


def op_times(logdir: str, known=frozenset()) -> tuple[collections.Counter,
                                                      collections.Counter]:
  """Microseconds per XLA op, and per GPU kernel, in the newest trace under logdir.

  On CPU an op's events carry its name, and there are no kernels. On GPU the
  kernels are the device time, each counted to its op (`_kernel_op`, `known` the
  HLO's op names) and by its own name: cuDNN's layout transposes and channel
  padding run as kernels of the convolution they serve.
  """
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  complete = [e for e in events if e.get("ph") == "X"]
  on_device = [e for e in complete if "hlo_op" in e.get("args", {})]
  times, kernels = collections.Counter(), collections.Counter()
  for e in on_device:
    times[_kernel_op(e, known)] += e["dur"]
    kernels[e["name"]] += e["dur"]
  if not on_device:
    for e in complete:
      times[e["name"]] += e["dur"]
  return times, kernels


def print_table(ops: dict[str, str], times: collections.Counter, step_us: float,
                steps: int, kernels: collections.Counter | None = None,
                time_kind: str = "wall time") -> None:
  """The ops of `ops` that took the most of `times`, as shares of `step_us`, after
  the GPU kernels that took the most (`kernels`), if any."""
  per_op = {n: t for n, t in times.items() if n in ops}
  print(f"{steps} traced steps, {step_us / steps / 1e6:.4f} s per step; XLA ops "
        f"account for {sum(per_op.values()) / step_us:.0%} of the {time_kind} (ops on "
        "several threads can add up to more than 100%).")
  if kernels and set(kernels) - set(ops):  # GPU kernels, not CPU thunks named as ops
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
  for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f"{t / step_us:6.1%} {t / steps / 1e3:9.1f} ms  {name}: {ops[name]}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _READ.value:
    # A trace written elsewhere (`fit_batch.py --trace_dir`: 3 steps and step.hlo).
    with open(os.path.join(_READ.value, "step.hlo")) as f:
      ops = hlo_ops(f.read())
    times, kernels = op_times(_READ.value, ops.keys())
    # No wall time in a read trace: shares of the kernels' (GPU) or ops' (CPU) sum.
    print_table(ops, times, sum(times.values()), 3, kernels,
                "device time" if kernels else "ops' summed time")
    return
  step = benchmark.TrainStep(FLAGS.config, remat=FLAGS.remat,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
  benchmark.time_steps(step, steps=0, warmup=max(FLAGS.warmup, 1))
  jax.profiler.start_trace(_LOGDIR.value)
  times = benchmark.time_steps(step, steps=FLAGS.steps, warmup=0)
  jax.profiler.stop_trace()
  hlo = step.compiled.as_text()
  if _HLO_OUT.value:
    with open(_HLO_OUT.value, "w") as f:
      f.write(hlo)
  ops = hlo_ops(hlo)
  op_us, kernels = op_times(_LOGDIR.value, ops.keys())
  print_table(ops, op_us, sum(times) * 1e6, len(times), kernels)


if __name__ == "__main__":
  app.run(main)
