"""One markdown table from benchmark JSON files (cvc_jax.benchmark, torch_baseline).

    python benchmarks/summarize.py OUT/*.json
"""

import json
import sys


def _fmt(value, spec, scale=1.0):
  return "n/a" if value is None else format(value * scale, spec)


def _pipelined(r) -> str:
  t = r.get("pipelined_step_time_s")  # JSON written before it was measured: n/a
  return "n/a" if t is None else f"{t * 1e3:.1f} ({r['pipelined_clips_per_s']:.2f})"


def table(paths) -> str:
  """The markdown table: one row per JSON file, in the order given."""
  rows = ["| run | device | dtype | batch (videos) | step ms (median, p10-p90) | "
          "clips/s | pipelined ms (clips/s) | TFLOP/s | MFU | peak memory GiB | "
          "compile s | notes |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for path in paths:
    with open(path) as f:
      r = json.load(f)
    rows.append(
        f"| {r['framework']} | {r['device_kind']} x {r['device_count']} | {r['dtype']} | "
        f"{r['global_batch']} | {r['step_time_median_s'] * 1e3:.1f} "
        f"({r['step_time_p10_s'] * 1e3:.1f}-{r['step_time_p90_s'] * 1e3:.1f}) | "
        f"{r['clips_per_s']:.2f} | {_pipelined(r)} | {_fmt(r['tflops_per_s'], '.2f')} | "
        f"{_fmt(r['mfu'], '.1%')} | {_fmt(r['peak_memory_bytes'], '.2f', 2**-30)} "
        f"({r['peak_memory_source']}) | {r['compile_time_s']:.1f} | {r['notes']} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(table(sys.argv[1:]))
