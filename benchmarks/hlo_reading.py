"""Reading XLA's optimised HLO text: each op's shape and origin, the bytes it
moves, the ops that share a kernel, and what a step's kernels move in all.

Shared by `profile_step.py` (a trace's ops, named and sized) and `compile_for.py`
(a program compiled for a device this machine lacks); no flags, no devices.
"""

import collections
import math
import re
from typing import NamedTuple

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
    for key in ("kind", "window", "dim_labels", "calls", "custom_call_target"):
      found = re.search(key + r"=(\{[^}]*\}|\"[^\"]*\"|[\w.\->]+)", rest)
      if found:
        desc.append(f"{key}={found.group(1)}")
    found = re.search(r'op_name="([^"]*)"', rest)
    if found:
      desc.append("<- " + found.group(1)[-90:])
    ops[name] = " ".join(desc)
  return ops


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (`bf16[96,16]{1,0}`, or a tuple of them), leaving out
  u8 arrays: the scratch space a cuDNN call returns beside its result."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
    if dtype in _BYTES and dtype != "u8":
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def op_bytes(hlo_text: str) -> dict[str, int]:
  """Instruction name -> bytes of its operands and result: what an op that reads
  each operand once and writes its result once moves (a fusion's broadcast
  vectors and re-reads aside)."""
  shapes, operands = {}, {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if m:
      name, shape, _, rest = m.groups()
      shapes[name] = shape
      operands[name] = re.findall(r"%([\w.\-]+)", rest.partition(")")[0])
  return {name: _shape_bytes(shapes[name]) + sum(_shape_bytes(shapes.get(o, ""))
                                                  for o in args)
          for name, args in operands.items()}


def kernel_sharers(hlo_text: str) -> dict[str, list[str]]:
  """Op name -> the other ops that run the same compiled kernel.

  XLA compiles identical fusions once (their `deduplicated_name` is the same);
  inside a command buffer their kernels' trace events all carry one name, so
  the time `profile_step.op_times` gives such an op is that of the whole group.
  """
  groups = collections.defaultdict(list)
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?deduplicated_name="([^"]+)"',
                       hlo_text, re.M):
    groups[m.group(2)].append(m.group(1))
  return {name: [o for o in group if o != name]
          for group in groups.values() if len(group) > 1 for name in group}


class Hlo(NamedTuple):
  """What the table reads from the optimised HLO, per op name."""
  ops: dict[str, str]  # `hlo_ops`
  nbytes: dict[str, int]  # `op_bytes`
  sharers: dict[str, list[str]]  # `kernel_sharers`


def read_hlo(hlo_text: str) -> Hlo:
  return Hlo(hlo_ops(hlo_text), op_bytes(hlo_text), kernel_sharers(hlo_text))




# Ops of a scheduled GPU program that launch no kernel of their own.
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant",
              "while", "conditional", "call", "after-all", "opt-barrier"}


def _computations(hlo_text: str) -> dict[str, str]:
  """Computation name -> its text (header line and body), ENTRY under 'ENTRY'."""
  comps = {}
  for block in re.split(r"\n(?=\S)", hlo_text):
    m = re.match(r"(ENTRY )?%?([\w.\-]+) ", block)
    if m and "{" in block.partition("\n")[0]:
      comps["ENTRY" if m.group(1) else m.group(2)] = block
  return comps


def kernel_traffic(hlo_text: str) -> dict[str, dict[str, float]]:
  """What a program's kernels move, by kind: {kind: {"ops": n, "gb": GB}}.

  Walks the entry computation and the loops' and conditionals' computations it
  runs (each counted once: a loop's trip count is not in the text, and every
  branch of a conditional is counted), with `op_bytes` for each op that
  launches a kernel. Kinds: cuDNN convolutions, other library calls, XLA's
  elementwise fusions (kLoop), its reductions and transposes (kInput), its other
  fusions (kCustom: Triton, ...), copies, and the rest by opcode.
  """
  comps = _computations(hlo_text)
  nbytes = op_bytes(hlo_text)
  todo, seen = ["ENTRY"], set()
  traffic = collections.defaultdict(lambda: {"ops": 0, "gb": 0.0})
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in comps:
      continue
    seen.add(comp)
    for line in comps[comp].splitlines()[1:]:
      m = _HLO_LINE.match(line)
      if not m:
        continue
      name, _, opcode, rest = m.groups()
      if opcode in ("while", "conditional"):
        todo += re.findall(r"\b(?:condition|body|true_computation|false_computation)="
                           r"%?([\w.\-]+)", rest)
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
          todo += [c.strip(" %") for c in branches.split(",")]
        continue
      if opcode in _NO_KERNEL:
        continue
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      kind = re.search(r"kind=(k\w+)", rest)
      if opcode == "custom-call":
        key = ("cuDNN convolutions" if target and "cudnn$conv" in target.group(1)
               else "library calls")
      elif opcode == "fusion":
        key = {"kLoop": "XLA elementwise fusions", "kInput": "XLA reductions and "
               "transposes"}.get(kind.group(1) if kind else "", "XLA other fusions")
      else:
        key = {"copy": "copies"}.get(opcode, opcode)
      traffic[key]["ops"] += 1
      traffic[key]["gb"] += nbytes.get(name, 0) / 1e9
  return dict(traffic)
