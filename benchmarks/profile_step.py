r"""Where the train step's time goes: a jax.profiler trace, summed per XLA op.

    python benchmarks/profile_step.py --config=configs/reference.py \
        --config.batch_size=2 --logdir=/tmp/cvc_profile [--top=25]

Compiles the step of `python -m cvc_jax.benchmark`, runs `--warmup` steps, then
traces `--steps` steps with `jax.profiler` (the trace in --logdir opens in
TensorBoard's profile plugin or Perfetto). Prints the XLA ops that took the most
time, summed over the traced steps, each with its share of the step, its shape and
convolution window from the optimised HLO, and the JAX operation it came from, so
"the transposed 3x1x1 convolution of layer2" can be told from its forward pass.
Flags: those of `cvc_jax.benchmark` and the ones below.
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


def op_times(logdir: str) -> collections.Counter:
  """Microseconds per trace event name in the newest trace under logdir."""
  path = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      times[e["name"]] += e["dur"]
  return times


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  step = benchmark.TrainStep(FLAGS.config, remat=FLAGS.remat,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
  benchmark.time_steps(step, steps=0, warmup=max(FLAGS.warmup, 1))
  jax.profiler.start_trace(_LOGDIR.value)
  times = benchmark.time_steps(step, steps=FLAGS.steps, warmup=0)
  jax.profiler.stop_trace()
  ops = hlo_ops(step.compiled.as_text())
  per_op = {n: t for n, t in op_times(_LOGDIR.value).items() if n in ops}
  step_us = sum(times) * 1e6
  print(f"{len(times)} traced steps, {sum(times) / len(times):.3f} s per step; XLA ops "
        f"account for {sum(per_op.values()) / step_us:.0%} of the wall time (ops on "
        "several threads can add up to more than 100%).")
  by_kind = collections.Counter()
  for name, t in per_op.items():
    by_kind[ops[name].split()[0]] += t
  print("By opcode: " + ", ".join(f"{k} {t / step_us:.1%}"
                                  for k, t in by_kind.most_common(8)))
  for name, t in sorted(per_op.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f"{t / step_us:6.1%} {t / len(times) / 1e3:9.1f} ms  {name}: {ops[name]}")


if __name__ == "__main__":
  app.run(main)
