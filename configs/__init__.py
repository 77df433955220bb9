"""Experiment configs: `python -m cvc_jax.main --config=configs/<name>.py[:variant]`."""
