"""The pretraining model and step: sharding, frozen prototypes, gradients, variants."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import reference, ucf101
from cvc_jax import concepts
from cvc_jax import models
from cvc_jax import parallel
from cvc_jax import pretrain
from cvc_jax.models import cvc
from cvc_jax.models import heads
from tests import jaxprs

B = 8  # one video per fake device


def _setup(config, batch=B, seed=0):
  views = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 6) + (
      config.input.num_frames, config.input.crop_size, config.input.crop_size, 3))
  variables = models.jit_init(functools.partial(cvc.build_model(config).init, train=False))(
      jax.random.PRNGKey(seed), views)
  queue = jnp.tanh(jax.random.normal(jax.random.PRNGKey(seed + 2),
                                     (config.loss.queue_size, 6, 2 * config.model.num_concepts)))
  return variables, views, queue


@pytest.mark.parametrize("config_module", [ucf101, reference])
def test_terms_sharded_over_8_devices_equal_one_device(config_module):
  config = config_module.get_config("runlocal")
  variables, views, queue = _setup(config)
  model = cvc.build_model(config)
  epoch = config.loss.loc_start_epoch  # queue on, local loss in the total

  def terms(variables, views, queue):
    out, _ = model.apply(variables, views, train=True, mutable=["batch_stats"])
    return pretrain.compute_losses(out, config, queue=queue, epoch=epoch)

  single = jax.jit(terms)(variables, views, queue)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8, "tests/conftest.py should give 8 fake CPU devices"
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  sharded = jax.jit(terms, in_shardings=(replicated, batch, replicated))(
      jax.device_put(variables, replicated), jax.device_put(views, batch),
      jax.device_put(queue, replicated))
  for name in pretrain.TERMS + ("total",):
    np.testing.assert_allclose(sharded[name], single[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_prototypes_get_no_update_in_epoch_0():
  config = ucf101.get_config("runlocal")
  _, views, _ = _setup(config)
  steps_per_epoch = 2
  state = pretrain.init_train_state(config, jax.random.PRNGKey(0), views.shape,
                                    steps_per_epoch)
  step = jax.jit(functools.partial(pretrain.train_step, config=config,
                                   steps_per_epoch=steps_per_epoch))
  start = state.params
  for _ in range(steps_per_epoch):
    state, metrics = step(state, views)
    assert np.isfinite(metrics["total"])
  for name in cvc.PROTOTYPES:
    # Equal up to the rounding of renormalising unit rows at every step.
    np.testing.assert_allclose(state.params[name]["kernel"], start[name]["kernel"],
                               rtol=1e-6, atol=1e-7, err_msg=f"{name} moved in epoch 0")
  # Everything else learns from the first step.
  assert not np.allclose(state.params["fvv_0"]["kernel"], start["fvv_0"]["kernel"])
  state, _ = step(state, views)  # epoch 1: the prototypes join
  for name in cvc.PROTOTYPES:
    moved = np.abs(state.params[name]["kernel"] - start[name]["kernel"]).max()
    assert moved > 1e-4, name
  # The queue is a FIFO of the codes, newest last.
  assert state.queue.shape == (config.loss.queue_size, 6, 2 * config.model.num_concepts)


def test_prototype_gradients_follow_the_views_that_use_them():
  """Where gradients flow (SPEC 4): entropy_s reads d views' codes, so only C_d
  gets its gradient; rec_s reads codes of s views, so C_s and g_s, not g_v; the
  reconstruction target h is a constant, so InfoNCE's heads see no rec gradient."""
  config = ucf101.get_config("runlocal")
  variables, views, _ = _setup(config, batch=4)
  model = cvc.build_model(config)

  @jax.jit
  def grad_mass(params):
    """{term: {top-level module: sum |d term / d params|}}, one compile for all."""
    def term(params, name):
      out, _ = model.apply({**variables, "params": params}, views, train=True,
                           mutable=["batch_stats"])
      return pretrain.compute_losses(out, config)[name]
    mass = lambda tree: sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(tree))
    return {name: {k: mass(v) for k, v in jax.grad(term)(params, name).items()}
            for name in ("entropy_s", "rec_s", "I_vv", "loc_v")}

  masses = jax.tree_util.tree_map(float, grad_mass(variables["params"]))
  grads = masses.__getitem__
  g = grads("entropy_s")
  assert g["prototype_d"] > 0 and g["prototype_s"] == 0 and g["prototype"] == 0
  g = grads("rec_s")
  assert g["gs_0"] > 0 and g["prototype_s"] > 0 and g["gv_0"] == 0 and g["fvv_0"] == 0
  g = grads("I_vv")
  assert g["fvv_0"] > 0 and g["backbone"] > 0 and g["fsv_0"] == 0 and g["prototype"] == 0
  g = grads("loc_v")
  assert g["lit"] > 0 and g["prototype"] > 0 and g["prototype_s"] == 0


