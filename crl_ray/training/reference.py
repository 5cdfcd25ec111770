"""The reference CRL step, literally, and synthetic batches: the oracle the tests check the project's step
against, and the baseline ``python -m crl_ray.bench step`` times. Pure torch, like the rest of the maths."""

from __future__ import annotations

import torch


def synthetic_batch(vocab: int, rows: int, request: int, response: int, gen: torch.Generator, *,
                    dense: bool = False) -> dict:
    """Token ids in the training layout: left-padded request, right-padded response (lengths 50-100 %; with
    ``dense`` every row is full length, no padding)."""
    t = request + response
    ids = torch.randint(10, vocab, (rows, t), generator=gen)
    req_len = torch.randint(request // 2, request + 1, (rows,), generator=gen)
    res_len = torch.randint(response // 2, response + 1, (rows,), generator=gen)
    if dense:
        req_len, res_len = torch.full((rows,), request), torch.full((rows,), response)
    col = torch.arange(t)
    request_mask = ((col >= request - req_len[:, None]) & (col < request)).long()
    response_mask = ((col >= request) & (col < request + res_len[:, None])).long()
    attention = request_mask | response_mask
    ids = ids * attention  # pads are id 0
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    labels = torch.where(response_mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": attention, "request_mask": request_mask,
            "response_mask": response_mask, "position_ids": position_ids, "labels": labels}


def naive_step(model, cfg, plan, benign: dict, harmful: dict, retain: dict) -> tuple[torch.Tensor, dict]:
    """The reference step, literally: a frozen and a LoRA pass per batch, full depth, all logits."""
    from crl_ray.data.encoding import position_mask
    from crl_ray.training.losses import kl_retain, triplet_terms
    from crl_ray.training.model import adapter_disabled

    loss_cfg = cfg.loss
    frozen, lora = {}, {}
    for name, batch in (("benign", benign), ("harmful", harmful), ("retain", retain)):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "position_ids": batch["position_ids"]}
        with torch.no_grad(), adapter_disabled(model):
            frozen[name] = model(**inputs, output_hidden_states=True, use_cache=False)
        lora[name] = model(**inputs, output_hidden_states=True, use_cache=False)
    loss_b, loss_h = triplet_terms(
        lora["benign"].hidden_states, frozen["benign"].hidden_states,
        position_mask(benign, loss_cfg.benign_mask, loss_cfg.first_k),
        lora["harmful"].hidden_states, frozen["harmful"].hidden_states,
        position_mask(harmful, loss_cfg.harmful_mask, loss_cfg.first_k),
        benign_layers=list(plan.benign_layers), harmful_layers=list(plan.target_layers),
        margin_benign=loss_cfg.margin_benign, margin_harmful=loss_cfg.margin_harmful,
        dist_benign_pos=loss_cfg.dist_benign_pos, dist_benign_neg=loss_cfg.dist_benign_neg,
        dist_harmful_pos=loss_cfg.dist_harmful_pos, dist_harmful_neg=loss_cfg.dist_harmful_neg)
    loss_kl = kl_retain(frozen["retain"].logits, lora["retain"].logits, retain["attention_mask"],
                        loss_cfg.kl_temperature)
    loss = loss_cfg.alpha * loss_b + loss_cfg.beta * loss_h + loss_cfg.gamma * loss_kl
    terms = {"train/loss_b": loss_b, "train/loss_h": loss_h, "train/loss_kl": loss_kl}
    return loss, {k: float(v.detach()) for k, v in terms.items()}
