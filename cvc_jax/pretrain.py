"""Pretraining: the loss of SPEC section 4 over the model's outputs, the train
state with its concept queues, the train step and its loop (the optimiser of
section 5 is `cvc_jax.optimizer`).
"""

import contextlib
import functools
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import jax
from jax.sharding import NamedSharding
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from cvc_jax import checkpointing
from cvc_jax import losses
from cvc_jax import models
from cvc_jax import optimizer
from cvc_jax import parallel
from cvc_jax import sampling
from cvc_jax import views as views_lib
from cvc_jax.models import cvc

TERMS = ("I_vv", "I_vs", "I_vd", "align_s", "align_d", "entropy_s", "entropy_d",
         "rec_v", "rec_s", "rec_d", "loc_v", "loc_s", "loc_d")
NUM_VIEWS = len(views_lib.VIEWS)  # v1 v2 s1 s2 d1 d2: the clips a video gives each step
# Views per concept kind: static concepts align v1 v2 s1 s2, dynamic v1 v2 d1 d2.
STATIC_VIEWS = np.array([0, 1, 2, 3])
DYNAMIC_VIEWS = np.array([0, 1, 4, 5])


def compute_losses(out: dict[str, Any], config, *, queue: jax.Array | None = None,
                   epoch: int | jax.Array = 0) -> dict[str, jax.Array]:
  """Every loss term and the total, from the outputs of `CVCModel`.

  Args:
    out: the model's output dict (codes [B, 6, 2K], ...).
    config: the full config (reads `config.loss`, `config.model.num_concepts`).
    queue: None or [Q, 6, 2K] detached codes of earlier batches, newest last.
    epoch: the current epoch (a Python int or a traced scalar). The queue joins the
      Sinkhorn from `loss.queue_start_epoch`, L_loc joins the total from
      `loss.loc_start_epoch`; the local terms are reported either way.

  Returns:
    A dict with the 13 terms of `TERMS` and `total`, float32 scalars.
  """
  lc, k = config.loss, config.model.num_concepts
  h, codes, proj = out["h"], out["codes"], out["proj"]
  per_view = jnp.swapaxes(codes, 0, 1)  # [6, B, 2K]
  t = {}

  # 1) Global contrast, InfoNCE with detached keys (SPEC 4).
  nce = lambda q, key: losses.info_nce(q, key, temperature=lc.nce_temperature)
  v1, v2 = proj["fvv"][:, 0], proj["fvv"][:, 1]
  t["I_vv"] = (nce(v1, v2) + nce(v2, v1)) / 2
  for name, (fwd, bwd) in {"I_vs": ("fvs", "fsv"), "I_vd": ("fvd", "fdv")}.items():
    a, b = proj[fwd], proj[bwd]  # a: v1 v2 through p_v*, b: the other kind's views
    t[name] = (nce(a[:, 0], b[:, 1]) + nce(a[:, 1], b[:, 0]) +
               nce(b[:, 0], a[:, 1]) + nce(b[:, 1], a[:, 0])) / 2

  # 2) Concept alignment: swapped prediction of Sinkhorn targets, static concepts
  #    over v and s views, dynamic concepts over v and d views (SPEC 4).
  def alignment(use_queue):
    def one(views, half):
      c = per_view[views][..., half]
      qu = jnp.swapaxes(queue, 0, 1)[views][..., half] if use_queue else None
      return losses.concept_alignment(c, qu, eps=lc.sinkhorn_eps,
                                      num_iters=lc.sinkhorn_iters,
                                      temperature=lc.concept_temperature)
    return one(STATIC_VIEWS, slice(0, k)), one(DYNAMIC_VIEWS, slice(k, 2 * k))

  if queue is None:
    t["align_s"], t["align_d"] = alignment(False)
  else:
    t["align_s"], t["align_d"] = jax.lax.cond(
        jnp.asarray(epoch) >= lc.queue_start_epoch,
        lambda: alignment(True), lambda: alignment(False))

  # 3) Decoupling: frame differences spread over static concepts, static frames
  #    over dynamic concepts (SPEC 4; weight in the total below).
  tau = lc.concept_temperature
  t["entropy_s"] = losses.negative_entropy(per_view[4:6, :, :k], temperature=tau)
  t["entropy_d"] = losses.negative_entropy(per_view[2:4, :, k:], temperature=tau)

  # 4) Fidelity: decoders reconstruct the detached encoder features (SPEC 4).
  for kind, views in (("v", slice(0, 2)), ("s", slice(2, 4)), ("d", slice(4, 6))):
    t[f"rec_{kind}"] = losses.reconstruction(out["rec"][kind], h[:, views])

  # 5) Local concept contrast over the valid concepts of both views (SPEC 4).
  local_codes = {"v": codes[:, 0:2], "s": codes[:, 2:4, :k], "d": codes[:, 4:6, k:]}
  for kind in "vsd":
    t[f"loc_{kind}"] = losses.local_concept_contrast(
        out["local"][kind], local_codes[kind], topk=lc.loc_topk,
        strict=lc.loc_topk_strict, margin=lc.loc_margin)

  # The weighted total; the weights are SPEC 4's unless the config says otherwise.
  weights = lc.weights
  missing, extra = set(TERMS) - set(weights), set(weights) - set(TERMS)
  if missing or extra:
    raise ValueError(f"config.loss.weights must weigh exactly the terms {TERMS}: "
                     f"missing {sorted(missing)}, unknown {sorted(extra)}.")
  weighted = {n: weights[n] * t[n] for n in TERMS}
  local = sum(v for n, v in weighted.items() if n.startswith("loc_"))
  total = sum(v for n, v in weighted.items() if not n.startswith("loc_"))
  t["total"] = total + jnp.where(jnp.asarray(epoch) >= lc.loc_start_epoch, local, 0.0)
  return t


