r"""Every convolution of an encoder timed in each form of `convolutions.CONV_IMPLS`.

    python benchmarks/conv_forms.py --config=configs/reference.py \
        --config.batch_size=2 [--reps=3] [--whole]

The encoder of the config, at the shape the train step gives it (6 clips per
video), is run once with its calls intercepted to list its convolutions (name,
kernel, strides, input shape). Each convolution is then jitted on its own as a
3D `nn.Conv` ('3d') and as `convolutions.FactorisedConv` ('2d1d', where the kernel
allows), and three passes are timed, each the median of --reps runs: forward,
the gradient for the input and the gradient for the kernel (the two halves of
the backward pass, which XLA lowers to different convolutions; the first
convolution's input is the views, which need none, so it has none). --whole also
times the whole encoder's forward + backward (BatchNorm in training mode) with
each `conv_impl`. This is the measurement behind `conv_impl='auto'`. --stem times
only the first convolution, forward and kernel gradient, in every `conv_impl`
(or those --stem_conv_impls lists) and both forms of `stem_impl` (conv and
space_to_depth), with the rate of the model's FLOPs (those of the 7x7 kernel,
not the space-to-depth form's zero taps): the measurement behind
`stem_impl='auto'`. --torch adds
the same three passes of PyTorch's `nn.Conv3d` on the same input (float32,
NCDHW, this process's threads), the convolutions of the authors' step, and the
ratio of the faster JAX form to it.
"""

import functools
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from cvc_jax import models
from cvc_jax.models import convolutions
from cvc_jax.models import resnet3d

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (FILE[:variants]).",
                                lock_config=True)
_REPS = flags.DEFINE_integer("reps", 3, "Timed runs per pass (median).")
_WHOLE = flags.DEFINE_bool("whole", False, "Also time the whole encoder per form.")
_TORCH = flags.DEFINE_bool("torch", False, "Also time PyTorch's Conv3d per convolution.")
_STEM = flags.DEFINE_bool("stem", False,
                          "Time only the first convolution, in every conv_impl and stem_impl.")
_STEM_CONV_IMPLS = flags.DEFINE_list(
    "stem_conv_impls", ["3d", "3d_pad8", "2d1d"], "With --stem: the conv_impls to time.")