def test_total_is_the_weighted_sum_of_the_terms():
  """SPEC 4's total by default (entropy at 0.1, L_loc from loc_start_epoch), the
  config's weights otherwise, and a weights dict that misses a term is refused."""
  config = ucf101.get_config("runlocal")
  variables, views, queue = _setup(config, batch=4)
  out, _ = jax.jit(functools.partial(cvc.build_model(config).apply, train=True,
                                     mutable=["batch_stats"]))(variables, views)
  start = config.loss.loc_start_epoch

  def total(config, epoch):
    t = pretrain.compute_losses(out, config, queue=queue, epoch=epoch)
    return {k: float(v) for k, v in t.items()}

  t = total(config, start)
  spec = (t["I_vv"] + t["I_vs"] + t["I_vd"] + t["align_s"] + t["align_d"] +
          0.1 * (t["entropy_s"] + t["entropy_d"]) + t["rec_v"] + t["rec_s"] + t["rec_d"])
  local = t["loc_v"] + t["loc_s"] + t["loc_d"]
  assert local > 0
  np.testing.assert_allclose(t["total"], spec + local, rtol=1e-6)
  np.testing.assert_allclose(total(config, start - 1)["total"], spec, rtol=1e-6)

  with config.unlocked():
    config.loss.weights.I_vd = 6.0
    config.loss.weights.rec_v = 0.0
    config.loss.weights.loc_s = 2.0
  np.testing.assert_allclose(total(config, start)["total"], spec + local + 5 * t["I_vd"]
                             - t["rec_v"] + t["loc_s"], rtol=1e-6)
  with config.unlocked():
    del config.loss.weights["rec_d"]
  with pytest.raises(ValueError, match=r"missing \['rec_d'\]"):
    total(config, start)


def test_bfloat16_compute_keeps_float32_parameters():
  config = ucf101.get_config("runlocal")
  variables, views, queue = _setup(config, batch=4)
  full = pretrain.loss_terms(variables, views, config, queue=queue, epoch=6)
  with config.unlocked():
    config.dtype = "bfloat16"
  init = functools.partial(cvc.build_model(config).init, train=False)
  half_vars = jax.eval_shape(init, jax.random.PRNGKey(0), views)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(half_vars))
  half = pretrain.loss_terms(variables, views, config, queue=queue, epoch=6)
  # Every one of the model's convolutions and matrix products runs in bfloat16
  # operands (concept attention's too; it accumulates and softmaxes in float32) ...
  ops = collections.Counter(
      (eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars[:2]))
      for eqn in jaxprs.equations(jax.make_jaxpr(init)(jax.random.PRNGKey(0), views))
      if eqn.primitive.name in ("conv_general_dilated", "dot_general"))
  assert set(ops) == {("conv_general_dilated", ("bfloat16", "bfloat16")),
                      ("dot_general", ("bfloat16", "bfloat16"))}, ops
  assert ops["conv_general_dilated", ("bfloat16", "bfloat16")] == 15  # (1,1,1,1) blocks
  # ... and the terms stay close to float32's (measured: I_vv 0.09 apart, the
  # others under 0.003), yet not equal.
  for name, atol in (("I_vv", 0.3), ("align_s", 0.01), ("rec_v", 0.01)):
    np.testing.assert_allclose(half[name], full[name], rtol=0, atol=atol, err_msg=name)
  assert any(half[name] != full[name] for name in ("I_vv", "align_s", "rec_v"))


def test_concept_attention_runs_in_float32_whatever_the_compute_dtype():
  from cvc_jax.models import heads  # pylint: disable=g-import-not-at-top
  key_q, key_k = jax.random.split(jax.random.key(0))
  q = (3 * jax.random.normal(key_q, (2, 16, 64))).astype(jnp.bfloat16)
  k = (3 * jax.random.normal(key_k, (2, 98, 64))).astype(jnp.bfloat16)
  attn = heads.concept_attention(q, k, 64)
  assert attn.dtype == jnp.float32
  np.testing.assert_allclose(attn.sum(axis=1), 1.0, atol=1e-6)  # per concept
  want = heads.concept_attention(q.astype(jnp.float32), k.astype(jnp.float32), 64)
  np.testing.assert_allclose(attn, want, rtol=1e-5, atol=1e-9)


