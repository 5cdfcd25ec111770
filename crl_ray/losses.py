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

    def hinge(hidden, pos_target, neg_target, mask, layers, d_pos_name, d_neg_name, margin, key):
        """sum over layers and tokens of mask * ReLU(d_pos - d_neg + margin); mean distances per layer."""
        total = hidden[layers[0]].new_zeros((), dtype=torch.float32)
        means = {f"dist/{key}_pos": 0.0, f"dist/{key}_neg": 0.0}
        for layer in layers:
            h = hidden[layer]
            d_pos = distance(d_pos_name, h, pos_target(layer))
            d_neg = distance(d_neg_name, h, neg_target(layer))
            total = total + (F.relu(d_pos - d_neg + margin) * mask).sum()
            if return_diagnostics:
                count = mask.sum().clamp_min(1.0)
                means[f"dist/{key}_pos"] += float((d_pos * mask).sum() / count) / len(layers)
                means[f"dist/{key}_neg"] += float((d_neg * mask).sum() / count) / len(layers)
        return total, means

    benign_total, benign_diag = hinge(benign_lora, lambda l: benign_orig[l].detach(), centroid, mb, benign_layers,
                                      dist_benign_pos, dist_benign_neg, margin_benign, "benign")
    harmful_total, harmful_diag = hinge(harmful_lora, centroid, lambda l: harmful_orig[l].detach(), mh,
                                        harmful_layers, dist_harmful_pos, dist_harmful_neg, margin_harmful, "harmful")
    loss_b = benign_total / (len(benign_layers) * mb.sum().clamp_min(1.0))
    loss_h = harmful_total / (len(harmful_layers) * mh.sum().clamp_min(1.0))
    if not return_diagnostics:
        return loss_b, loss_h
    return loss_b, loss_h, {**benign_diag, **harmful_diag}


def kl_retain(logits_orig: Tensor, logits_lora: Tensor, mask: Tensor, temperature: float = 2.0) -> Tensor:
    """T^2 KL(softmax(z0/T) || softmax(z/T)), summed over unmasked positions, "batchmean" over sequences."""
    t = temperature
    logp = F.log_softmax(logits_lora.float() / t, dim=-1)
    logq = F.log_softmax(logits_orig.detach().float() / t, dim=-1)
    per_token = (logq.exp() * (logq - logp)).sum(-1)
    return t * t * (per_token * mask.to(torch.float32)).sum() / logits_lora.shape[0]
