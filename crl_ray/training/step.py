"""One micro-step of the defense: forward passes + loss for ``loss.kind`` crl, circuit_breakers or repbend.

Pure torch (no Ray, no MLflow). Compared with the reference step (a frozen and a LoRA pass per batch, each through
every block and the LM head), it does only the work the loss needs and computes the same value:

- passes used only for hidden states stop after the deepest block the loss reads, and skip the LM head;
- the retain pass computes logits only where a real token is;
- unpadded (``train.unpad``, default on CPU): the real tokens of all rows run as one packed sequence with
  attention inside each row (``crl_ray.training.model.segments``), so no block, distance or logit is computed for padding
  (the rows' position ids are kept, so every token sees what it saw padded);
- benign and harmful rows share one frozen pass and one LoRA pass (unless a miner perturbs the harmful pass);
  unpadded, when those passes are full depth anyway, the retain rows join them too (logits at their tokens only);
- the loss terms read only the token positions their masks select (gathered once per layer);
- ``train.frozen_cache`` (crl): no frozen pass at all; h0 and the retain rows' final states come from
  :class:`crl_ray.training.frozen.FrozenOutputs`, computed once per training set, by the batches' ``row`` indices.

Data parallel: token counts, centroids and the number of KL sequences are summed over ranks (``Collectives``),
so rank r returns its share of the *global* loss; the backward value is multiplied by the world size because
FSDP averages gradients over ranks. With one process every collective is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from crl_ray.config import SweepConfig
from crl_ray.data.encoding import position_mask
from crl_ray.training.losses import (
    circuit_breaker_coefficients,
    circuit_breaker_terms,
    harmful_centroid,
    kl_retain_chunked,
    masked_norm_mean,
    repbend_cluster,
    triplet_terms,
)
from crl_ray.training.model import (
    adapter_disabled,
    forward_hidden,
    logit_columns,
    segments,
    use_packed_attention,
)

Batch = dict[str, Tensor]


class Collectives:
    """Sums over data-parallel ranks (identity without an initialised process group)."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world_size = dist.get_world_size() if self.active else 1

    def sum(self, x: Tensor) -> Tensor:
        """Sum over ranks, no gradient."""
        if not self.active:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def sum_grad(self, x: Tensor) -> Tensor:
        """Sum over ranks, differentiable (the backward sums the upstream gradients of all ranks)."""
        if not self.active:
            return x
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(x)

    def mean(self, x: Tensor) -> Tensor:
        return self.sum(x) / self.world_size


@dataclass(frozen=True)
class LossPlan:
    """The layer sets and pass depths of one loss kind, resolved against a model of ``num_blocks`` blocks."""

    kind: str
    num_blocks: int
    benign_layers: tuple[int, ...] = ()
    target_layers: tuple[int, ...] = ()
    cb_layers: tuple[int, ...] = ()
    unsafe_layers: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg: SweepConfig, num_blocks: int) -> "LossPlan":
        loss = cfg.loss
        n = num_blocks
        target = tuple(loss.target_layers.resolve(n))
        if loss.benign_layers == "all":
            benign = tuple(range(n + 1))
        elif loss.benign_layers == "target":
            benign = target
        else:
            benign = tuple(loss.benign_layers.resolve(n))
        return cls(kind=loss.kind, num_blocks=n, benign_layers=benign, target_layers=target,
                   cb_layers=tuple(loss.circuit_breakers.layers.resolve(n)),
                   unsafe_layers=tuple(loss.repbend.unsafe_layers.resolve(n)))

    @property
    def deepest_layer(self) -> int:
        """The deepest hidden state any term reads (LoRA blocks beyond it only matter through KL)."""
        if self.kind == "crl":
            return max(max(self.benign_layers), max(self.target_layers))
        if self.kind == "circuit_breakers":
            return max(self.cb_layers)
        return max(self.unsafe_layers)

    @property
    def lora_last_layer(self) -> int:
        """The hidden_states index that bounds ``lora.blocks: auto`` (blocks 0..this, clipped to the last block).

        crl: max(S) of the target layers (the paper; the reference's ``layers_to_transform =
        range(max(target_layers) + 1)``), whatever the benign layer set; circuit_breakers: max of its layers;
        repbend: max of its unsafe layers (the same rule in the reference's baselines).
        """
        if self.kind == "crl":
            return max(self.target_layers)
        if self.kind == "circuit_breakers":
            return max(self.cb_layers)
        return max(self.unsafe_layers)

    @property
    def all_layers(self) -> tuple[int, ...]:
        return tuple(range(self.num_blocks + 1))


