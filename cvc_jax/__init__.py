"""cvc_jax: static and dynamic concepts for self-supervised video learning."""

from cvc_jax import host_memory

# Before jax or TensorFlow start threads: glibc fixes its arena limit then.
HOST_MEMORY_KEPT = host_memory.keep_freed_memory()