def test_unknown_compute_dtype_is_named():
  config = ucf101.get_config("runlocal")
  with config.unlocked():
    config.dtype = "bf16"
  with pytest.raises(ValueError, match=r"config.dtype must be one of \('float32', "
                                       r"'bfloat16', 'float64'\), got 'bf16'"):
    cvc.build_model(config)


def test_the_concept_space_follows_the_encoder_unless_set():
  # Unset, the concept space is the encoder's width D for every backbone
  # (identity sigma needs exactly that), in the config and in a CVCModel built
  # without one; set, linear and MLP sigma use it.
  for backbone, d in (("r2plus1d18", 512), ("r3d34", 512), ("r3d50", 2048)):
    assert cvc.build_model(ucf101.get_config(f"backbone={backbone}")).concept_dim == d
  config = ucf101.get_config("runlocal")
  assert cvc.build_model(config).concept_dim == 8 * 8
  x = jnp.zeros((2, 6, 4, 32, 32, 3))
  for sigma in ("identity", "linear"):  # a CVCModel built without a config
    bare = cvc.CVCModel(encoder=config.model.encoder.to_dict(), num_concepts=8, sigma=sigma)
    variables = jax.eval_shape(functools.partial(bare.init, train=False),
                               jax.random.key(0), x)
    assert variables["params"]["lit"]["project_q"]["kernel"].shape == (64, 64)
    if sigma == "linear":
      assert variables["params"]["fv"]["kernel"].shape == (64, 64)
  for sigma in ("linear", "mlp"):
    config = ucf101.get_config(f"sigma={sigma},runlocal")
    config.model.sigma_dim = 24
    variables = jax.eval_shape(
        functools.partial(cvc.build_model(config).init, train=False), jax.random.key(0), x)
    first = variables["params"]["fv" if sigma == "linear" else "fv_0"]  # D -> 24
    assert first["kernel"].shape == (64, 24), sigma
    assert variables["params"]["prototype"]["kernel"].shape == (24, 2 * 8), sigma
  config = ucf101.get_config("runlocal")
  config.model.sigma_dim = 24
  with pytest.raises(ValueError, match=r"sigma='identity' needs model.sigma_dim == "
                                       r"encoder width 64, got 24"):
    jax.eval_shape(functools.partial(cvc.build_model(config).init, train=False),
                   jax.random.key(0), x)


@pytest.mark.parametrize("variant", ["sigma=identity", "sigma=mlp,encoders=separate"])
def test_each_view_path_is_the_pretraining_models_own(variant):
  # concepts.ViewConcepts runs one kind of view alone; in eval mode its codes
  # and local features are CVCModel's for that kind's views.
  config = ucf101.get_config(f"{variant},runlocal")
  variables, views, _ = _setup(config, batch=2)
  variables = dict(variables, params=cvc.normalize_prototypes(variables["params"]))
  model = cvc.build_model(config)
  out = model.apply(variables, views, train=False)
  for i, (kind, path) in enumerate(concepts.view_paths(model).items()):
    for j in (2 * i, 2 * i + 1):
      codes, local = path.apply(variables, views[:, j])
      np.testing.assert_allclose(codes, out["codes"][:, j], rtol=1e-5, atol=1e-6,
                                 err_msg=kind)
      np.testing.assert_allclose(heads.l2_normalize(local), out["local"][kind][:, j - 2 * i],
                                 rtol=1e-5, atol=1e-6, err_msg=kind)


def test_an_encoder_without_4_stages_is_named():
  config = ucf101.get_config("runlocal")
  with config.unlocked():
    config.model.encoder.blocks = (1,)
  with pytest.raises(ValueError, match=r"model.encoder.blocks gives the blocks of the 4 "
                                       r"stages, e.g. \(2, 2, 2, 2\); got \(1,\)"):
    pretrain.init_train_state(config, jax.random.key(0), (2, 6, 4, 32, 32, 3), 1)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="sigmaa"):
    ucf101.get_config("sigmaa=mlp")
  with pytest.raises(ValueError, match="'huge'"):
    ucf101.get_config("decoder=huge")


def test_a_batch_the_devices_do_not_divide_is_refused_by_name():
  devices = jax.devices()[:4]
  assert parallel.data_mesh(8, devices).shape == {"data": 4}
  with pytest.raises(ValueError, match="batch_size 6 must be divisible by the 4 devices: "
                                       "set --config.batch_size to a multiple of 4"):
    parallel.data_mesh(6, devices)
