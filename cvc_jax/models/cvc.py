"""The pretraining model: encoder, global projections and concept heads (SPEC 2-3).

Views come in the order v1 v2 s1 s2 d1 d2 (RGB clips, static clips, frame
differences). The model returns every intermediate a loss needs; the losses
themselves live in `cvc_jax.losses`.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvc_jax.models import heads
from cvc_jax.models import resnet3d

# The global contrast projections, named as the authors' (their "MI estimation").
PROJECTIONS = ("fvv", "fvs", "fvd", "fsv", "fdv")
# Prototypes, sigma heads, decoders and encoders per kind of view (v, s, d).
PROTOTYPES = ("prototype", "prototype_s", "prototype_d")
SIGMAS = ("fv", "fs", "fd")
DECODERS = ("gv", "gs", "gd")
ENCODERS = ("backbone", "backbone_s", "backbone_d")


def is_prototype(path) -> bool:
  """True for the parameters of the concept prototypes C_v, C_s, C_d."""
  return str(getattr(path[0], "key", path[0])) in PROTOTYPES


def normalize_prototypes(params):
  """L2-normalises every prototype row (a column of the Dense kernel) (SPEC 3)."""
  def norm(path, p):
    if not is_prototype(path):
      return p
    return p / jnp.maximum(jnp.linalg.norm(p, axis=0, keepdims=True), 1e-12)
  return jax.tree_util.tree_map_with_path(norm, params)


class CVCModel(nn.Module):
  """Static and dynamic concepts model (SPEC section 3).

  Attributes:
    encoder: the encoder config (see `resnet3d.build_encoder`).
    num_concepts: K, concepts per kind; codes have 2K entries, static first.
    sigma: concept transformation: 'identity', 'linear' or 'mlp'.
    sigma_dim: output width of sigma, the width of the concept space; None (the
      default) is the encoder's width D, the only width identity sigma allows.
    decoder_hidden: hidden width of the decoders g; 0 for a linear decoder.
    proj_hidden, proj_dim: the global contrast MLPs D -> proj_hidden -> proj_dim.
    separate_encoders: three encoders for v, s, d instead of one shared.
    dtype: compute dtype; parameters stay float32, outputs are float32.
    remat: what the encoder's backward pass recomputes (`resnet3d.REMAT_POLICIES`).
  """
  encoder: Mapping[str, Any]
  num_concepts: int = 50
  sigma: str = "identity"
  sigma_dim: int | None = None
  decoder_hidden: int = 512
  proj_hidden: int = 512
  proj_dim: int = 128
  separate_encoders: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, views, *, train: bool):
    """Runs all six views.

    Args:
      views: [B, 6, T, H, W, 3] normalised clips, order v1 v2 s1 s2 d1 d2.
      train: BatchNorm uses batch statistics (and updates its averages) if True.

    Returns:
      A dict of float32 arrays:
        h: [B, 6, D] pooled encoder features.
        proj: {name: [B, 2, proj_dim]} for the five global projections, each applied
          to the two views it reads (fvv/fvs/fvd to v1 v2, fsv to s1 s2, fdv to d1 d2).
        codes: [B, 6, 2K] cosine scores against the prototypes of each view's kind.
        rec: {'v': [B, 2, D], 's': ..., 'd': ...} decoder outputs.
        local: {'v': [B, 2, 2K, concept_dim], 's': [B, 2, K, .], 'd': [B, 2, K, .]}
          L2-normalised local concept features.
    """
    b = views.shape[0]
    k = self.num_concepts
    d = resnet3d.feature_dim(self.encoder)
    if self.sigma == "identity" and self.concept_dim != d:
      raise ValueError(f"sigma='identity' needs model.sigma_dim == encoder width {d}, "
                       f"got {self.sigma_dim}.")

    # 1) Encoder. One shared encoder sees all 6B clips as one batch, so its
    #    BatchNorm statistics mix the three kinds of view (SPEC 1).
    clips = views.reshape((b * 6,) + views.shape[2:])
    if self.separate_encoders:
      per_kind = clips.reshape((b, 3, 2) + views.shape[2:])
      outs = [resnet3d.build_encoder(self.encoder, self.dtype, name, self.remat)(
          per_kind[:, i].reshape((2 * b,) + views.shape[2:]), train=train)
              for i, name in enumerate(ENCODERS)]
      pooled = jnp.stack([o[0].reshape(b, 2, -1) for o in outs], 1).reshape(b, 6, -1)
      fmap = jnp.stack([o[1].reshape((b, 2, -1, d)) for o in outs], 1)
      fmap = fmap.reshape((b, 6, -1, d))
    else:
      pooled, fmap = resnet3d.build_encoder(self.encoder, self.dtype, "backbone",
                                            self.remat)(clips, train=train)
      pooled = pooled.reshape(b, 6, d)
      fmap = fmap.reshape((b, 6, -1, d))  # tokens: T'H'W' per clip
    h = pooled.astype(jnp.float32)

    # 2) Global contrast projections D -> 512 -> 128.
    sources = {"fvv": (0, 1), "fvs": (0, 1), "fvd": (0, 1), "fsv": (2, 3), "fdv": (4, 5)}
    proj = {}
    for name in PROJECTIONS:
      head = heads.mlp_head(name, hidden=self.proj_hidden, out=self.proj_dim, train=train,
                            dtype=self.dtype, batch_norm=False)
      proj[name] = head(pooled[:, sources[name][0]:sources[name][1] + 1])

    # 3) Concept codes c = normalize(sigma(h)) C^T, prototypes C per kind of view.
    #    sigma runs one view at a time, so an MLP sigma's BatchNorm sees B samples.
    codes, templates = [], {}
    for i, kind in enumerate("vsd"):
      concept_codes, templates[kind] = self._concept_head(i, train)
      codes.extend(concept_codes(pooled[:, j]) for j in (2 * i, 2 * i + 1))
    codes = jnp.stack(codes, axis=1)

    # 4) Decoders reconstruct h from the code: g_v from all 2K entries of v1 and
    #    v2 (one BatchNorm batch of 2B), g_s from the static half of s codes, g_d
    #    from the dynamic half of d codes.
    code_parts = {"v": codes[:, 0:2], "s": codes[:, 2:4, :k], "d": codes[:, 4:6, k:]}
    rec = {}
    for kind, name in zip("vsd", DECODERS):
      part = code_parts[kind]
      decoder = heads.mlp_head(name, hidden=self.decoder_hidden, out=d, train=train,
                               dtype=self.dtype, batch_norm=True)
      rec[kind] = decoder(part.reshape(2 * b, -1)).reshape(b, 2, d).astype(jnp.float32)

    # 5) Local concept aggregation, one block shared by all views.
    lit = self._local_concepts()
    local = {}
    for i, kind in enumerate("vsd"):
      tokens = fmap[:, 2 * i:2 * i + 2].reshape((2 * b,) + fmap.shape[2:])
      u = lit(tokens, templates[kind]())
      local[kind] = heads.l2_normalize(u.astype(jnp.float32)).reshape(
          (b, 2) + u.shape[1:])

    return {
        "h": h,
        "proj": {n: p.astype(jnp.float32) for n, p in proj.items()},
        "codes": codes.astype(jnp.float32),
        "rec": rec,
        "local": local,
    }

  @property
  def concept_dim(self) -> int:
    """The concept space's width: `sigma_dim`, or the encoder's D when unset."""
    if self.sigma_dim is None:
      return resnet3d.feature_dim(self.encoder)
    return self.sigma_dim

  def _concept_head(self, i, train):
    """The concept head of kind i (0 v, 1 s, 2 d), shared with `concepts.ViewConcepts`.

    Returns (codes, templates): `codes` maps pooled features [N, D] to
    normalize(sigma(h)) C^T, [N, 2K]; `templates()` is that kind's rows of its
    prototypes C for the local concepts (SPEC 3): all 2K of C_v for v, the static
    K of C_s for s, the dynamic K of C_d for d.
    """
    sigma = self._sigma(SIGMAS[i], train)
    proto = nn.Dense(2 * self.num_concepts, use_bias=False, dtype=self.dtype,
                     name=PROTOTYPES[i])
    rows = {0: slice(None), 1: slice(None, self.num_concepts),
            2: slice(self.num_concepts, None)}[i]

    def templates():
      kernel = proto.variables["params"]["kernel"]  # [concept_dim, 2K]
      return kernel.T[rows].astype(self.dtype)

    return lambda pooled: proto(heads.l2_normalize(sigma(pooled))), templates

  def _local_concepts(self):
    """The local concept aggregation block, one for every kind of view (SPEC 3)."""
    return heads.LocalConceptAggregation(self.concept_dim, dtype=self.dtype, name="lit")

  def _sigma(self, name, train):
    if self.sigma == "identity":
      return lambda x: x
    if self.sigma == "linear":
      return heads.mlp_head(name, hidden=0, out=self.concept_dim, train=train,
                            dtype=self.dtype, batch_norm=False)
    if self.sigma == "mlp":
      return heads.mlp_head(name, hidden=self.concept_dim, out=self.concept_dim, train=train,
                            dtype=self.dtype, batch_norm=True)
    raise ValueError(f"model.sigma must be 'identity', 'linear' or 'mlp', got "
                     f"{self.sigma!r}.")


# What `config.dtype` may say: the compute dtype (parameters stay float32);
# float64 for numerical checks, with jax_enable_x64.
COMPUTE_DTYPES = ("float32", "bfloat16", "float64")


def compute_dtype(config):
  """`config.dtype` (default float32) as a dtype, checked against COMPUTE_DTYPES."""
  if config.get("dtype", "float32") not in COMPUTE_DTYPES:
    raise ValueError(f"config.dtype must be one of {COMPUTE_DTYPES}, got "
                     f"{config.dtype!r}.")
  return jnp.dtype(config.get("dtype", "float32"))


def build_model(config) -> CVCModel:
  """The pretraining model for a full config (reads `config.model`, `config.dtype`,
  `config.remat`)."""
  dtype = compute_dtype(config)
  m = config.model
  return CVCModel(
      encoder=m.encoder.to_dict() if hasattr(m.encoder, "to_dict") else dict(m.encoder),
      num_concepts=m.num_concepts, sigma=m.sigma,
      sigma_dim=m.get("sigma_dim"),
      decoder_hidden=m.decoder_hidden, proj_hidden=m.proj_hidden, proj_dim=m.proj_dim,
      separate_encoders=m.separate_encoders, dtype=dtype,
      remat=config.get("remat", "none"))
