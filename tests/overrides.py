"""The config changes a test run makes, as one dict: applied to a config in
process, or passed to `cvc_jax.main` as --config.KEY=VALUE flags."""

from typing import Any, Mapping

TINY_DATA = "synthetic_motion/tiny"  # 16 training videos of 40 x 48


def tiny_pretraining(data_dir: str, steps: int) -> dict[str, Any]:
  """`steps` pretraining steps of batch 8 on the tiny synthetic set (2 per epoch),
  a checkpoint after each, no evaluation after."""
  return {"input.data_dir": data_dir, "input.dataset": TINY_DATA, "batch_size": 8,
          "num_epochs": steps // 2, "checkpoint_every_steps": 1,
          "eval_after_pretraining": False}


def apply(config, overrides: Mapping[str, Any]):
  """`config` with each dotted KEY of `overrides` set; returns it. A KEY the
  config lacks is refused, as `cvc_jax.main` refuses its flag."""
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    target = config
    for name in path:
      target = target[name]
    if leaf not in target:
      raise KeyError(f"{key}: no such config key")
    target[leaf] = value
  return config


def flags(overrides: Mapping[str, Any]) -> list[str]:
  """`overrides` as `cvc_jax.main`'s command-line flags."""
  return [f"--config.{key}={value}" for key, value in overrides.items()]
