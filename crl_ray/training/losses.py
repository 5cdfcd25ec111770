"""CRL loss terms as pure torch functions (no Ray, no MLflow).

Source: Simko et al., "Improving Large Language Model Safety with Contrastive Representation Learning"
(EMNLP 2025), restated in docs/METHOD.md. Hidden states are indexed like HF ``hidden_states``
(0 = embeddings, i = output of block i-1); ``*_lora`` come from the model with the adapter active,
``*_orig`` from the original model (adapter disabled, no gradient).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from crl_ray.config import Distance

DISTANCES: tuple[str, ...] = ("l2", "cosine", "l2_normalized_sq", "mix")
_COS_EPS = 1e-8


def distance(name: Distance, x: Tensor, y: Tensor) -> Tensor:
    """Per-token distance over the last dim (float32), broadcasting ``y`` (e.g. a centroid [D]) against ``x``.

    | l2 | ||x - y||_2 |  cosine | 1 - cos(x, y) |  l2_normalized_sq | 0.3 * ||x/|x| - y/|y|||^2 |
    | mix | ||x - y||_2 + 10 * (1 - ReLU(cos(x, y))) |
    """
    x = x.float()
    y = y.float().expand_as(x)
    if name == "l2":
        return torch.linalg.vector_norm(x - y, dim=-1)
    if name == "cosine":
        return 1.0 - F.cosine_similarity(x, y, dim=-1, eps=_COS_EPS)
    if name == "l2_normalized_sq":
        xn = F.normalize(x, dim=-1, eps=_COS_EPS)
        yn = F.normalize(y, dim=-1, eps=_COS_EPS)
        return 0.3 * (xn - yn).pow(2).sum(-1)
    if name == "mix":
        cos = F.cosine_similarity(x, y, dim=-1, eps=_COS_EPS)
        return torch.linalg.vector_norm(x - y, dim=-1) + 10.0 * (1.0 - F.relu(cos))
    raise ValueError(f"unknown distance {name!r}; use one of {', '.join(DISTANCES)}")


def harmful_centroid(hidden: Tensor, mask: Tensor) -> Tensor:
    """c = sum_{i,t} M[i,t] h[i,t] / sum_{i,t} M[i,t], over a [B, T, D] hidden state and a [B, T] mask -> [D]."""
    m = mask.to(torch.float32)
    return (hidden.float() * m.unsqueeze(-1)).sum(dim=(0, 1)) / m.sum().clamp_min(1.0)


def triplet_terms(
    benign_lora: Sequence[Tensor],
    benign_orig: Sequence[Tensor],
    benign_mask: Tensor,
    harmful_lora: Sequence[Tensor],
    harmful_orig: Sequence[Tensor],
    harmful_mask: Tensor,
    *,
    benign_layers: Sequence[int],
    harmful_layers: Sequence[int],
    margin_benign: float,
    margin_harmful: float,
    dist_benign_pos: Distance,
    dist_benign_neg: Distance,
    dist_harmful_pos: Distance,
    dist_harmful_neg: Distance,
    return_diagnostics: bool = False,
    centroids: Mapping[int, Tensor] | None = None,
    benign_count: Tensor | float | None = None,
    harmful_count: Tensor | float | None = None,
):
    """(L_b, L_h) of docs/METHOD.md.

    L_b = sum_{l in L_b, i, t} M_b ReLU(d_bp(h_l, h0_l) - d_bn(h_l, c_l) + m_b) / (|L_b| sum M_b)
    L_h = sum_{l in S, i, t}   M_h ReLU(d_hp(h_l, c_l) - d_hn(h_l, h0_l) + m_h) / (|S| sum M_h)
    with c_l the masked mean of the LoRA harmful hidden states at layer l (with gradient).

    With ``return_diagnostics`` a third value (a dict of floats) holds, per term (benign, harmful):
      - ``dist/{term}_pos``, ``dist/{term}_neg``: mean positive / negative distance over masked tokens;
      - ``train/active_{term}``: the fraction of active hinges, i.e. of masked (token, layer) positions with
        d_pos - d_neg + m > 0, = sum_{l,i,t} M [d_pos - d_neg + m > 0] / (|layers| sum M). Only active hinges pass
        a gradient; while every hinge is active the margin is a constant and the term is an unbounded d_pos - d_neg.

    Data-parallel use: ``centroids`` (layer -> [D], computed over the global batch) and ``benign_count`` /
    ``harmful_count`` (global mask sums) replace the local ones, so each rank returns its share of the global loss;
    the active fractions use the same denominators, so they too are shares that sum over ranks to the global value.
    """
    mb = benign_mask.to(torch.float32)
    mh = harmful_mask.to(torch.float32)
    cache: dict[int, Tensor] = dict(centroids or {})

    def centroid(layer: int) -> Tensor:
        if layer not in cache:
            cache[layer] = harmful_centroid(harmful_lora[layer], mh)
        return cache[layer]

    def hinge(hidden, pos_target, neg_target, mask, layers, d_pos_name, d_neg_name, margin, key):
        """sum over layers and tokens of mask * ReLU(d_pos - d_neg + margin); mean distances per layer and the
        number of active hinges (mask-weighted count of positive hinge arguments)."""
        total = hidden[layers[0]].new_zeros((), dtype=torch.float32)
        diag = {f"dist/{key}_pos": 0.0, f"dist/{key}_neg": 0.0, f"train/active_{key}": 0.0}
        for layer in layers:
            h = hidden[layer]
            d_pos = distance(d_pos_name, h, pos_target(layer))
            d_neg = distance(d_neg_name, h, neg_target(layer))
            arg = d_pos - d_neg + margin
            total = total + (F.relu(arg) * mask).sum()
            if return_diagnostics:
                count = mask.sum().clamp_min(1.0)
                diag[f"dist/{key}_pos"] += float((d_pos.detach() * mask).sum() / count) / len(layers)
                diag[f"dist/{key}_neg"] += float((d_neg.detach() * mask).sum() / count) / len(layers)
                diag[f"train/active_{key}"] += float(((arg.detach() > 0).float() * mask).sum())
        return total, diag

    benign_total, benign_diag = hinge(benign_lora, lambda l: benign_orig[l].detach(), centroid, mb, benign_layers,
                                      dist_benign_pos, dist_benign_neg, margin_benign, "benign")
    harmful_total, harmful_diag = hinge(harmful_lora, centroid, lambda l: harmful_orig[l].detach(), mh,
                                        harmful_layers, dist_harmful_pos, dist_harmful_neg, margin_harmful, "harmful")
    nb = mb.sum().clamp_min(1.0) if benign_count is None else benign_count
    nh = mh.sum().clamp_min(1.0) if harmful_count is None else harmful_count
    loss_b = benign_total / (len(benign_layers) * nb)
    loss_h = harmful_total / (len(harmful_layers) * nh)
    if not return_diagnostics:
        return loss_b, loss_h
    benign_diag["train/active_benign"] /= len(benign_layers) * float(nb)
    harmful_diag["train/active_harmful"] /= len(harmful_layers) * float(nh)
    return loss_b, loss_h, {**benign_diag, **harmful_diag}


def kl_retain(logits_orig: Tensor, logits_lora: Tensor, mask: Tensor, temperature: float = 2.0,
              num_sequences: Tensor | float | None = None) -> Tensor:
    """T^2 KL(softmax(z0/T) || softmax(z/T)), summed over unmasked positions, "batchmean" over sequences.

    ``num_sequences`` overrides the local batch size (data-parallel: the global number of sequences).
    """
    t = temperature
    per_token = _kl_per_token(logits_orig, logits_lora, t)
    n = logits_lora.shape[0] if num_sequences is None else num_sequences
    return t * t * (per_token * mask.to(torch.float32)).sum() / n


def _kl_per_token(logits_orig: Tensor, logits_lora: Tensor, t: float) -> Tensor:
    """KL(softmax(z0/t) || softmax(z/t)) at each position (float32), no gradient to ``logits_orig``."""
    return _kl_parts(logits_orig, logits_lora, t)[0]


def _kl_parts(logits_orig: Tensor, logits_lora: Tensor, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(per-position KL, log softmax(z/t), softmax(z0/t)), all float32."""
    logp = F.log_softmax(logits_lora.float() / t, dim=-1)
    logq = F.log_softmax(logits_orig.detach().float() / t, dim=-1)
    q = logq.exp()
    return (q * (logq - logp)).sum(-1), logp, q