def loss_terms(variables, views, config, *, queue=None, epoch: int = 0) -> dict[str, float]:
  """Every loss term for given weights and views: the parity interface.

  BatchNorm runs in training mode (batch statistics); the prototypes are used as
  given (the train step renormalises them before each step, as the reference does).

  Args:
    variables: {'params', 'batch_stats'} of `CVCModel` (e.g. from
      `cvc_jax.convert.from_torch`); other collections, such as 'queue', are ignored.
    views: float32 [B, 6, T, H, W, 3], order v1 v2 s1 s2 d1 d2, already augmented.
    config: the full config (e.g. `configs/reference.py`'s).
    queue: None or [Q, 6, 2K], newest last; used from `loss.queue_start_epoch` on.
    epoch: the epoch the terms are evaluated at.

  Returns:
    {name: float} for the 13 terms and `total`.
  """
  model = cvc.build_model(config)
  model_vars = {c: variables[c] for c in ("params", "batch_stats") if c in variables}

  @jax.jit
  def run(model_vars, views, queue):
    out, _ = model.apply(model_vars, views, train=True, mutable=["batch_stats"])
    return compute_losses(out, config, queue=queue, epoch=epoch)

  # Parity needs true float32 matrix products on every backend (no TF32 on GPUs).
  with jax.default_matmul_precision("float32"):
    terms = run(model_vars, jnp.asarray(views, jnp.float32),
                None if queue is None else jnp.asarray(queue, jnp.float32))
  return {name: float(value) for name, value in terms.items()}


def update_queue(queue: jax.Array, codes: jax.Array) -> jax.Array:
  """Pushes a batch of detached codes [B, 6, 2K] into the FIFO [Q, 6, 2K], newest last."""
  merged = jnp.concatenate([queue, jax.lax.stop_gradient(codes).astype(queue.dtype)], 0)
  return merged[-queue.shape[0]:]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed whole."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  queue: jax.Array  # [Q, 6, 2K] concept codes of earlier batches, newest last
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  model: nn.Module = flax.struct.field(pytree_node=False)


def initial_variables(config, rng: jax.Array, views_shape) -> dict[str, Any]:
  """The model's variables as `create_train_state(config, rng, ...)` starts them
  (before the prototypes are normalised): the demo's random baseline is the
  pretrained encoder's own initialisation."""
  init_rng, _ = jax.random.split(rng)
  return cvc.build_model(config).init(init_rng, jnp.zeros(views_shape, jnp.float32),
                                      train=False)


def create_train_state(config, rng: jax.Array, views_shape, steps_per_epoch: int) -> TrainState:
  """Initialises the model, optimiser and a random queue (as the reference's buffer)."""
  model = cvc.build_model(config)
  variables = initial_variables(config, rng, views_shape)
  _, queue_rng = jax.random.split(rng)
  params = cvc.normalize_prototypes(variables["params"])
  tx = optimizer.make_optimizer(config, steps_per_epoch)
  queue = jax.random.normal(
      queue_rng, (config.loss.queue_size, NUM_VIEWS, 2 * config.model.num_concepts))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params), queue=queue, tx=tx, model=model)


