"""Concept heads of the pretraining model (SPEC section 3).

Names follow the authors' PyTorch modules so weights convert one-to-one: an
`nn.Sequential` child `fv.0` is the Flax submodule `fv_0`, and so on.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvc_jax.models.resnet3d import BatchNorm

# PyTorch's LayerNorm epsilon; Flax's default (1e-6) would shift the outputs.
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5)


def _dense(features, name, dtype, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


def mlp_head(name, *, hidden, out, train, dtype, batch_norm):
  """`name`_0 Linear -> [`name`_1 BatchNorm] -> ReLU -> `name`_2|3 Linear.

  `hidden=0` gives a single Linear named `name` (the linear ablation rows). Call it
  inside a compact module: the layers become that module's children, and the
  returned function may be applied several times with shared parameters (each
  application's BatchNorm then sees that application's batch, as in PyTorch).
  """
  if not hidden:
    return _dense(out, name, dtype)
  first = _dense(hidden, f"{name}_0", dtype)
  last = _dense(out, f"{name}_{3 if batch_norm else 2}", dtype)
  # Global-batch statistics under jit, no axis_name needed.
  norm = (BatchNorm(use_running_average=not train, dtype=dtype, name=f"{name}_1")
          if batch_norm else (lambda x: x))
  return lambda x: last(nn.relu(norm(first(x))))


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(||x||, eps), as torch.nn.functional.normalize, gradient included.

  The maximum is taken under the square root: sqrt(max(||x||^2, eps^2)) is the
  same value, but where x = 0 (a post-ReLU feature that is all zeros) the
  gradient of max(sqrt(||x||^2), eps) is 0 times sqrt's infinite slope, NaN,
  where torch's is g / eps.
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(squared, eps * eps))


def concept_attention(q: jax.Array, k: jax.Array, dim: int) -> jax.Array:
  """The attention of `LocalConceptAggregation` from its queries and keys (SPEC 3).

  Softmax over the concepts (they compete for each token), + 1e-8, then each
  concept's weights renormalised over the tokens; in float32 whatever the
  compute dtype (in bfloat16 the 1e-8 vanishes and the sums drift by ~1e-2).

  Args:
    q: [B, C, dim] the templates' queries.
    k: [B, N, dim] the tokens' keys.
    dim: the width the logits are scaled by (1 / sqrt(dim)).

  Returns:
    float32 [B, N, C]; for each concept it sums to 1 over the N tokens.
  """
  logits = jnp.einsum("bcd,bnd->bnc", q * dim**-0.5, k, preferred_element_type=jnp.float32)
  attn = jax.nn.softmax(logits, axis=-1) + 1e-8
  return attn / jnp.sum(attn, axis=1, keepdims=True)


class LocalConceptAggregation(nn.Module):
  """Cross-attention from concept templates to local feature tokens (SPEC 3).

  One slot-attention style iteration: the softmax runs over the concept axis so
  concepts compete for each token, then each concept's weights are renormalised
  over the tokens. The authors call this module `lit`.

  Attributes:
    dim: width of the templates (the concept space) and of the output.
    dtype: compute dtype.
  """
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, templates):
    """Aggregates tokens into one feature per template.

    Args:
      tokens: [B, N, D] local features (the flattened last feature map).
      templates: [C, dim] concept prototype rows, shared by the batch.

    Returns:
      [B, C, dim] local concept features (not normalised).
    """
    tokens = LayerNorm(dtype=self.dtype, name="norm_inputs")(tokens)
    k = _dense(self.dim, "project_k", self.dtype, use_bias=False)(tokens)
    v = _dense(self.dim, "project_v", self.dtype, use_bias=False)(tokens)
    t = jnp.broadcast_to(templates, (tokens.shape[0],) + templates.shape)
    q = _dense(self.dim, "project_q", self.dtype, use_bias=False)(
        LayerNorm(dtype=self.dtype, name="norm_templates")(t))
    attn = concept_attention(q, k, self.dim).astype(v.dtype)
    t = jnp.einsum("bnd,bnc->bcd", v, attn) + t
    h = LayerNorm(dtype=self.dtype, name="norm_mlp")(t)
    h = _dense(self.dim, "mlp_2", self.dtype)(
        nn.relu(_dense(self.dim // 2, "mlp_0", self.dtype)(h)))
    return t + h
