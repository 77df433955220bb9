"""cvc_jax: static and dynamic concepts for self-supervised video learning."""

from cvc_jax import host_memory

# Opt-in (CVC_JAX_KEEP_HOST_MEMORY=1), and before jax or TensorFlow start
# threads: glibc fixes its arena limit then.
HOST_MEMORY_KEPT = host_memory.keep_freed_memory()
