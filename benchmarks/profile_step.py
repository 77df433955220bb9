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

# `name = type[shape] opcode(operands), window={...}, dim_labels=..., metadata=...`
_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def hlo_ops(hlo_text: str) -> dict[str, str]:
  """Instruction name -> "opcode result-shape [window] <- jax op" for every op."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    desc = [opcode, shape]
    for key in ("window", "dim_labels", "calls"):
      found = re.search(key + r"=(\{[^}]*\}|[\w.\-]+)", rest)
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


def op_times(logdir: str) -> collections.Counter:
  """Microseconds per XLA op in the newest trace under logdir.

  On CPU an op's events carry its name; on GPU the kernels it launched carry it
  in `args.hlo_op` (one op may launch several), and those are the device time.
  """
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  complete = [e for e in events if e.get("ph") == "X"]
  on_device = [e for e in complete if "hlo_op" in e.get("args", {})]
  times = collections.Counter()
  for e in on_device or complete:
    times[e["args"]["hlo_op"] if on_device else e["name"]] += e["dur"]
  return times


def print_table(ops: dict[str, str], times: collections.Counter, step_us: float,
                steps: int) -> None:
  """The ops of `ops` that took the most of `times`, as shares of `step_us`."""
  per_op = {n: t for n, t in times.items() if n in ops}
  print(f"{steps} traced steps, {step_us / steps / 1e6:.3f} s per step; XLA ops "
        f"account for {sum(per_op.values()) / step_us:.0%} of the wall time (ops on "
        "several threads can add up to more than 100%).")
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
    times = op_times(_READ.value)
    print("Shares of the traced ops' summed time (no wall time in a read trace).")
    print_table(ops, times, sum(t for n, t in times.items() if n in ops), 3)
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
  print_table(hlo_ops(hlo), op_times(_LOGDIR.value), sum(times) * 1e6, len(times))


if __name__ == "__main__":
  app.run(main)