def _cat(a: Batch, b: Batch) -> Batch:
    return {k: torch.cat([a[k], b[k]], 0) for k in a if k in b}


def _tokens(*batches: Batch) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


def _packed_batch(batch: Batch) -> tuple[Batch, list[int], Tensor]:
    """The real tokens of all rows as one [1, N] sequence (row-major, original position ids); row lengths; [B, T]
    mask of the real tokens."""
    real = batch["attention_mask"].bool()
    if "position_ids" in batch:
        positions = batch["position_ids"]
    else:  # what a padded forward would have used: the column index
        positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    sub = {"input_ids": batch["input_ids"][real][None], "position_ids": positions[real][None]}
    return sub, real.sum(1).tolist(), real


def _only(masks: list[Tensor], i: int) -> Tensor:
    """The [sum B, T] bool selection over batches concatenated in ``masks``' order that keeps only ``masks[i]``."""
    return torch.cat([m.bool() if j == i else torch.zeros_like(m, dtype=torch.bool) for j, m in enumerate(masks)], 0)


def _gather(hidden: tuple[Tensor, ...] | list[Tensor], select: Tensor, layers: set[int]) -> list[Tensor | None]:
    """Per layer, the [1, M, D] states at the positions ``select`` ([B, T] bool) marks, row-major; None elsewhere."""
    return [h[select][None] if i in layers else None for i, h in enumerate(hidden)]


def check_shapes(cached: list[Tensor | None], live: list[Tensor | None], what: str) -> None:
    """The stored states must select the same positions as the live pass (a stale or foreign cache would not)."""
    for layer, (a, b) in enumerate(zip(cached, live)):
        if a is not None and b is not None and a.shape != b.shape:
            raise RuntimeError(f"frozen cache {what} layer {layer}: {tuple(a.shape)} stored vs {tuple(b.shape)} "
                               "selected by the step; the cache does not belong to these rows or masks")


