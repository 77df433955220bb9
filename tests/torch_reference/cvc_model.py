"""PyTorch oracle of the authors' pretraining model (static/dynamic concepts).

Re-implements, from the method description (SPEC sections 3-4) and with the
semantics of the authors' public ``model.py`` / ``train.py``, the heads and every
loss term of one training step, so that the Flax implementation can be checked
number for number on tiny configurations.

Layout conventions (as in the reference code):

* A batch of views is a float tensor [B, 6, 3, T, H, W] in the order
  v1, v2, s1, s2, d1, d2 (RGB, static-frame, frame-difference).
* Concept codes have 2K entries per view: entries 0..K-1 are static concepts,
  K..2K-1 dynamic ones.
* The state-dict names of ``TorchCVC`` are those of the authors' ``GreatModel``
  (``backbone.*``, ``fvv``..``fdv``, ``fv``/``fs``/``fd``, ``gv``/``gs``/``gd``,
  ``prototype``, ``prototype_s``, ``prototype_d``, ``lit.*``, ``queue``), so a
  checkpoint of theirs loads strictly when the sizes agree.

Public entry points: ``TorchCVC``, ``loss_terms``, ``sinkhorn``,
``valid_concept_mask``, ``push_to_queue``, ``drop_prototype_grads``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "LocalConceptAttention",
    "TorchCVC",
    "sinkhorn",
    "valid_concept_mask",
    "loss_terms",
    "push_to_queue",
    "drop_prototype_grads",
    "LOSS_KEYS",
]

# View slots in the 6-view axis.
V1, V2, S1, S2, D1, D2 = range(6)

# Hyper-parameters fixed by the reference code.
NCE_TEMPERATURE = 0.07
SWAP_TEMPERATURE = 0.1
SINKHORN_EPS = 0.05
SINKHORN_ITERS = 3
ENTROPY_WEIGHT = 0.1
LOCAL_MARGIN = 1.4

LOSS_KEYS = (
    "I_vv", "I_vs", "I_vd", "align_s", "align_d", "entropy_s", "entropy_d",
    "rec_v", "rec_s", "rec_d", "loc_v", "loc_s", "loc_d", "total",
)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

class LocalConceptAttention(nn.Module):
    """Cross-attention from concept templates (queries) to local feature tokens.

    Slot-attention style: the softmax runs over the *concept* axis, so concepts
    compete for each token; a small constant keeps every weight positive before
    the weights are renormalised over the token axis (a weighted mean of tokens
    per concept). Parameter names follow the reference's
    ``LocalfeatureIntegrationTransformer``.
    """

    def __init__(self, input_dim: int, dim: int, iters: int = 1):
        super().__init__()
        self.iters = iters
        self.project_q = nn.Linear(dim, dim, bias=False)
        self.project_k = nn.Linear(input_dim, dim, bias=False)
        self.project_v = nn.Linear(input_dim, dim, bias=False)
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_templates = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim // 2), nn.ReLU(), nn.Linear(dim // 2, dim))
        self.scale = dim ** -0.5

    def forward(self, fmap: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
        """fmap: [B, C, T', H', W'] local features; templates: [N, dim].

        Returns the updated templates, [B, N, dim] (not normalised).
        """
        b, c = fmap.shape[:2]
        tokens = self.norm_inputs(fmap.reshape(b, c, -1).transpose(1, 2))  # [B, L, C]
        keys = self.project_k(tokens)                                       # [B, L, dim]
        values = self.project_v(tokens)                                     # [B, L, dim]

        slots = templates.unsqueeze(0).expand(b, -1, -1)                    # [B, N, dim]
        for _ in range(self.iters):
            residual = slots
            queries = self.project_q(self.norm_templates(slots)) * self.scale
            logits = torch.einsum("bld,bnd->bln", keys, queries)           # [B, L, N]
            weights = logits.softmax(dim=-1) + 1e-8                         # over concepts
            weights = weights / weights.sum(dim=1, keepdim=True)            # over tokens
            slots = torch.einsum("bln,bld->bnd", weights, values) + residual
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


def _projection(dim: int, hidden: int, out: int) -> nn.Sequential:
    """Global-contrast projection MLP (keys .0 and .2)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out))


def _sigma_head(kind: str, dim: int, sigma_dim: int) -> Optional[nn.Module]:
    """Concept transformation sigma: identity (no module), linear, or MLP with BN."""
    if kind == "identity":
        return None
    if kind == "linear":
        return nn.Linear(dim, sigma_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, sigma_dim), nn.BatchNorm1d(sigma_dim), nn.ReLU(),
                             nn.Linear(sigma_dim, sigma_dim))
    raise ValueError(f"sigma must be 'identity', 'linear' or 'mlp', got {kind!r}")