def init_train_state(config, rng: jax.Array, views_shape, steps_per_epoch: int, *,
                     sharding=None) -> TrainState:
  """`create_train_state`, compiled by `models.jit_init`, its arrays placed by
  `sharding` (None: one device)."""
  return models.jit_init(functools.partial(
      create_train_state, config, views_shape=views_shape,
      steps_per_epoch=steps_per_epoch), out_shardings=sharding)(rng)


def train_step(state: TrainState, views: jax.Array, config, steps_per_epoch: int):
  """One optimisation step on prepared views [B, 6, T, H, W, 3].

  A step whose loss or gradient is not finite changes nothing: the state that
  comes back is the one that went in, and `metrics['finite']` is False.

  Returns:
    (new state, metrics dict with every loss term, `total`, `grad_norm`, `finite`).
  """
  epoch = state.step // steps_per_epoch
  # Prototype rows are unit vectors at every forward pass (SPEC 3).
  params = cvc.normalize_prototypes(state.params)

  def loss_fn(params):
    out, updates = state.model.apply(
        {"params": params, "batch_stats": state.batch_stats}, views, train=True,
        mutable=["batch_stats"])
    terms = compute_losses(out, config, queue=state.queue, epoch=epoch)
    return terms["total"], (terms, out["codes"], updates["batch_stats"])

  grads, (terms, codes, batch_stats) = jax.grad(loss_fn, has_aux=True)(params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(params, updates),
      batch_stats=batch_stats, opt_state=opt_state,
      queue=update_queue(state.queue, codes))
  finite = jnp.isfinite(terms["total"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                     new_state, state)
  return new_state, dict(terms, grad_norm=grad_norm, finite=finite)


def batch_shapes(config, sharding: NamedSharding | None = None) -> dict[str, Any]:
  """A pretraining batch of `config` as shapes, placed by `sharding`: the 2T
  uint8 frames of each video in the raw_size canvas and their true sizes."""
  b, t, (h, w) = config.batch_size, config.input.num_frames, sampling.raw_size(config)
  return {"frames": jax.ShapeDtypeStruct((b, 2 * t, h, w, 3), jnp.uint8, sharding=sharding),
          "sizes": jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=sharding)}


def views_shape_of(config, batch: int | None = None) -> tuple[int, ...]:
  """The shape of a batch's six views (v1 v2 s1 s2 d1 d2): [B, 6, T, S, S, 3], B
  `batch` or else `config.batch_size`."""
  t, s = config.input.num_frames, config.input.crop_size
  return (batch or config.batch_size, NUM_VIEWS, t, s, s, 3)


def frames_train_step(config, steps_per_epoch: int):
  """The step `train_and_evaluate` jits, (state, batch, base key) -> (state,
  metrics): the six views built on the device from the batch's raw frames (SPEC
  section 1) with the base key folded with the step, then `train_step`."""

  def step_fn(state, batch, rng):
    views = views_lib.pretrain_views(batch["frames"], jax.random.fold_in(rng, state.step),
                                     config, batch["sizes"])
    return train_step(state, views, config, steps_per_epoch)

  return step_fn


def jitted_train_step(config, steps_per_epoch: int, mesh, compiler_options=None):
  """`frames_train_step` jitted on `mesh` as pretraining runs it: the state and key
  replicated, the batch split over `data`, the state donated; `compiler_options`
  go to XLA as given."""
  replicated, batch_sharding = parallel.shardings(mesh)
  return jax.jit(frames_train_step(config, steps_per_epoch), donate_argnums=(0,),
                 in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=(replicated, replicated), compiler_options=compiler_options)