class StepComputer:
    """Computes the loss of one micro-step; owns nothing but references (model, plan, miner)."""

    def __init__(self, cfg: SweepConfig, model: nn.Module, plan: LossPlan, *, miner: Any = None,
                 collectives: Collectives | None = None, unpad: bool | None = None, frozen: Any = None):
        self.cfg = cfg
        self.model = model
        self.plan = plan
        self.miner = miner
        # crl_ray.training.frozen.FrozenOutputs (train.frozen_cache): h0 and the retain logits come from it, by the
        # batches' "row" indices, and no frozen pass runs
        self.frozen = frozen
        if frozen is not None and plan.kind != "crl":
            raise ValueError(f"train.frozen_cache is implemented for loss.kind crl, not {plan.kind}")
        self.coll = collectives or Collectives()
        if unpad is None:
            unpad = cfg.train.unpad
        if unpad == "auto":
            unpad = next(model.parameters()).device.type == "cpu" and use_packed_attention(model)
        elif unpad and not use_packed_attention(model):
            raise ValueError("train.unpad needs the model's sdpa attention; set model attention to sdpa or "
                             "train.unpad: false")
        self.unpad = bool(unpad)

    # -------------------------------------------------------------------------------------- passes
    def _frozen(self, batch: Batch, depth: int, logits: Tensor | None = None, spans=None):
        with torch.no_grad(), adapter_disabled(self.model):
            return forward_hidden(self.model, batch, depth, logits_positions=logits, segments=spans)

    def _lora(self, batch: Batch, depth: int, logits: Tensor | None = None, spans=None):
        return forward_hidden(self.model, batch, depth, logits_positions=logits, segments=spans)

    def _states(self, batch: Batch, depth: int, selects: list[tuple[Tensor, set[int]]], *, frozen: bool,
                unpad: bool, logits_select: Tensor | None = None):
        """One pass (frozen or LoRA) over ``batch``; for each (select [B, T], layers), hidden_states[0..depth] at
        the selected positions ([1, M, D], row-major) for those layers. With ``logits_select`` ([B, T], unpadded
        only) also the logits at those positions ([1, M', V]), else None.

        Unpadded: the rows' real tokens run as one packed sequence (selections must lie within them).
        """
        run = self._frozen if frozen else self._lora
        if not unpad:
            hidden, _ = run(batch, depth)
            return [_gather(hidden, select, layers) for select, layers in selects], None
        sub, lengths, real = _packed_batch(batch)
        if any(bool((select & ~real).any()) for select, _ in selects):
            raise ValueError("a loss mask selects a padding position; masks must lie within attention_mask")
        positions = None if logits_select is None else logits_select[real].nonzero().squeeze(-1)
        hidden, logits = run(sub, depth, positions, spans=segments(lengths))
        return [_gather(hidden, select[real][None], layers) for select, layers in selects], logits

    def _kl(self, retain: Batch) -> Tensor:
        """The KL term from frozen and LoRA logits at the retain batch's real tokens only (frozen ones from the
        frozen-output cache when there is one)."""
        n = self.plan.num_blocks
        real = retain["attention_mask"].bool()
        if self.unpad:
            def logits(frozen: bool) -> Tensor:
                return self._states(retain, n, [], frozen=frozen, unpad=True, logits_select=real)[1]
        else:  # logits at the columns where any row has a real token, then the real tokens' rows only
            cols = logit_columns(retain["attention_mask"])

            def logits(frozen: bool) -> Tensor:
                return (self._frozen if frozen else self._lora)(retain, n, cols)[1][real[:, cols]][None]
        z0 = self.frozen.retain_logits(retain["row"], self.model) if self.frozen is not None else logits(True)
        z = logits(False)
        return self._kl_term(z0, z, torch.ones(z.shape[:2], device=z.device), retain)

    def _kl_term(self, z0: Tensor, z: Tensor, mask: Tensor, retain: Batch) -> Tensor:
        """kl_retain over the masked logits, "batchmean" over the retain sequences of all ranks."""
        seqs = self.coll.sum(torch.tensor(float(retain["input_ids"].shape[0])))
        return kl_retain_chunked(z0, z, mask, self.cfg.loss.kl_temperature, num_sequences=seqs)

    def _global_count(self, mask: Tensor) -> Tensor:
        return self.coll.sum(mask.float().sum()).clamp_min(1.0)

    # -------------------------------------------------------------------------------------- kinds
    def __call__(self, benign: Batch, harmful: Batch, retain: Batch, *, micro_step: int,
                 optimizer_step: int) -> tuple[Tensor, dict[str, float]]:
        """(value to backpropagate, metrics); the value is this rank's share of the loss times the world size."""
        if self.plan.kind == "crl":
            local, metrics = self._crl(benign, harmful, retain, micro_step)
        elif self.plan.kind == "circuit_breakers":
            local, metrics = self._circuit_breakers(benign, harmful, retain, optimizer_step)
        else:
            local, metrics = self._repbend(benign, harmful, retain)
        metrics["tokens"] = float(self.coll.sum(torch.tensor(float(_tokens(benign, harmful, retain)))))
        return local * self.coll.world_size, metrics

    def _crl(self, benign: Batch, harmful: Batch, retain: Batch, micro_step: int):
        plan, loss_cfg = self.plan, self.cfg.loss
        depth = plan.deepest_layer
        nh = harmful["input_ids"].shape[0]
        metrics: dict[str, float] = {}

        # mining first: whether this step's harmful LoRA pass runs perturbed decides how it is laid out
        use_attack, soft_mask, harmful_in = False, None, harmful
        if self.miner is not None:
            metrics.update(self.miner.step(micro_step))
            use_attack = self.miner.draw_use()
            metrics["mining/used"] = float(use_attack)
            if use_attack:
                harmful_in, soft_mask = self.miner.prepare(harmful)

        mb = position_mask(benign, loss_cfg.benign_mask, loss_cfg.first_k).bool()
        mh = position_mask(harmful_in, loss_cfg.harmful_mask, loss_cfg.first_k).bool()
        layers_b, layers_h = set(plan.benign_layers), set(plan.target_layers)
        layers = layers_b | layers_h
        loss_kl = None
        cached = self.frozen is not None
        if cached:  # h0 from the frozen-output cache: only the LoRA passes run
            h0_b = self.frozen.gather("benign", benign["row"], depth + 1, mb.device)
            h0_h = self.frozen.gather("harmful", harmful["row"], depth + 1, mh.device)
        if use_attack:
            # the perturbed harmful pass keeps the padded layout the miner works in (soft prompts sit in padding)
            if not cached:
                (h0_b,), _ = self._states(benign, depth, [(mb, layers_b)], frozen=True, unpad=self.unpad)
                (h0_h,), _ = self._states(harmful, depth, [(mh, layers_h)], frozen=True, unpad=False)
            (h_b,), _ = self._states(benign, depth, [(mb, layers_b)], frozen=False, unpad=self.unpad)
            with self.miner.applied(slice(0, nh), soft_mask):
                (h_h,), _ = self._states(harmful_in, depth, [(mh, layers)], frozen=False, unpad=False)
        elif self.unpad and depth == plan.num_blocks:
            # every pass is full depth: benign, harmful and retain rows in one frozen and one LoRA pass, logits
            # at the retain rows' tokens only
            every = _cat(_cat(benign, harmful), retain)
            masks = [mb, mh, retain["attention_mask"]]
            sel_b, sel_h, sel_r = _only(masks, 0), _only(masks, 1), _only(masks, 2)
            if cached:
                z0 = self.frozen.retain_logits(retain["row"], self.model)
            else:
                (h0_b, h0_h), z0 = self._states(every, depth, [(sel_b, layers_b), (sel_h, layers_h)], frozen=True,
                                                unpad=True, logits_select=sel_r)
            (h_b, h_h), z = self._states(every, depth, [(sel_b, layers_b), (sel_h, layers)], frozen=False,
                                         unpad=True, logits_select=sel_r)
            loss_kl = self._kl_term(z0, z, torch.ones(z.shape[:2], device=z.device), retain)
        else:  # benign and harmful rows in one frozen and one LoRA pass
            both = _cat(benign, harmful)
            sel_b, sel_h = _only([mb, mh], 0), _only([mb, mh], 1)
            if not cached:
                (h0_b, h0_h), _ = self._states(both, depth, [(sel_b, layers_b), (sel_h, layers_h)], frozen=True,
                                               unpad=self.unpad)
            (h_b, h_h), _ = self._states(both, depth, [(sel_b, layers_b), (sel_h, layers)], frozen=False,
                                         unpad=self.unpad)
        if cached:
            check_shapes(h0_b, h_b, "benign")
            check_shapes(h0_h, h_h, "harmful")

        count_b, count_h = self._global_count(mb), self._global_count(mh)
        centroids = {layer: self.coll.sum_grad(h_h[layer].float().sum(dim=(0, 1))) / count_h
                     for layer in sorted(layers)}
        ones_b = torch.ones(h_b[max(layers_b)].shape[:2], device=mb.device)
        ones_h = torch.ones(h_h[max(layers_h)].shape[:2], device=mh.device)
        loss_b, loss_h, diag = triplet_terms(
            h_b, h0_b, ones_b, h_h, h0_h, ones_h,
            benign_layers=list(plan.benign_layers), harmful_layers=list(plan.target_layers),
            margin_benign=loss_cfg.margin_benign, margin_harmful=loss_cfg.margin_harmful,
            dist_benign_pos=loss_cfg.dist_benign_pos, dist_benign_neg=loss_cfg.dist_benign_neg,
            dist_harmful_pos=loss_cfg.dist_harmful_pos, dist_harmful_neg=loss_cfg.dist_harmful_neg,
            return_diagnostics=True, centroids=centroids, benign_count=count_b, harmful_count=count_h)
        if loss_kl is None:
            loss_kl = self._kl(retain)
        local = loss_cfg.alpha * loss_b + loss_cfg.beta * loss_h + loss_cfg.gamma * loss_kl
        terms = {"loss": local, "loss_b": loss_b, "loss_h": loss_h, "loss_kl": loss_kl}
        metrics.update({f"train/{k}": float(self.coll.sum(v.detach().float())) for k, v in terms.items()})
        for key, value in diag.items():
            # active-hinge fractions are this rank's share of the global fraction (global denominators): summed;
            # mean distances are per-rank means: averaged
            reduce = self.coll.sum if key.startswith("train/active_") else self.coll.mean
            metrics[key] = float(reduce(torch.tensor(value)))
        return local, metrics

    def _circuit_breakers(self, benign: Batch, harmful: Batch, retain: Batch, optimizer_step: int):
        cb = self.cfg.loss.circuit_breakers
        plan = self.plan
        keep = _cat(benign, retain)  # both are safe behaviour: the reference's retain set holds both kinds
        n = plan.num_blocks
        h0_r, _ = self._frozen(keep, n)
        h0_h, _ = self._frozen(harmful, plan.deepest_layer)
        h_r, _ = self._lora(keep, n)
        h_h, _ = self._lora(harmful, plan.deepest_layer)
        mr = keep["attention_mask"].float()
        mh = position_mask(harmful, cb.mask, self.cfg.loss.first_k)
        loss_retain, loss_cb = circuit_breaker_terms(
            h_r, h0_r, mr, h_h, h0_h, mh, retain_layers=list(plan.all_layers), cb_layers=list(plan.cb_layers),
            retain_count=self._global_count(mr), harmful_count=self._global_count(mh))
        c_r, c_cb = circuit_breaker_coefficients(optimizer_step, self.cfg.train.steps, cb.alpha)
        local = c_r * loss_retain + c_cb * loss_cb
        terms = {"loss": local, "loss_retain": loss_retain, "loss_cb": loss_cb}
        metrics = {f"train/{k}": float(self.coll.sum(v.detach().float())) for k, v in terms.items()}
        metrics.update({"train/coef_retain": c_r, "train/coef_cb": c_cb})
        return local, metrics

    def _repbend(self, benign: Batch, harmful: Batch, retain: Batch):
        rb = self.cfg.loss.repbend
        plan = self.plan
        n = plan.num_blocks
        mask_mode = self.cfg.loss.harmful_mask
        h0_s, _ = self._frozen(benign, n)
        h0_u, _ = self._frozen(harmful, plan.deepest_layer)
        h_s, _ = self._lora(benign, n)
        h_u, _ = self._lora(harmful, plan.deepest_layer)
        ms = position_mask(benign, mask_mode, self.cfg.loss.first_k)
        mu = position_mask(harmful, mask_mode, self.cfg.loss.first_k)
        safe = masked_norm_mean(h_s, h0_s, ms, list(plan.all_layers), self._global_count(ms))
        unsafe = masked_norm_mean(h_u, h0_u, mu, list(plan.unsafe_layers), self._global_count(mu))
        # pairs within this rank's batch; averaged over ranks
        cluster = repbend_cluster(h_u, position_mask(harmful, "request_last"), list(plan.unsafe_layers))
        cluster = cluster / self.coll.world_size
        loss_kl = self._kl(retain)
        local = rb.alpha * safe - rb.beta * unsafe + rb.gamma * cluster + rb.epsilon * loss_kl
        terms = {"loss": local, "loss_safe": safe, "loss_unsafe": unsafe, "loss_cluster": cluster,
                 "loss_kl": loss_kl}
        metrics = {f"train/{k}": float(self.coll.sum(v.detach().float())) for k, v in terms.items()}
        return local, metrics