def _decoder(in_dim: int, hidden: int, out: int) -> nn.Module:
    """Fidelity decoder: linear when hidden == 0, else Linear-BN-ReLU-Linear."""
    if hidden == 0:
        return nn.Linear(in_dim, out)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class TorchCVC(nn.Module):
    """The pretraining model: shared encoder plus all heads.

    Args:
      encoder: module mapping [N, 3, T, H, W] to (pooled [N, dim], map [N, dim, T', H', W']).
      dim: encoder width D.
      concepts: K, concepts per kind (codes have 2K entries).
      sigma: 'identity' | 'linear' | 'mlp' (the reference code uses 'mlp').
      sigma_dim: output width of sigma (forced to ``dim`` for 'identity').
      decoder_hidden: hidden width of the decoders, 0 for linear decoders.
      proj_hidden, proj_dim: sizes of the five global-contrast projections.
      queue_size: rows of the code queue buffer.
    """

    def __init__(self, encoder: nn.Module, dim: int = 512, concepts: int = 100,
                 sigma: str = "mlp", sigma_dim: Optional[int] = None,
                 decoder_hidden: int = 512, proj_hidden: int = 512, proj_dim: int = 128,
                 queue_size: int = 1024):
        super().__init__()
        if sigma == "identity" or sigma_dim is None:
            sigma_dim = dim
        self.dim, self.concepts, self.sigma_kind, self.sigma_dim = dim, concepts, sigma, sigma_dim
        k = concepts

        self.backbone = encoder
        # Global contrast ("MI estimation") projections.
        self.fvv = _projection(dim, proj_hidden, proj_dim)
        self.fvs = _projection(dim, proj_hidden, proj_dim)
        self.fvd = _projection(dim, proj_hidden, proj_dim)
        self.fsv = _projection(dim, proj_hidden, proj_dim)
        self.fdv = _projection(dim, proj_hidden, proj_dim)
        # Concept transformations, one per kind of view. Assigning None registers
        # nothing, so 'identity' contributes no keys.
        self.fv = _sigma_head(sigma, dim, sigma_dim)
        self.fs = _sigma_head(sigma, dim, sigma_dim)
        self.fd = _sigma_head(sigma, dim, sigma_dim)
        # Fidelity decoders back to the encoder feature.
        self.gv = _decoder(2 * k, decoder_hidden, dim)
        self.gs = _decoder(k, decoder_hidden, dim)
        self.gd = _decoder(k, decoder_hidden, dim)
        # Concept prototypes (rows = concepts): static rows 0..K-1, dynamic K..2K-1.
        self.prototype = nn.Linear(sigma_dim, 2 * k, bias=False)
        self.prototype_s = nn.Linear(sigma_dim, 2 * k, bias=False)
        self.prototype_d = nn.Linear(sigma_dim, 2 * k, bias=False)
        # Local concept aggregation, shared by all views.
        self.lit = LocalConceptAttention(dim, sigma_dim, iters=1)
        self.register_buffer("queue", torch.randn(queue_size, 6, 2 * k))

    # -- pieces of the forward pass ------------------------------------------

    def encode(self, views: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All 6B clips through the encoder as ONE batch (so its BatchNorm mixes
        the three kinds of view). Returns h [B, 6, D] and maps [B, 6, D, T', H', W'];
        the map's spatial-temporal shape comes from the encoder output."""
        b, n = views.shape[:2]
        pooled, fmap = self.backbone(views.reshape(b * n, *views.shape[2:]))
        return pooled.reshape(b, n, -1), fmap.reshape(b, n, *fmap.shape[1:])

    def _sigma(self, head: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
        return x if head is None else head(x)

    def concept_codes(self, h: torch.Tensor) -> torch.Tensor:
        """Cosine concept scores [B, 6, 2K].

        sigma is applied view by view (its BatchNorm sees B samples of one view),
        then each kind of view is scored against its own prototype matrix.
        """
        heads = (self.fv, self.fv, self.fs, self.fs, self.fd, self.fd)
        z = torch.stack([self._sigma(heads[i], h[:, i]) for i in range(6)], dim=1)
        z = F.normalize(z, dim=-1)
        return torch.cat([
            self.prototype(z[:, V1:V2 + 1]),
            self.prototype_s(z[:, S1:S2 + 1]),
            self.prototype_d(z[:, D1:D2 + 1]),
        ], dim=1)

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project prototype rows onto the unit sphere in place (the reference
        does this before every step, outside autograd)."""
        for layer in (self.prototype, self.prototype_s, self.prototype_d):
            layer.weight.copy_(F.normalize(layer.weight, dim=1))

    def forward(self, views: torch.Tensor):
        """Convenience: (h, maps, codes). The losses live in ``loss_terms``."""
        h, maps = self.encode(views)
        return h, maps, self.concept_codes(h)


# ---------------------------------------------------------------------------
# Loss building blocks
# ---------------------------------------------------------------------------

def _replace_infs_(t: torch.Tensor) -> torch.Tensor:
    """SwAV's guard: infinite entries become the largest finite-after-zeroing
    value of the tensor (infs are zeroed first, then the max is taken)."""
    bad = torch.isinf(t)
    if bad.any():
        t[bad] = 0
        t[bad] = t.max()
    return t


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = SINKHORN_EPS,
             iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Balanced soft assignment of N samples to C concepts (SwAV's Sinkhorn).

    scores: [N, C]. Works on the transposed [C, N] matrix: start from
    exp(scores/eps) with the global max subtracted, normalise to total mass 1,
    then alternate row sums -> 1/C and column sums -> 1/N; finally each sample's
    column is normalised to sum 1. Returns [N, C].
    """
    logits = scores / eps
    q = torch.exp(logits - logits.max()).t()
    q = _replace_infs_(q)
    q = q / q.sum()
    n_concepts, n_samples = q.shape
    row_target = torch.full((n_concepts,), 1.0 / n_concepts, dtype=q.dtype, device=q.device)
    col_target = torch.full((n_samples,), 1.0 / n_samples, dtype=q.dtype, device=q.device)
    for _ in range(iters):
        row_scale = _replace_infs_(row_target / q.sum(dim=1))
        q = q * row_scale.unsqueeze(1)
        q = q * (col_target / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = NCE_TEMPERATURE) -> torch.Tensor:
    """Cross-entropy of cosine similarities against the diagonal; keys detached."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def swapped_prediction(codes: torch.Tensor, sk_input: torch.Tensor, views: Sequence[int],
                       tau: float = SWAP_TEMPERATURE) -> torch.Tensor:
    """Each view's Sinkhorn target supervises every other view's softmax.

    codes: [B, 6, C] (one half of the code), sk_input: [N >= B, 6, C] detached,
    current batch first. Averages over the |P|-1 partners, then over the |P| views.
    """
    b = codes.shape[0]
    total = codes.new_zeros(())
    for i in views:
        target = sinkhorn(sk_input[:, i])[:b]
        partner_sum = codes.new_zeros(())
        for k in views:
            if k == i:
                continue
            log_p = F.log_softmax(codes[:, k] / tau, dim=1)
            partner_sum = partner_sum - (target * log_p).sum(dim=1).mean()
        total = total + partner_sum / (len(views) - 1)
    return total / len(views)


def negative_entropy(codes: torch.Tensor, views: Sequence[int],
                     tau: float = SWAP_TEMPERATURE) -> torch.Tensor:
    """mean over views of mean_b sum_c p log p with p = softmax(codes / tau).

    Written as p * log(p) (not log_softmax) like the reference; with cosine
    scores / 0.1 the probabilities cannot underflow to 0 in float32.
    """
    total = codes.new_zeros(())
    for i in views:
        p = F.softmax(codes[:, i] / tau, dim=1)
        total = total + (p * torch.log(p)).sum(dim=1).mean()
    return total / len(views)


def reconstruction_loss(codes: torch.Tensor, target: torch.Tensor, decoder: nn.Module) -> torch.Tensor:
    """-mean cosine(decoder(codes), stopgrad(target)).

    codes: [B, n, C], target: [B, n, D]. All n views go through the decoder as one
    batch (its BatchNorm sees B*n rows). Gradients flow into the codes.
    """
    b, n = codes.shape[:2]
    recon = decoder(codes.reshape(b * n, -1)).reshape(b, n, -1)
    cosine = (F.normalize(recon, dim=-1) * F.normalize(target.detach(), dim=-1)).sum(dim=-1)
    return -cosine.mean()


def valid_concept_mask(p: torch.Tensor, q: torch.Tensor, topk: int, strict: bool) -> torch.Tensor:
    """Concepts that are confidently present in both views: [B, C] float mask.

    strict=True reproduces the reference: keep scores strictly above each row's
    k-th largest score, so without ties k-1 concepts survive per view.
    strict=False: intersection of the exact top-k index sets (k per view; ties are
    broken by torch.topk). ``topk`` is clamped to the number of concepts C.
    """
    k = min(topk, p.shape[1])
    if strict:
        keep_p = p > torch.topk(p, k, dim=1).values[:, -1:]
        keep_q = q > torch.topk(q, k, dim=1).values[:, -1:]
    else:
        keep_p = torch.zeros_like(p, dtype=torch.bool).scatter_(1, torch.topk(p, k, dim=1).indices, True)
        keep_q = torch.zeros_like(q, dtype=torch.bool).scatter_(1, torch.topk(q, k, dim=1).indices, True)
    return (keep_p & keep_q).to(p.dtype)


def local_concept_contrast(lit: nn.Module, maps: torch.Tensor, templates: torch.Tensor,
                           codes: torch.Tensor, topk: int, strict: bool,
                           margin: float = LOCAL_MARGIN) -> torch.Tensor:
    """Local concept contrast for one modality's two views.

    maps: [B, 2, D, T', H', W']; templates: [C, sigma_dim] (prototype rows, NOT
    detached: the prototypes learn through this term); codes: [B, 2, C] used only
    for the valid-concept mask (detached).

    For each ordered pair (i, j) of the two views, with U the normalised
    aggregated concept features and delta[b, b', c] = sqrt(2 - 2<U_i[b,c],
    sg(U_j[b',c])> + 1e-5): positives pull delta[b, b, c] to 0, negatives push
    delta[b, b', c] (b' != b) beyond the margin, both restricted to the valid
    concepts of sample b. The sum over both orders is divided by (number of
    valid (b, c) over both orders + 1).
    """
    b, n = maps.shape[:2]
    feats = lit(maps.reshape(b * n, *maps.shape[2:]), templates)
    feats = F.normalize(feats.reshape(b, n, *feats.shape[1:]), dim=-1)  # [B, 2, C, d]
    codes = codes.detach()
    off_diag = 1.0 - torch.eye(b, dtype=feats.dtype, device=feats.device)

    loss = feats.new_zeros(())
    n_valid = feats.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            mask = valid_concept_mask(codes[:, i], codes[:, j], topk, strict)  # [B, C]
            sim = torch.einsum("bcd,pcd->bpc", feats[:, i], feats[:, j].detach())
            delta = torch.sqrt(2 - 2 * sim + 1e-5)                              # [B, B, C]
            positive = (torch.diagonal(delta, dim1=0, dim2=1).t() ** 2 * mask).sum()
            negative = (F.relu(margin - delta) ** 2
                        * off_diag.unsqueeze(-1) * mask.unsqueeze(1)).sum()
            loss = loss + positive + negative / (b - 1)
            n_valid = n_valid + mask.sum()
    return loss / (n_valid + 1)


# ---------------------------------------------------------------------------
# One training step's losses
# ---------------------------------------------------------------------------

def loss_terms(model: TorchCVC, views: torch.Tensor, *, queue: Optional[torch.Tensor] = None,
               epoch: int = 0, loc_start_epoch: int = 10, topk: int = 10, strict: bool = True,
               normalize_prototypes: bool = True, return_tensors: bool = False
               ) -> Union[Dict[str, float], Tuple[Dict[str, float], Dict[str, torch.Tensor]]]:
    """All loss terms of one training step, with the reference's semantics.

    Args:
      model: a ``TorchCVC``; call ``model.train()`` first to match training
        (BatchNorm then uses batch statistics and updates its running stats).
      views: float32 [B, 6, 3, T, H, W], views ordered v1 v2 s1 s2 d1 d2.
      queue: [Q, 6, 2K] past codes, oldest first / newest last. It stands in for
        ``model.queue`` (which is never read or written here) and is appended
        below the current codes for the Sinkhorn targets only when it is given
        and ``epoch > 0``.
      epoch: current epoch (controls the queue and the local-contrast switch).
      loc_start_epoch: first epoch whose total includes loc_v + loc_s + loc_d.
      topk, strict: valid-concept rule of the local contrast (see
        ``valid_concept_mask``).
      normalize_prototypes: L2-normalise prototype rows in place first, as the
        reference training loop does before every step.
      return_tensors: also return a dict of tensors: every loss term (``total``
        is differentiable), ``codes`` (detached [B, 6, 2K], what the reference
        pushes onto its queue), ``h`` [B, 6, D] and ``maps``.

    Returns:
      dict of python floats with keys ``LOSS_KEYS`` (and the tensor dict if asked).
    """
    k = model.concepts
    if normalize_prototypes:
        model.normalize_prototypes_()

    h, maps = model.encode(views)
    codes = model.concept_codes(h)  # [B, 6, 2K]

    # --- global contrast (the reference's "MI estimation") ---
    v1, v2, s1, s2, d1, d2 = (h[:, i] for i in range(6))
    p_vv1, p_vv2 = model.fvv(v1), model.fvv(v2)
    p_vs1, p_vs2 = model.fvs(v1), model.fvs(v2)
    p_vd1, p_vd2 = model.fvd(v1), model.fvd(v2)
    p_sv1, p_sv2 = model.fsv(s1), model.fsv(s2)
    p_dv1, p_dv2 = model.fdv(d1), model.fdv(d2)
    t = {}
    t["I_vv"] = (info_nce(p_vv1, p_vv2) + info_nce(p_vv2, p_vv1)) / 2
    # Cross-modal pairs always use the *other* clip, so the two clips' shared
    # content (not just the same frames) must be matched.
    t["I_vs"] = (info_nce(p_vs1, p_sv2) + info_nce(p_vs2, p_sv1)
                 + info_nce(p_sv1, p_vs2) + info_nce(p_sv2, p_vs1)) / 2
    t["I_vd"] = (info_nce(p_vd1, p_dv2) + info_nce(p_vd2, p_dv1)
                 + info_nce(p_dv1, p_vd2) + info_nce(p_dv2, p_vd1)) / 2

    # --- concept alignment (swapped prediction) and decoupling entropies ---
    sk_input = codes.detach()
    if queue is not None and epoch > 0:
        sk_input = torch.cat([sk_input, queue.to(sk_input)], dim=0)
    static, dynamic = codes[..., :k], codes[..., k:]
    t["align_s"] = swapped_prediction(static, sk_input[..., :k], (V1, V2, S1, S2))
    t["align_d"] = swapped_prediction(dynamic, sk_input[..., k:], (V1, V2, D1, D2))
    # Frame differences should not look static; static frames should not look dynamic.
    t["entropy_s"] = negative_entropy(static, (D1, D2))
    t["entropy_d"] = negative_entropy(dynamic, (S1, S2))

    # --- fidelity (reconstruction of the encoder feature from the codes) ---
    t["rec_v"] = reconstruction_loss(codes[:, V1:V2 + 1], h[:, V1:V2 + 1], model.gv)
    t["rec_s"] = reconstruction_loss(codes[:, S1:S2 + 1, :k], h[:, S1:S2 + 1], model.gs)
    t["rec_d"] = reconstruction_loss(codes[:, D1:D2 + 1, k:], h[:, D1:D2 + 1], model.gd)

    # --- local concept contrast ---
    t["loc_v"] = local_concept_contrast(model.lit, maps[:, V1:V2 + 1], model.prototype.weight,
                                        codes[:, V1:V2 + 1], topk, strict)
    t["loc_s"] = local_concept_contrast(model.lit, maps[:, S1:S2 + 1], model.prototype_s.weight[:k],
                                        codes[:, S1:S2 + 1, :k], topk, strict)
    t["loc_d"] = local_concept_contrast(model.lit, maps[:, D1:D2 + 1], model.prototype_d.weight[k:],
                                        codes[:, D1:D2 + 1, k:], topk, strict)

    total = (t["I_vv"] + t["I_vs"] + t["I_vd"] + t["align_s"] + t["align_d"]
             + ENTROPY_WEIGHT * (t["entropy_s"] + t["entropy_d"])
             + t["rec_v"] + t["rec_s"] + t["rec_d"])
    if epoch >= loc_start_epoch:
        total = total + t["loc_v"] + t["loc_s"] + t["loc_d"]
    t["total"] = total

    floats = {name: float(t[name].detach()) for name in LOSS_KEYS}
    if not return_tensors:
        return floats
    t.update(codes=codes.detach(), h=h, maps=maps)
    return floats, t


def push_to_queue(queue: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The reference's FIFO update: drop the oldest B rows, append the new codes
    at the end (newest last). Returns a new tensor."""
    b = codes.shape[0]
    return torch.cat([queue[b:], codes.detach().to(queue)], dim=0)


def drop_prototype_grads(model: nn.Module) -> None:
    """Epoch-0 rule of the reference: prototypes get no update (call after
    backward, before the optimiser step)."""
    for name, p in model.named_parameters():
        if "prototype" in name:
            p.grad = None
