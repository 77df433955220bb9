"""The encoders' speed options compute what the plain forms do: the 2D + 1D and
padded convolutions, the space-to-depth stem, rematerialisation and the
hand-written BatchNorm."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reference
from cvc_jax import models
from cvc_jax import pretrain
from cvc_jax.models import convolutions
from cvc_jax.models import cvc
from cvc_jax.models import kernel_grads
from cvc_jax.models import resnet3d
from tests import jaxprs


# Kernel and strides of every convolution FactorisedConv takes in the encoders,
# and an even (2, 1, 1) one, whose output is a frame longer than its input.
# (3, 1, 1) at 5 frames runs as (3, 1) 2D convolutions, at 2 frames (or 4 with
# stride 2: outputs of 2 frames) as a sum of matrix products.
FACTORISED = [((1, 7, 7), (1, 2, 2), 5), ((3, 1, 1), (1, 1, 1), 5),
              ((1, 3, 3), (1, 2, 2), 5), ((3, 1, 1), (2, 1, 1), 5),
              ((1, 1, 1), (2, 2, 2), 5), ((1, 3, 3), (1, 1, 1), 5),
              ((3, 1, 1), (1, 1, 1), 2), ((3, 1, 1), (2, 1, 1), 4),
              ((2, 1, 1), (1, 1, 1), 5)]


@pytest.mark.parametrize("xla_gradients", [False, True])  # conv_impl 2d1d, 2d
@pytest.mark.parametrize("kernel,strides,frames", FACTORISED)
def test_factorised_conv_is_the_3d_conv(kernel, strides, frames, xla_gradients):
  conv3d = nn.Conv(6, kernel, strides=strides, padding=[(k // 2, k // 2) for k in kernel],
                   use_bias=False, kernel_init=convolutions.conv_init)
  conv2d = convolutions.FactorisedConv(6, kernel, strides, xla_gradients=xla_gradients)
  x = jax.random.normal(jax.random.key(1), (2, frames, 9, 10, 4))
  params = conv3d.init(jax.random.key(0), x)
  # The same parameter, initialised the same: checkpoints cannot tell them apart.
  jax.tree.map(np.testing.assert_array_equal, params, conv2d.init(jax.random.key(0), x))

  def out_and_grads(conv):
    f = lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
    return conv.apply(params, x), jax.grad(f, argnums=(0, 1))(params, x)

  # float32 sums in another order: each array to 1e-5 of its own scale (a
  # kernel gradient's entries reach 30, and one near 0.1 differs by 1.7e-5).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max()))),
      out_and_grads(conv3d), out_and_grads(conv2d))


@pytest.mark.parametrize("group_frames,row_channels", [(1, 16), (2, 16), (8, 1)])
@pytest.mark.parametrize("kernel,stride", [((1, 3, 3), 1), ((1, 7, 7), 2)])
@pytest.mark.parametrize("clips", [2, 8])
def test_frames_kernel_grad_sums_frame_groups_to_the_3d_gradient(
    monkeypatch, group_frames, row_channels, kernel, stride, clips):
  # Of each device's frames, groups of 1, 2 or all (a loop of several steps or
  # one); one product per kernel row (4 channels < 16) or per tap (4 >= 1). 8
  # clips split over the 8 fake devices: one share per device, summed after the
  # loop; 2 clips do not split and run as one share.
  x = jax.random.normal(jax.random.key(1), (clips, 4, 9, 10, 4))
  pad = [(k // 2, k // 2) for k in kernel]
  conv3d = lambda k: jax.lax.conv_general_dilated(
      x, k, (1, stride, stride), pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  k = jax.random.normal(jax.random.key(2), kernel + (4, 5))
  dy = jax.random.normal(jax.random.key(3), conv3d(k).shape)
  want = jax.vjp(conv3d, k)[1](dy)[0]
  frame_bytes = (x[0, 0].size + dy[0, 0].size) * 4
  monkeypatch.setattr(kernel_grads, "KERNEL_GRAD_GROUP_BYTES", group_frames * frame_bytes)
  monkeypatch.setattr(kernel_grads, "KERNEL_GRAD_ROW_CHANNELS", row_channels)
  batch = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)),
                                     jax.sharding.PartitionSpec("data"))
  if clips % 8 == 0:
    x, dy = jax.device_put(x, batch), jax.device_put(dy, batch)
  grad = jax.jit(lambda x, dy: kernel_grads.frames_kernel_grad(
      x, dy, k.shape, (stride, stride), pad[1:]))
  np.testing.assert_allclose(grad(x, dy), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  if clips % 8 == 0:  # no collective inside the loop: one all-reduce after it
    hlo = grad.lower(x, dy).compile().as_text()
    assert hlo.count("all-reduce(") == 1, hlo.count("all-reduce(")


@pytest.mark.parametrize("encoder", [
    dict(arch="r2plus1d", blocks=(1, 1, 1, 1), width=4),
    dict(arch="r2plus1d", blocks=(1, 1, 1, 1), width=4, bottleneck=True),
    dict(arch="hara", depth=10, width=4, conv1_t_size=1)])
def test_conv_impls_give_one_encoder(encoder):
  # float64, so that only a wrong computation, not the order of float32 sums that
  # BatchNorm of a few samples magnifies, can tell the two apart.
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), (2, 4, 16, 16, 3), jnp.float64)
    results = []
    # The padded form with the space-to-depth stem (12 -> 16 channels), so that
    # whole encoders check it without a fourth compilation each; every form of
    # the stem alone: test_space_to_depth_convolution_is_the_strided_one.
    for impl, stem in [("3d", "conv"), ("2d1d", "conv"), ("3d_pad8", "space_to_depth"),
                       ("2d", "conv")]:
      module = resnet3d.build_encoder(dict(encoder, conv_impl=impl, stem_impl=stem),
                                      dtype=jnp.float64)
      variables = models.jit_init(functools.partial(module.init, train=False))(
          jax.random.key(0), x)

      def loss(params, module=module, variables=variables):
        (pooled, fmap), stats = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"])
        return jnp.sum(pooled ** 2) + jnp.mean(fmap), (pooled, fmap, stats)

      grads, outs = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
      results.append((variables, outs, grads))
      if impl == "3d_pad8":  # cuDNN would see only widths that are multiples of 8
        jaxpr = jax.make_jaxpr(functools.partial(module.apply, train=False))(variables, x)
        convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
        assert convs
        for e in convs:  # NDHWC input, DHWIO kernel
          lhs, rhs = (v.aval.shape for v in e.invars)
          assert lhs[-1] % 8 == rhs[-2] % 8 == rhs[-1] % 8 == 0, (lhs, rhs)
  (vars3d, *rest3d) = results[0]
  for variables, *rest in results[1:]:
    assert jax.tree.structure(vars3d) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, vars3d, variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 rest3d, rest)


@pytest.mark.parametrize("shape,kernel,strides", [
    ((2, 4, 16, 16, 3), (1, 7, 7), (1, 2, 2)),  # R(2+1)D's stem
    ((1, 5, 17, 13, 3), (3, 7, 7), (2, 2, 2)),  # odd sizes, time strided, R3D / Hara
    ((1, 3, 9, 10, 2), (1, 4, 6), (1, 2, 2))])  # even kernels
@pytest.mark.parametrize("impl", ["3d", "2d1d", "3d_pad8", "2d"])
def test_space_to_depth_convolution_is_the_strided_one(shape, kernel, strides, impl):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  conv = convolutions.conv(5, kernel, strides, "stem", jnp.float32, "3d")
  params = models.jit_init(conv.init)(jax.random.key(1), x)
  s2d = convolutions.SpaceToDepthConv(5, kernel, strides, impl, jnp.float32)
  assert jax.tree.map(jnp.shape, jax.eval_shape(s2d.init, jax.random.key(1), x)) == (
      jax.tree.map(jnp.shape, params))

  def out_and_grad(module):
    loss = lambda p: jnp.sum(jnp.sin(module.apply(p, x)))
    return jax.jit(lambda p: (module.apply(p, x), jax.grad(loss)(p)))(params)

  (y, dk), (y_s2d, dk_s2d) = out_and_grad(conv), out_and_grad(s2d)
  assert y.shape == y_s2d.shape
  np.testing.assert_allclose(y_s2d, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk_s2d["params"]["kernel"], dk["params"]["kernel"],
                             rtol=1e-4, atol=1e-4)
  # What the backend runs: 4x the channels, no spatial stride. The 2d1d form
  # holds its convolution inside a custom_vjp's jaxpr.
  (conv_eqn,) = [eqn for eqn in jaxprs.equations(jax.make_jaxpr(s2d.apply)(params, x))
                 if eqn.primitive.name == "conv_general_dilated"]
  assert conv_eqn.invars[0].aval.shape[-1] >= 4 * shape[-1]
  assert tuple(conv_eqn.params["window_strides"])[-2:] == (1, 1)


def test_space_to_depth_refuses_other_strides_and_names():
  x = jnp.zeros((1, 2, 8, 8, 3))
  with pytest.raises(ValueError, match="stride 2.*stem_impl='conv'"):
    convolutions.SpaceToDepthConv(4, (1, 3, 3), (1, 1, 1)).init(jax.random.key(0), x)
  encoder = resnet3d.build_encoder(
      dict(arch="r2plus1d", blocks=(1, 1, 1, 1), width=4, stem_impl="s2d"))
  with pytest.raises(ValueError, match="stem_impl must be one of"):
    jax.eval_shape(lambda: encoder.init(jax.random.key(0), x, train=False))


def test_auto_conv_impl_is_2d1d_on_cpu():
  assert convolutions.resolve_conv_impl("auto") == "2d1d"
  assert convolutions.resolve_conv_impl("3d") == "3d"
  card = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  assert convolutions.resolve_conv_impl("auto", card) == "3d"  # a device named
  assert convolutions.resolve_conv_impl("2d") == "2d"
  with pytest.raises(ValueError, match="conv_impl"):
    convolutions.resolve_conv_impl("2plus1d")


def test_auto_stem_impl_is_space_to_depth_for_16_bit_on_nvidia(monkeypatch):
  assert convolutions.resolve_stem_impl("auto", "bfloat16") == "conv"  # this CPU
  assert convolutions.resolve_stem_impl("space_to_depth") == "space_to_depth"
  card = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  monkeypatch.setattr(jax, "devices", lambda *args: [card])
  assert convolutions.resolve_stem_impl("auto", jnp.bfloat16) == "space_to_depth"
  assert convolutions.resolve_stem_impl("auto", "float16", (2, 2, 2)) == "space_to_depth"
  assert convolutions.resolve_stem_impl("auto", "float32") == "conv"  # not measured
  assert convolutions.resolve_stem_impl("auto", "bfloat16", (1, 1, 1)) == "conv"
  assert convolutions.resolve_stem_impl("conv", "bfloat16") == "conv"
  card.device_kind = "AMD Instinct MI300X"
  assert convolutions.resolve_stem_impl("auto", "bfloat16") == "conv"
  monkeypatch.undo()
  # A device named, not the default one: what compile_for.py compiles for.
  card.device_kind = "NVIDIA H100 80GB HBM3"
  assert convolutions.resolve_stem_impl("auto", "bfloat16", device=card) == "space_to_depth"
  assert models.conv_compiler_options("bfloat16", card) == {"xla_gpu_force_conv_nhwc": True}
  with pytest.raises(ValueError, match="stem_impl must be one of"):
    convolutions.resolve_stem_impl("s2d")


def test_conv_compiler_options_force_channels_last_for_16_bit_on_nvidia(monkeypatch):
  assert models.conv_compiler_options("bfloat16") is None  # this CPU
  card = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
  monkeypatch.setattr(jax, "devices", lambda *args: [card])
  assert models.conv_compiler_options("bfloat16") == {"xla_gpu_force_conv_nhwc": True}
  assert models.conv_compiler_options(jnp.float16) == {"xla_gpu_force_conv_nhwc": True}
  assert models.conv_compiler_options("float32") is None
  card.device_kind = "AMD Instinct MI300X"
  assert models.conv_compiler_options("bfloat16") is None
  monkeypatch.undo()
  # XLA knows the option's name: a misspelt one is refused.
  assert jax.jit(lambda x: x + 1,
                 compiler_options=models.GPU_16BIT_CONV_COMPILER_OPTIONS)(1) == 2
  with pytest.raises(Exception, match="No such compile option"):
    jax.jit(lambda x: x + 1, compiler_options={"xla_gpu_force_conv_nhwcc": True})(1)


def test_remat_keeps_loss_and_gradients():
  # float64 compute (parameters and their gradients stay float32), as in
  # test_conv_impls_give_one_encoder: XLA fuses a rematerialised
  # program differently, and BatchNorm over a few samples magnifies the float32
  # rounding differences that follow.
  config = reference.get_config("runlocal")
  with config.unlocked():
    config.dtype = "float64"
  with jax.enable_x64(True):
    views = jax.random.normal(jax.random.key(1), (2, 6, 4, 32, 32, 3), jnp.float64)
    queue = jnp.tanh(jax.random.normal(jax.random.key(2),
                                       (config.loss.queue_size, 6, 16), jnp.float64))
    # Compiled: run op by op, the float64 initialisation took 20 s of this test.
    variables = models.jit_init(functools.partial(cvc.build_model(config).init,
                                                  train=False))(jax.random.key(0), views)
    results = {}
    for remat in resnet3d.REMAT_POLICIES:
      with config.unlocked():
        config.remat = remat
      model = cvc.build_model(config)
      assert model.remat == remat

      def loss(params, model=model):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             views, train=True, mutable=["batch_stats"])
        return pretrain.compute_losses(out, config, queue=queue, epoch=10)["total"]

      # Rematerialised blocks show up as remat regions in the gradient's program.
      jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
      assert ("remat" in jaxpr) == (remat != "none"), remat
      results[remat] = jax.jit(jax.value_and_grad(loss))(variables["params"])
  for remat in ("blocks", "dots"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 results["none"], results[remat])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_is_flax_batch_norm_with_torchs_running_variance(dtype):
  # resnet3d.BatchNorm writes its backward pass by hand; everything else must be
  # flax's BatchNorm with PyTorch's eps and momentum, but for the running
  # variance, which averages the unbiased batch variance as PyTorch's does.
  ours = resnet3d.BatchNorm(use_running_average=False, dtype=dtype)
  theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (4, 3, 5, 5, 6)) * 3 + 1
  variables = ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, variables,
               theirs.init(jax.random.key(1), x))
  variables = {"params": {"scale": jnp.linspace(0.5, 2, 6), "bias": jnp.linspace(-1, 1, 6)},
               "batch_stats": {"mean": jnp.linspace(0, 1, 6), "var": jnp.linspace(1, 3, 6)}}
  weights = jax.random.normal(jax.random.key(2), x.shape)

  def run(module):
    def loss(params, x):
      y, stats = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, stats)
    grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    evaluated = module.clone(use_running_average=True).apply(variables, x)
    return y, stats, evaluated, grads

  (y, stats, evaluated, grads), (y2, stats2, evaluated2, grads2) = run(ours), run(theirs)
  assert y.dtype == y2.dtype == evaluated.dtype == dtype
  for a, b in ((y, y2), (evaluated, evaluated2)):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, grads2)
  mean, var = stats["batch_stats"]["mean"], stats["batch_stats"]["var"]
  np.testing.assert_array_equal(mean, stats2["batch_stats"]["mean"])
  n = x.size // 6  # 300 values per channel
  old = variables["batch_stats"]["var"]
  flax_share = stats2["batch_stats"]["var"] - 0.9 * old  # 0.1 x the biased variance
  np.testing.assert_allclose(var, 0.9 * old + flax_share * n / (n - 1), rtol=1e-6)

  # And PyTorch's BatchNorm3d, from the same running statistics.
  import torch  # pylint: disable=g-import-not-at-top
  bn = torch.nn.BatchNorm3d(6)
  bn.running_mean.copy_(torch.from_numpy(np.asarray(variables["batch_stats"]["mean"])))
  bn.running_var.copy_(torch.from_numpy(np.asarray(variables["batch_stats"]["var"])))
  bn(torch.from_numpy(np.asarray(x, np.float32)).permute(0, 4, 1, 2, 3))
  np.testing.assert_allclose(mean, bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, bn.running_var.numpy(), rtol=1e-5)