def _checkpoint_tree(state: TrainState, rng: jax.Array) -> dict[str, Any]:
  """The saved state: parameters, BatchNorm statistics, optimiser, queues, step,
  and the run's base PRNG key. The input position is the step: batch s is a pure
  function of (seed, s), see `input_pipeline.pretrain_batches`."""
  return dict(step=state.step, params=state.params, batch_stats=state.batch_stats,
              opt_state=state.opt_state, queue=state.queue,
              rng=jax.random.key_data(rng))


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Pretrains from scratch or resumes from the newest complete checkpoint in workdir.

  Args:
    config: a full pretraining config.
    workdir: where checkpoints, TensorBoard events and config.json go.

  Returns:
    The final train state.
  """
  # Imported here so that the model, losses and train step import without
  # TensorFlow (clu's writers and the input pipeline bring it in).
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from cvc_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  datasets.ensure_built(config)
  steps_per_epoch = datasets.steps_per_epoch(config)
  total_steps = config.num_epochs * steps_per_epoch

  # One `data` axis over every device of every host; the batch is split along it
  # and everything else is replicated.
  mesh = parallel.data_mesh(config.batch_size)
  replicated, batch_sharding = parallel.shardings(mesh)
  # Replicated like the state, made by a jitted function (device_put cannot place
  # onto other processes' devices): with several processes orbax refuses to save
  # an array that lives on one process's device.
  rng = jax.jit(functools.partial(jax.random.key, config.seed), out_shardings=replicated)()
  state = init_train_state(config, rng, views_shape_of(config), steps_per_epoch,
                           sharding=replicated)

  # What is entered here is left on the way out, whatever the way, last first:
  # the metrics flushed; the last save awaited before SIGTERM's handler is given
  # back; the manager closed (it stops orbax's asynchronous machinery, which
  # complains at exit otherwise).
  with contextlib.ExitStack() as stack:
    manager = stack.enter_context(checkpointing.checkpoint_manager(
        workdir, max_to_keep=config.get("keep_checkpoints", 3),
        save_interval_steps=config.checkpoint_every_steps))
    # Resume: the newest checkpoint orbax finalised (a save cut short is never
    # listed). Restored in place of the fresh state: step, params, batch_stats,
    # opt_state, queue, then the base PRNG key; the data position follows the step.
    latest = manager.latest_step()
    if latest is not None:
      restored = checkpointing.restore(manager, latest, _checkpoint_tree(state, rng))
      rng = jax.random.wrap_key_data(restored.pop("rng"))
      state = state.replace(**restored)
      logging.info("Resumed from step %d in %s.", latest, workdir)
    start_step = int(state.step)
    # Written once the checkpoint is known to fit: a refused resume leaves the
    # config.json that describes the workdir's checkpoints.
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    p_step = jitted_train_step(config, steps_per_epoch, mesh,
                               models.conv_compiler_options(config.dtype))
    if start_step < total_steps:
      p_step = parallel.compiled_together(
          p_step, state, batch_shapes(config, batch_sharding), rng, name="train step")
    batches = input_pipeline.pretrain_batches(config, start_step=start_step)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    schedule = optimizer.lr_schedule(config.optim, steps_per_epoch)
    preemption = stack.enter_context(checkpointing.Preemption(manager))
    stack.callback(writer.flush)
    log_every = config.get("log_every_steps", 50)
    pending = None  # the previous step's metrics, read one step late to keep overlap
    timer = time.perf_counter()
    for step in range(start_step, total_steps):
      local = next(batches)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
               for k in ("frames", "sizes")}
      state, metrics = p_step(state, batch, rng)
      if pending is not None:
        _check_finite(*pending, manager)
      pending = (step, metrics)
      report(step + 1)
      if (step + 1) % log_every == 0 or step + 1 == total_steps:
        _check_finite(step, metrics, manager)
        elapsed, timer = time.perf_counter() - timer, time.perf_counter()
        scalars = {k: float(v) for k, v in metrics.items() if k != "finite"}
        scalars.update(lr=float(schedule(step)), steps_per_sec=log_every / elapsed,
                       clips_per_sec=log_every * config.batch_size * NUM_VIEWS / elapsed)
        writer.write_scalars(step + 1, scalars)
      preempted = preemption.reached(step + 1)
      if preempted or step + 1 == total_steps or manager.should_save(step + 1):
        # Only a state known to be finite is ever written.
        _check_finite(step, metrics, manager)
        pending = None
        manager.save(step + 1, args=ocp.args.StandardSave(_checkpoint_tree(state, rng)),
                     force=True)
      if preempted:
        logging.warning("Stopped at step %d after a preemption signal.", step + 1)
        break
    if pending is not None:
      _check_finite(*pending, manager)
  return state


def _check_finite(step: int, metrics, manager) -> None:
  """Stops the run at the first step with a non-finite loss, naming the terms."""
  if bool(metrics["finite"]):
    return
  values = {k: float(v) for k, v in metrics.items() if k != "finite"}
  bad = [k for k, v in values.items() if not np.isfinite(v)]
  manager.wait_until_finished()
  raise FloatingPointError(
      f"Non-finite loss at step {step} (counting from 0): {', '.join(bad)} = "
      f"{[values[k] for k in bad]}. That step was not applied; the last good "
      f"checkpoint (step {manager.latest_step()}) is intact. Lower optim.lr or use "
      f"float32 (config.dtype) and resume.")