def micro_step(computer: StepComputer, model: nn.Module, benign: Batch, harmful: Batch, retain: Batch, *,
               precision: str, device_type: str, micro_step: int, optimizer_step: int,
               divisor: int = 1) -> tuple[Tensor, dict[str, float]]:
    """Forward and backward of one micro-step in the training precision: (value, metrics) of ``computer``, with
    the gradient of value / ``divisor`` (the gradient accumulation) added to the LoRA weights' ``.grad``.

    bf16: the forward under bfloat16 autocast without a cast cache (a checkpointed block recomputes its casts in
    backward, outside the autocast region), and no peft cast of LoRA inputs in forward or backward (under autocast
    every LoRA matmul casts its input to bf16 itself; peft's cast of a bf16 input to the float32 LoRA weights'
    dtype is a round trip, two copies of every such input; bit-identical without).
    """
    from peft.helpers import disable_input_dtype_casting

    bf16 = precision == "bf16"
    with disable_input_dtype_casting(model, active=bf16):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            value, metrics = computer(benign, harmful, retain, micro_step=micro_step, optimizer_step=optimizer_step)
        (value / divisor).backward()
    return value, metrics


def finite_or_raise(metrics: dict[str, float], step: int) -> None:
    """Stop a run whose loss is NaN/inf: a sweep records it as failed with this reason."""
    bad = {k: v for k, v in metrics.items() if k.startswith("train/loss") and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite loss at optimizer step {step}: {bad}; lower train.lr or the margins")


__all__ = ["Collectives", "LossPlan", "StepComputer", "finite_or_raise", "harmful_centroid", "micro_step"]
