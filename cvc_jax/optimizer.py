"""The pretraining optimiser (SPEC 5): Adam with L2 weight decay, or AdamW, on a
step schedule, with the prototypes frozen for their first epochs.

The downstream trainers use the same Adam and schedule without the freezing.
"""

import jax
import optax

from cvc_jax.models import cvc


def adam_with_decay(optim) -> optax.GradientTransformation:
  """`optim.name`'s Adam, before the learning rate (config.optim, SPEC 5).

  'adam' adds the L2 decay to the gradient before the moments (torch Adam, the
  reference's); 'adamw' adds it to the update after them (decoupled).
  """
  adam = optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.name == "adam":
    return optax.chain(optax.add_decayed_weights(optim.weight_decay), adam)
  if optim.name == "adamw":
    return optax.chain(adam, optax.add_decayed_weights(optim.weight_decay))
  raise ValueError(f"optim.name must be 'adam' or 'adamw', got {optim.name!r}.")


def lr_schedule(optim, steps_per_epoch: int) -> optax.Schedule:
  """optim.lr, times optim.decay_factor at each of optim.decay_epochs."""
  return optax.piecewise_constant_schedule(
      optim.lr, {int(e * steps_per_epoch): optim.decay_factor for e in optim.decay_epochs})


def scheduled(tx: optax.GradientTransformation, optim,
              steps_per_epoch: int) -> optax.GradientTransformation:
  """`tx`'s update scaled by `lr_schedule`: the last step of every trainer's optimiser."""
  return optax.chain(tx, optax.scale_by_learning_rate(lr_schedule(optim, steps_per_epoch)))


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with L2 weight decay (or AdamW), the step schedule, frozen prototypes.

  As in the reference (torch Adam, whose prototypes get no gradient in epoch 0),
  the prototypes' Adam moments and bias correction only start counting once they
  are unfrozen, and they get no weight decay while frozen.
  """
  frozen_steps = config.loss.freeze_prototypes_epochs * steps_per_epoch
  grouped = optax.multi_transform(
      {"prototypes": optax.transforms.conditionally_mask(
          adam_with_decay(config.optim), lambda step: step >= frozen_steps),
       "rest": adam_with_decay(config.optim)},
      lambda params: jax.tree_util.tree_map_with_path(
          lambda path, _: "prototypes" if cvc.is_prototype(path) else "rest", params))
  return scheduled(grouped, config.optim, steps_per_epoch)
