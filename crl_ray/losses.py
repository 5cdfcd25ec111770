"""CRL loss terms as pure torch functions (no Ray, no MLflow).

Source: Simko et al., "Improving Large Language Model Safety with Contrastive Representation Learning"
(EMNLP 2025), restated in shared/docs/METHOD.md. Hidden states are indexed like HF ``hidden_states``
(0 = embeddings, i = output of block i-1); ``*_lora`` come from the model with the adapter active,
``*_orig`` from the original model (adapter disabled, no gradient).
"""

from __future__ import annotations

from typing import Sequence

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
):
    """(L_b, L_h) of METHOD.md.

    L_b = sum_{l in L_b, i, t} M_b ReLU(d_bp(h_l, h0_l) - d_bn(h_l, c_l) + m_b) / (|L_b| sum M_b)
    L_h = sum_{l in S, i, t}   M_h ReLU(d_hp(h_l, c_l) - d_hn(h_l, h0_l) + m_h) / (|S| sum M_h)
    with c_l the masked mean of the LoRA harmful hidden states at layer l (with gradient).
    With ``return_diagnostics`` a third value holds the mean positive/negative distances of both terms.
    """
    mb = benign_mask.to(torch.float32)
    mh = harmful_mask.to(torch.float32)
    centroids: dict[int, Tensor] = {}

    def centroid(layer: int) -> Tensor:
        if layer not in centroids:
            centroids[layer] = harmful_centroid(harmful_lora[layer], mh)
        return centroids[layer]

    sums = {"benign_pos": 0.0, "benign_neg": 0.0, "harmful_pos": 0.0, "harmful_neg": 0.0}
    benign_total = benign_lora[benign_layers[0]].new_zeros((), dtype=torch.float32)
    for layer in benign_layers:
        h = benign_lora[layer]
        d_pos = distance(dist_benign_pos, h, benign_orig[layer].detach())
        d_neg = distance(dist_benign_neg, h, centroid(layer))
        benign_total = benign_total + (F.relu(d_pos - d_neg + margin_benign) * mb).sum()
        if return_diagnostics:
            sums["benign_pos"] += float((d_pos * mb).sum() / mb.sum().clamp_min(1.0))
            sums["benign_neg"] += float((d_neg * mb).sum() / mb.sum().clamp_min(1.0))
    harmful_total = harmful_lora[harmful_layers[0]].new_zeros((), dtype=torch.float32)
    for layer in harmful_layers:
        h = harmful_lora[layer]
        d_pos = distance(dist_harmful_pos, h, centroid(layer))
        d_neg = distance(dist_harmful_neg, h, harmful_orig[layer].detach())
        harmful_total = harmful_total + (F.relu(d_pos - d_neg + margin_harmful) * mh).sum()
        if return_diagnostics:
            sums["harmful_pos"] += float((d_pos * mh).sum() / mh.sum().clamp_min(1.0))
            sums["harmful_neg"] += float((d_neg * mh).sum() / mh.sum().clamp_min(1.0))
    loss_b = benign_total / (len(benign_layers) * mb.sum().clamp_min(1.0))
    loss_h = harmful_total / (len(harmful_layers) * mh.sum().clamp_min(1.0))
    if not return_diagnostics:
        return loss_b, loss_h
    diag = {f"dist/{k}": v / (len(benign_layers) if k.startswith("benign") else len(harmful_layers))
            for k, v in sums.items()}
    return loss_b, loss_h, diag


def kl_retain(logits_orig: Tensor, logits_lora: Tensor, mask: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 KL(softmax(z0/T) || softmax(z/T)), summed over unmasked positions, "batchmean" over sequences."""
    t = temperature
    logp = F.log_softmax(logits_lora.float() / t, dim=-1)
    logq = F.log_softmax(logits_orig.detach().float() / t, dim=-1)
    per_token = (logq.exp() * (logq - logp)).sum(-1)
    return t * t * (per_token * mask.to(torch.float32)).sum() / logits_lora.shape[0]