def _median_time(fn, *args, reps: int, sync=jax.block_until_ready) -> float:
  """Median wall time of `sync(fn(*args))` after one untimed (compiling) call."""
  sync(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    sync(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def list_convs(encoder: nn.Module, x) -> list[tuple[str, tuple, tuple, tuple]]:
  """(name, kernel, strides, input shape) of every convolution `encoder` runs on x."""
  convs = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(
        m, (nn.Conv, convolutions.FactorisedConv)):
      convs.append(("/".join(m.scope.path), tuple(m.kernel_size), tuple(m.strides),
                    tuple(args[0].shape)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v: encoder.init(jax.random.key(0), v, train=False), x)
  return convs


def time_conv(kernel, strides, in_shape, features, impl, dtype, reps, *, input_grad=True,
              stem_impl="conv"):
  """(forward, input-gradient, kernel-gradient) seconds of one convolution in the
  form `impl` (`convolutions.CONV_IMPLS`) and, for a stem, `stem_impl`; the input
  gradient is 0.0 if not `input_grad`."""
  conv = convolutions.stem_conv(features, kernel, strides, None, dtype, impl, stem_impl)
  x = jax.random.normal(jax.random.key(1), in_shape, dtype)
  params = conv.init(jax.random.key(0), x)
  out = jax.eval_shape(conv.apply, params, x)
  dy = jnp.ones(out.shape, out.dtype)
  # As the train step compiles them (channels-last for bf16 on NVIDIA cards).
  jit = functools.partial(jax.jit, compiler_options=models.conv_compiler_options(dtype))
  forward = jit(conv.apply)
  dx = jit(lambda p, x: jax.vjp(lambda x: conv.apply(p, x), x)[1](dy))
  dw = jit(lambda p, x: jax.vjp(lambda p: conv.apply(p, x), p)[1](dy))
  return tuple(_median_time(f, params, x, reps=reps) if f is not dx or input_grad else 0.0
               for f in (forward, dx, dw))


def time_torch_conv(kernel, strides, in_shape, features, reps, *, input_grad=True):
  """(forward, input-gradient, kernel-gradient) seconds of `torch.nn.Conv3d` at the
  same shapes. The gradients are timed as forward + that gradient (autograd asks
  cuDNN/oneDNN for that one alone), less the forward."""
  import torch  # pylint: disable=g-import-not-at-top
  n, t, h, w, c = in_shape
  conv = torch.nn.Conv3d(c, features, kernel, stride=strides, bias=False,
                         padding=[k // 2 for k in kernel])
  x = torch.randn(n, c, t, h, w, requires_grad=input_grad)
  with torch.no_grad():
    dy = torch.ones_like(conv(x))

  # On a CPU PyTorch returns when the work is done: nothing to wait for.
  median = lambda fn: _median_time(fn, reps=reps, sync=lambda _: None)

  def forward():
    with torch.no_grad():
      conv(x)

  fwd = median(forward)
  dx = median(lambda: torch.autograd.grad(conv(x), (x,), dy)) - fwd if input_grad else 0.0
  dw = median(lambda: torch.autograd.grad(conv(x), (conv.weight,), dy)) - fwd
  return fwd, dx, dw


def time_encoder(cfg, x, dtype, reps) -> float:
  """Seconds of one forward + backward of the whole encoder, BatchNorm training."""
  encoder = resnet3d.build_encoder(cfg, dtype=dtype)
  variables = encoder.init(jax.random.key(0), x, train=False)

  @jax.jit
  def grads(params, x):
    def loss(params, x):
      (pooled, fmap), _ = encoder.apply(
          {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
          mutable=["batch_stats"])
      return jnp.sum(pooled.astype(jnp.float32)) + jnp.sum(fmap.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  return _median_time(grads, variables["params"], x, reps=reps)


def time_stem(conv, features, dtype):
  """Prints the first convolution's forward and kernel-gradient times in each form."""
  name, kernel, strides, in_shape = conv
  module = convolutions.stem_conv(features, kernel, strides, None, dtype, "3d", "conv")
  out, _ = jax.eval_shape(module.init_with_output, jax.random.key(0),
                          jax.ShapeDtypeStruct(in_shape, dtype))
  flops = 2.0 * math.prod(out.shape) * math.prod(kernel) * in_shape[-1]
  print(f"{name}: {'x'.join(map(str, kernel))} stride {'x'.join(map(str, strides))}, "
        f"{in_shape} -> {out.shape}, {flops / 1e9:.1f} GFLOP per pass (7x7 taps)")
  for impl in _STEM_CONV_IMPLS.value:
    for stem in ("conv", "space_to_depth"):
      fwd, _, dw = time_conv(kernel, strides, in_shape, features, impl, dtype, _REPS.value,
                             input_grad=False, stem_impl=stem)
      print(f"  conv_impl={impl:<8} stem_impl={stem:<15} forward {fwd * 1e3:9.2f} ms "
            f"({flops / fwd / 1e9:8.1f} GFLOP/s)  kernel gradient {dw * 1e3:9.2f} ms "
            f"({flops / dw / 1e9:8.1f} GFLOP/s)", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  c = FLAGS.config
  dtype = jnp.dtype(c.dtype)
  clips = c.batch_size * 6
  s = c.input.crop_size
  x = jnp.zeros((clips, c.input.num_frames, s, s, 3), dtype)
  cfg = c.model.encoder.to_dict()
  print(f"{jax.devices()[0].device_kind}, {c.dtype}, encoder {cfg}, input {x.shape}; "
        f"seconds, median of {_REPS.value}")
  convs = list_convs(resnet3d.build_encoder(dict(cfg, conv_impl="3d"), dtype=dtype), x)
  params = jax.eval_shape(
      lambda v: resnet3d.build_encoder(cfg).init(jax.random.key(0), v, train=False),
      x)["params"]

  def features(name):  # output channels of the convolution at that path
    node = params
    for part in name.split("/"):
      node = node[part]
    return node["kernel"].shape[-1]

  if _STEM.value:
    time_stem(convs[0], features(convs[0][0]), dtype)
    return
  impls = ("3d", "2d1d") + (("torch",) if _TORCH.value else ())
  total = {impl: [0.0] * 3 for impl in impls}
  print(f"{'convolution':<28} {'kernel':<9} {'stride':<9} {'input':<22} "
        f"{'3d fwd/dx/dw':<24} {'2d1d fwd/dx/dw':<24} 3d/2d1d" +
        (f" {'torch fwd/dx/dw':<24} jax/torch" if _TORCH.value else ""))
  fmt = lambda t: "/".join(f"{v:.3f}" for v in t)
  for name, kernel, strides, in_shape in convs:
    # The first convolution reads the views, which need no gradient.
    input_grad = name != convs[0][0]
    times = {}
    for impl in impls:
      if impl == "2d1d" and not (kernel[0] == 1 or kernel[1] == kernel[2] == 1):
        times[impl] = times["3d"]  # stays 3D in that form
      elif impl == "torch":
        times[impl] = time_torch_conv(kernel, strides, in_shape, features(name), _REPS.value,
                                      input_grad=input_grad)
      else:
        times[impl] = time_conv(kernel, strides, in_shape, features(name), impl, dtype,
                                _REPS.value, input_grad=input_grad)
      total[impl] = [a + b for a, b in zip(total[impl], times[impl])]
    line = (f"{name:<28} {'x'.join(map(str, kernel)):<9} {'x'.join(map(str, strides)):<9} "
            f"{str(in_shape):<22} {fmt(times['3d']):<24} {fmt(times['2d1d']):<24} "
            f"{sum(times['3d']) / sum(times['2d1d']):.2f}")
    if _TORCH.value:
      best = min(sum(times["3d"]), sum(times["2d1d"]))
      line += f" {fmt(times['torch']):<24} {best / sum(times['torch']):.2f}"
    print(line, flush=True)
  line = (f"{'all convolutions':<70} {'/'.join(f'{v:.2f}' for v in total['3d']):<24} "
          f"{'/'.join(f'{v:.2f}' for v in total['2d1d']):<24} "
          f"{sum(total['3d']) / sum(total['2d1d']):.2f}")
  if _TORCH.value:
    best = min(sum(total["3d"]), sum(total["2d1d"]))
    line += (f" {'/'.join(f'{v:.2f}' for v in total['torch']):<24} "
             f"{best / sum(total['torch']):.2f}")
  print(line)
  if _WHOLE.value:
    for impl in ("3d", "2d1d"):
      t = time_encoder(dict(cfg, conv_impl=impl), x, dtype, _REPS.value)
      print(f"whole encoder fwd+bwd, conv_impl={impl}: {t:.3f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