KL_CHUNK_ROWS = 128  # positions per chunk: ~25 MB of float32 logits at a 49k vocabulary


class _ChunkedKL(torch.autograd.Function):
    """:func:`kl_retain`'s value and gradient, computed ``KL_CHUNK_ROWS`` positions at a time.

    Each chunk runs kl_retain's own ops (:func:`_kl_parts`) for the value, so the sum is bit-identical, and writes
    the gradient in closed form, t m/n (softmax(z/t) - softmax(z0/t)) (float32), in place of autograd's backward
    through log-softmax (a few fewer passes over [positions, vocab]; equal to it within float32 rounding). No
    [positions, vocab] temporary of the whole batch is made: the plain formula makes ~8, each a fresh allocation
    the OS zero-fills. The incoming gradient scales the stored one at the end.
    """

    @staticmethod
    def forward(ctx, logits_lora: Tensor, logits_orig: Tensor, mask: Tensor, t: float, n: Tensor) -> Tensor:
        vocab = logits_lora.shape[-1]
        z, z0, m = logits_lora.reshape(-1, vocab), logits_orig.reshape(-1, vocab), mask.reshape(-1)
        per_token = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        grad = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        coef = (t * m.to(torch.float32) / n).unsqueeze(-1)  # d(t^2 m tok / n)/dz = t m/n (p - q)
        for start in range(0, z.shape[0], KL_CHUNK_ROWS):
            rows = slice(start, start + KL_CHUNK_ROWS)
            per_token[rows], logp, q = _kl_parts(z0[rows], z[rows].detach(), t)
            torch.exp(logp, out=grad[rows])
            grad[rows].sub_(q).mul_(coef[rows])
        ctx.save_for_backward(grad)
        ctx.meta = (logits_lora.shape, logits_lora.dtype)
        return t * t * (per_token * m.to(torch.float32)).sum() / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        shape, dtype = ctx.meta
        out = torch.empty(grad.shape, dtype=dtype, device=grad.device)  # scaled in float32, rounded once on write
        return torch.mul(grad, grad_out, out=out).reshape(shape), None, None, None, None


