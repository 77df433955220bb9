"""The loss terms of static and dynamic concept learning (SPEC section 4).

Pure functions on arrays. Under `jax.jit` with the batch sharded over a device
mesh every sum over the batch axis below (InfoNCE negatives, Sinkhorn marginals,
local-contrast negatives) is a sum over the global batch: XLA inserts the
collectives, so no function here takes an axis name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cvc_jax.models.heads import l2_normalize

# The losses' matrix products run in full float32, as the reference's PyTorch runs
# them: at JAX's default precision float32 products run in TF32 on NVIDIA GPUs
# (bfloat16 passes on TPUs; jax.lax.Precision), about 1e-3 off, which moves
# InfoNCE's logits by 1e-2 at t = 0.07 and can put a cosine of unit vectors
# above 1. They are a few MFLOP, nothing next to the encoder.
_FULL = jax.lax.Precision.HIGHEST


def info_nce(query: jax.Array, key: jax.Array, *, temperature: float = 0.07) -> jax.Array:
  """InfoNCE with in-batch negatives and a stop-gradient on the keys (SPEC 4).

  NCE(q, k) = mean_n -log softmax_m(q^_n . sg(k^_m) / t)[n], ^ = L2-normalised.

  Args:
    query: [N, C] queries.
    key: [N, C] keys; key n is the positive of query n, the others its negatives.
    temperature: t.

  Returns:
    The scalar loss.
  """
  q = l2_normalize(query)
  k = jax.lax.stop_gradient(l2_normalize(key))
  logits = jnp.matmul(q, k.T, precision=_FULL) / temperature
  labels = jnp.arange(q.shape[0])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# log of the smallest positive float32 (2**-149): below it exp() is exactly 0.
_LOG_FLOAT32_TINY = -149.0 * float(np.log(2.0))


def sinkhorn(scores: jax.Array, *, eps: float = 0.05, num_iters: int = 3) -> jax.Array:
  """Balanced soft assignments of samples to concepts (SwAV's Sinkhorn-Knopp).

  Q = exp(scores / eps) (max-subtracted) as concepts x samples, normalised to total
  1, then `num_iters` times: rows to 1/K each, columns to 1/N each; the columns are
  finally normalised to 1 (SPEC 4).

  Computed in the log domain, so nothing overflows and no sample's column
  underflows to 0/0 (XLA flushes float32 subnormals to zero, where PyTorch keeps
  them). Entries the reference's float32 exp() rounds to exactly 0 are exactly 0
  here too, and a concept whose whole row is 0 gets the largest row scaling of the
  others instead of an infinite one, as the reference's `shoot_infs` does. A
  sample whose whole column is 0 (where the reference returns NaN) gets a uniform
  assignment.

  Args:
    scores: [N, K] cosine scores of N samples against K concepts.
    eps: entropic regularisation.
    num_iters: Sinkhorn iterations.

  Returns:
    [N, K] assignments, each row summing to 1; no gradient flows through them.
  """
  s = jax.lax.stop_gradient(scores.astype(jnp.float32)).T / eps  # [K, N]
  log_q = s - jnp.max(s)
  log_q = log_q - jax.nn.logsumexp(log_q)
  log_q = jnp.where(log_q < _LOG_FLOAT32_TINY, -jnp.inf, log_q)
  num_k, num_n = log_q.shape
  for _ in range(num_iters):
    log_u = -jnp.log(num_k) - jax.nn.logsumexp(log_q, axis=1)
    dead = jnp.isinf(log_u)  # rows of zeros: their scaling is infinite
    log_u = jnp.where(dead, jnp.max(jnp.where(dead, -jnp.inf, log_u)), log_u)
    log_q = log_q + log_u[:, None]
    log_v = -jnp.log(num_n) - jax.nn.logsumexp(log_q, axis=0)
    log_q = log_q + jnp.where(jnp.isinf(log_v), 0.0, log_v)[None, :]
  column = jax.nn.logsumexp(log_q, axis=0, keepdims=True)
  q = jnp.where(jnp.isinf(column), 1.0 / num_k, jnp.exp(log_q - column))
  return q.T


def swapped_prediction(codes: jax.Array, targets: jax.Array, *,
                       temperature: float = 0.1) -> jax.Array:
  """Each view predicts every other view's assignment (SPEC 4, concept alignment).

  L = 1/V sum_i 1/(V-1) sum_{k != i} -mean_b sum_c targets[i,b,c] log softmax(codes[k,b] / t)_c

  Args:
    codes: [V, B, K] concept scores of V views of the same B videos.
    targets: [V, B, K] assignments of the same views (no gradient).
    temperature: t (tau = 0.1).

  Returns:
    The scalar loss.
  """
  num_views, batch = codes.shape[:2]
  log_p = jax.nn.log_softmax(codes / temperature, axis=-1)
  cross = -jnp.einsum("ibc,kbc->ik", jax.lax.stop_gradient(targets), log_p,
                      precision=_FULL) / batch
  off_diagonal = 1.0 - jnp.eye(num_views)
  return jnp.sum(cross * off_diagonal) / (num_views * (num_views - 1))


def concept_alignment(codes: jax.Array, queue: jax.Array | None = None, *,
                      eps: float = 0.05, num_iters: int = 3,
                      temperature: float = 0.1) -> jax.Array:
  """Swapped prediction against Sinkhorn targets, optionally with a queue (SPEC 4).

  For view i the target is Sinkhorn(sg([codes_i ; queue_i]))[:B]: the queue only
  widens the population the assignments are balanced over.

  Args:
    codes: [V, B, K] concept scores (one half of the codes: static or dynamic).
    queue: None, or [V, Q, K] detached codes of earlier batches for the same views.
    eps, num_iters: Sinkhorn parameters.
    temperature: tau of the prediction softmax.

  Returns:
    The scalar loss (L_align_s or L_align_d).
  """
  batch = codes.shape[1]
  population = codes if queue is None else jnp.concatenate([codes, queue], axis=1)
  targets = jax.vmap(lambda s: sinkhorn(s, eps=eps, num_iters=num_iters)[:batch])(
      population)
  return swapped_prediction(codes, targets, temperature=temperature)


def negative_entropy(codes: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  """Mean over views and samples of sum_c p log p, p = softmax(codes / t) (SPEC 4).

  Minimising it spreads a view over the concepts of the other kind (E_s, E_d).

  Args:
    codes: [V, B, K].
    temperature: t.
  """
  log_p = jax.nn.log_softmax(codes / temperature, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def reconstruction(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Fidelity: -mean cos(prediction, sg(target)) (SPEC 4, R_v, R_s, R_d).

  Args:
    prediction: [..., D] decoder outputs; gradients flow into the codes.
    target: [..., D] encoder features, treated as constants.
  """
  cos = jnp.sum(l2_normalize(prediction) *
                jax.lax.stop_gradient(l2_normalize(target)), axis=-1)
  return -jnp.mean(cos)


def topk_mask(scores: jax.Array, k: int, *, strict: bool = False) -> jax.Array:
  """1.0 where a concept is among a sample's top k, else 0.0.

  Args:
    scores: [B, C].
    k: how many concepts to keep.
    strict: the reference's rule, scores strictly greater than the k-th largest,
      which keeps k - 1 when there are no ties.
  """
  scores = jax.lax.stop_gradient(scores)
  values, indices = jax.lax.top_k(scores, k)
  if strict:
    return (scores > values[:, -1:]).astype(jnp.float32)
  return jnp.sum(jax.nn.one_hot(indices, scores.shape[-1]), axis=-2)


def local_contrast_sums(query: jax.Array, key: jax.Array, valid: jax.Array, *,
                        margin: float = 1.4) -> tuple[jax.Array, jax.Array]:
  """Positive and negative parts of the local concept contrast, one order (SPEC 4).

  delta[b, b', c] = sqrt(2 - 2 <query[b,c], sg(key[b',c])> + 1e-5);
  positive = sum_{valid (b,c)} delta[b,b,c]^2;
  negative = sum_{valid (b,c), b' != b} relu(margin - delta[b,b',c])^2 / (B - 1).

  Args:
    query: [B, C, D] L2-normalised local concept features of one view.
    key: [B, C, D] the same of the other view (no gradient).
    valid: [B, C] the mask of concepts valid in both views.
    margin: the negative margin (1.4).

  Returns:
    (positive + negative, number of valid (b, c)).
  """
  batch = query.shape[0]
  sim = jnp.einsum("bcd,pcd->bpc", query, jax.lax.stop_gradient(key), precision=_FULL)
  # Rounding can still put a cosine a few ulps above 1 (more in lower precision),
  # where the reference's + 1e-5 alone would leave a negative square root: NaN.
  delta = jnp.sqrt(jnp.maximum(2.0 - 2.0 * sim, 0.0) + 1e-5)
  eye = jnp.eye(batch)[:, :, None]
  positive = jnp.sum(jnp.square(delta) * eye * valid[:, None, :])
  negative = jnp.sum(jnp.square(jax.nn.relu(margin - delta)) * (1.0 - eye) *
                     valid[:, None, :])
  return positive + negative / max(batch - 1, 1), jnp.sum(valid)


def local_concept_contrast(local: jax.Array, codes: jax.Array, *, topk: int,
                           strict: bool = False, margin: float = 1.4) -> jax.Array:
  """L_loc for one modality with its two views, both orders (SPEC 4).

  Valid concepts are those in the top `topk` of both views' codes; the loss is
  (sum over both orders of positive + negative) / (valid count over both + 1).

  Args:
    local: [B, 2, C, D] L2-normalised local concept features of the two views.
    codes: [B, 2, C] the views' concept scores for the same C concepts.
    topk: K_valid.
    strict: the reference's strict ">" rule (see `topk_mask`).
    margin: negative margin.
  """
  masks = [topk_mask(codes[:, i], topk, strict=strict) for i in (0, 1)]
  valid = masks[0] * masks[1]
  total, count = 0.0, 0.0
  for i, j in ((0, 1), (1, 0)):
    loss, n = local_contrast_sums(local[:, i], local[:, j], valid, margin=margin)
    total, count = total + loss, count + n
  return total / (count + 1.0)
