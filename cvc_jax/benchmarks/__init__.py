"""Benchmarks of the host side: `python -m cvc_jax.benchmarks.input_pipeline`."""
