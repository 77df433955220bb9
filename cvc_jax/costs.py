"""What a train step costs: its model FLOPs, the devices' peaks, compiled memory.

What `cvc_jax.benchmark`'s MFU is made of: the step's FLOPs, counted from its
jaxpr (`jaxpr_flops`) by the rule of `torch.utils.flop_counter`, with which
`benchmarks/torch_baseline.py` counts the PyTorch step, and the device's peak
(`peak_tflops`), which both tables divide by. `step_flops` counts any batch
from shapes alone, on any host; `compiled_bytes` is the memory
`benchmark.largest_batch` fits batches by.
"""

import math

import jax
import jax.extend  # jaxprs_in_params; `import jax` alone does not load it

from cvc_jax import pretrain
from cvc_jax.models import convolutions

# Dense peak TFLOP/s per device: (bfloat16, float32). Sources: NVIDIA's H100
# datasheet (SXM: BF16 tensor 1979 with sparsity, so 989 dense; FP32 67; H200
# has the H100 SXM's compute), NVIDIA's A100 datasheet (BF16 312, FP32 19.5;
# TF32 tensor 156 not used here), Google Cloud's TPU system-architecture pages
# (per-chip bf16: v4 275, v5e 197, v5p 459, v6e 918). TPUs multiply float32 on
# the bf16 MXU in several passes; their bf16 peak is the ceiling for both.
# Keys are matched against the lower-cased `device_kind`, first match wins.
# Variants with other peaks that these sources do not give (the NVL cards, the
# v4 inference chip) map to None: no MFU rather than a wrong one.
PEAK_TFLOPS = (
    ("h100 nvl", (None, None)),
    ("h200 nvl", (None, None)),
    ("tpu v4 lite", (None, None)),
    ("h100 pcie", (756.0, 51.0)),
    ("h100", (989.0, 67.0)),
    ("h200", (989.0, 67.0)),
    ("a100", (312.0, 19.5)),
    ("tpu v4", (275.0, 275.0)),
    ("tpu v5 lite", (197.0, 197.0)),  # v5e reports itself as "TPU v5 lite"
    ("tpu v5e", (197.0, 197.0)),
    ("tpu v5p", (459.0, 459.0)),
    ("tpu v5", (459.0, 459.0)),  # v5p reports itself as "TPU v5"
    ("tpu v6", (918.0, 918.0)),  # v6e: "TPU v6 lite"
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Dense peak TFLOP/s of one device for a compute dtype; None if unknown (CPUs)."""
  kind = device_kind.lower()
  for key, (bf16, fp32) in PEAK_TFLOPS:
    if key in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs by XLA's cost analysis of a compiled program, if it counts any."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend has one)
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = cost.get("flops") if cost else None
  return float(flops) if flops and flops > 0 else None


def jaxpr_flops(jaxpr) -> float:
  """2 x the multiply-adds of every convolution and matrix product in a jaxpr.

  The counting rule of `torch.utils.flop_counter`, so that both frameworks' MFU
  share one numerator and no backend's cost model enters it. Sub-jaxprs count
  once per call, a scan's body `length` times, a cond its costliest branch, a
  while loop's body once (its trip count is not static). Under rematerialisation
  the recomputed forward is in the jaxpr of the gradient and is counted.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name, params = eqn.primitive.name, eqn.params
    out = eqn.outvars[0].aval.shape
    if name == "dot_general":
      (contracting, _), _ = params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    elif name == "conv_general_dilated":
      # Each output element sums over the kernel's window and input features:
      # the kernel's size over its output features (grouped or not). The input
      # gradient of a strided convolution dilates its input with zeros
      # (lhs_dilation); only the taps on real elements count, as a library's
      # backward-data convolution (and torch's counter) does them.
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[params["dimension_numbers"].rhs_spec[0]]
      total += (2.0 * math.prod(out) * math.prod(rhs) / out_features /
                math.prod(params.get("lhs_dilation") or (1,)))
    subs = list(jax.extend.core.jaxprs_in_params(params))
    if not subs:
      continue
    if name == "cond":
      total += max(jaxpr_flops(j) for j in subs)
    else:
      total += params.get("length", 1) * sum(jaxpr_flops(j) for j in subs)
  return total


def model_work(config):
  """`config`, or a copy that computes the same model without what the speed
  options add: '3d_pad8' convolutions as the '3d' ones they compute, the
  space-to-depth stem as its convolution, no rematerialisation. The zeros that
  padding and the 8x8 taps add and the forward passes remat repeats are not the
  model's work, so MFU leaves them out (model FLOPs, not hardware FLOPs)."""
  pad8 = config.model.encoder.get("conv_impl") == "3d_pad8"
  s2d = convolutions.resolve_stem_impl(config.model.encoder.get("stem_impl", "auto"),
                                       config.dtype) == "space_to_depth"
  remat = config.get("remat", "none") != "none"
  if not (pad8 or s2d or remat):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if pad8:
      config.model.encoder.conv_impl = "3d"
    if s2d:
      config.model.encoder.stem_impl = "conv"
    if remat:
      config.remat = "none"
  return config


def abstract_inputs(config, replicated=None, batch_sharding=None):
  """The train state, batch and key of one step of `config` as shapes (nothing is
  allocated): state and key placed by `replicated`, the batch by `batch_sharding`
  (None: no placement)."""
  state = jax.eval_shape(lambda rng: pretrain.create_train_state(
      config, rng, pretrain.views_shape_of(config), 1), jax.random.key(0))
  rng = jax.eval_shape(lambda: jax.random.key(1))
  place = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), tree)
  return place(state), pretrain.batch_shapes(config, batch_sharding), place(rng)


def step_flops(config) -> float:
  """`jaxpr_flops` of one train step of `config`, traced from shapes alone (nothing
  is allocated or compiled): what `benchmark`'s MFU counts, for any batch."""
  config = model_work(config)
  step = pretrain.frames_train_step(config, 1)
  return jaxpr_flops(jax.make_jaxpr(step)(*abstract_inputs(config)))


def compiled_bytes(compiled) -> int:
  """Bytes one device needs for a compiled program, by XLA's memory analysis:
  arguments + outputs + temporaries - donated (aliased) buffers."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes +
             m.temp_size_in_bytes - m.alias_size_in_bytes)