def kl_retain_chunked(logits_orig: Tensor, logits_lora: Tensor, mask: Tensor, temperature: float = 2.0,
                      num_sequences: Tensor | float | None = None) -> Tensor:
    """:func:`kl_retain` (same arguments, same value) with a fraction of its memory traffic: see :class:`_ChunkedKL`.
    No gradient flows to ``logits_orig`` (kl_retain detaches it too)."""
    n = logits_lora.shape[0] if num_sequences is None else num_sequences
    n = torch.as_tensor(n, dtype=torch.float32, device=logits_lora.device)
    return _ChunkedKL.apply(logits_lora, logits_orig.detach(), mask, float(temperature), n)


# --------------------------------------------------------------------------------------------- baselines
def circuit_breaker_coefficients(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    """(c_r, c_cb) = (alpha * t/(2T), alpha * (1 - t/(2T))) at optimizer step t of T (Zou et al. 2024)."""
    frac = step / (2.0 * total_steps)
    return alpha * frac, alpha * (1.0 - frac)


def masked_norm_mean(lora: Sequence[Tensor], orig: Sequence[Tensor], mask: Tensor, layers: Sequence[int],
                     count: Tensor | float | None = None) -> Tensor:
    """mean over ``layers`` and masked tokens of ||h_l - h0_l||_2 (``count`` = the mask sum, global if given)."""
    m = mask.to(torch.float32)
    n = m.sum().clamp_min(1.0) if count is None else count
    total = lora[layers[0]].new_zeros((), dtype=torch.float32)
    for layer in layers:
        total = total + (distance("l2", lora[layer], orig[layer].detach()) * m).sum()
    return total / (len(layers) * n)


def circuit_breaker_terms(retain_lora: Sequence[Tensor], retain_orig: Sequence[Tensor], retain_mask: Tensor,
                          harmful_lora: Sequence[Tensor], harmful_orig: Sequence[Tensor], harmful_mask: Tensor, *,
                          retain_layers: Sequence[int], cb_layers: Sequence[int],
                          retain_count: Tensor | float | None = None,
                          harmful_count: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """(L_retain, L_cb) of circuit breakers / representation rerouting (Zou et al. 2024; docs/METHOD.md "Baselines").

    L_retain = mean over ``retain_layers`` and masked retain tokens of ||h_l - h0_l||_2
    L_cb     = sum_{l in cb_layers, i, t} M ReLU(cos(h_l, h0_l)) / (|cb_layers| sum M)

    L_cb is a mean over layers and masked tokens: the reference (code/methods/circuit_breaker/trainer.py of
    samuelsimko/crl-llm-defense) divides the summed ReLU(cos) by the sum of its mask repeated once per target
    layer, i.e. by |cb_layers| x tokens.
    """
    loss_retain = masked_norm_mean(retain_lora, retain_orig, retain_mask, retain_layers, retain_count)
    m = harmful_mask.to(torch.float32)
    n = m.sum().clamp_min(1.0) if harmful_count is None else harmful_count
    total = harmful_lora[cb_layers[0]].new_zeros((), dtype=torch.float32)
    for layer in cb_layers:
        cos = F.cosine_similarity(harmful_lora[layer].float(), harmful_orig[layer].detach().float(), dim=-1,
                                  eps=_COS_EPS)
        total = total + (F.relu(cos) * m).sum()
    return loss_retain, total / (len(cb_layers) * n)


def repbend_cluster(harmful_lora: Sequence[Tensor], last_mask: Tensor, layers: Sequence[int]) -> Tensor:
    """mean over ``layers`` and pairs i != j of 1 - cos(r_i, r_j), r = the LoRA harmful last-request-token state.

    RepBend's term that pulls harmful representations together. Needs at least two rows; 0 for one row.
    """
    rows = last_mask.to(torch.float32)
    total = harmful_lora[layers[0]].new_zeros((), dtype=torch.float32)
    b = rows.shape[0]
    if b < 2:
        return total
    for layer in layers:
        r = (harmful_lora[layer].float() * rows.unsqueeze(-1)).sum(1)  # [B, D]: one position per row
        r = F.normalize(r, dim=-1, eps=_COS_EPS)
        sim = r @ r.T
        off_diag = sim.sum() - sim.diagonal().sum()
        total = total + (1.0 - off_diag / (b * (b - 1)))
    return total / len(layers)
