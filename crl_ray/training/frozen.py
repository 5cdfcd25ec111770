"""The frozen model's outputs, computed once per training set and reused (``train.frozen_cache``).

Every CRL micro-step runs the model with the adapter disabled to get ``h0``: the benign and harmful hidden
states at the layers and positions the triplet terms read, and the retain rows' logits for the KL term. Those
depend only on the base model and the rows, never on the adapter, so with ``train.frozen_cache: true`` they are
computed once, before training, by the task that prepares the data (``crl_ray.training.train.prepare_data``), and
saved next to the encoded sets in the run's storage, where every worker reads them. A copy is kept in the node's
cache (``~/.cache/crl_ray/frozen``) under a key of everything that changes them (model, revision, dtype, the
layers and positions, the rows' token ids, library versions), so the trials of a sweep that share model, data and
layers compute them once; any change of a key part is a miss.

What is stored per group, concatenated over rows in row order with row offsets:

- benign: ``hidden_states[l]`` for ``l`` in the benign layers, at ``loss.benign_mask``'s positions;
- harmful: ``hidden_states[l]`` for ``l`` in the target layers, at ``loss.harmful_mask``'s positions;
- retain: the final hidden state at every real token; the step turns it into logits with the (frozen) LM head,
  whose weight is gathered once per worker (a few hundred MB less than storing logits: the vocabulary is large).

The step then runs only the LoRA passes (``crl_ray.training.step.StepComputer``). Values equal the inline
frozen passes up to float summation order (padded vs packed rows): ~1e-6 relative.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crl_ray.data.encoding import position_mask

logger = logging.getLogger(__name__)

FROZEN_VERSION = "1"  # bump when a change here changes the stored values for the same inputs
FROZEN_FILE = "frozen.pt"
_BATCH_ROWS = 8


@dataclass(frozen=True)
class FrozenSpec:
    """What the step reads from the frozen model: layers per group and the position masks."""

    benign_layers: tuple[int, ...]
    harmful_layers: tuple[int, ...]
    final_layer: int  # hidden_states index of the final (normed) state: the LM head's input
    benign_mask: str
    harmful_mask: str
    first_k: int

    @classmethod
    def of(cls, cfg: Any, plan: Any) -> "FrozenSpec":
        return cls(tuple(plan.benign_layers), tuple(plan.target_layers), plan.num_blocks, cfg.loss.benign_mask,
                   cfg.loss.harmful_mask, cfg.loss.first_k)

    def layers(self, group: str) -> tuple[int, ...]:
        return {"benign": self.benign_layers, "harmful": self.harmful_layers, "retain": (self.final_layer,)}[group]

    def mask(self, group: str, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, T] bool: the positions stored for ``group``'s rows (those the step selects)."""
        if group == "retain":
            return batch["attention_mask"].bool()
        mode = self.benign_mask if group == "benign" else self.harmful_mask
        return position_mask(batch, mode, self.first_k).bool()


class FrozenOutputs:
    """The stored states of one training set; :meth:`gather` returns them in the step's layout."""

    def __init__(self, spec: FrozenSpec, groups: dict[str, dict[str, Any]], key: str = ""):
        self.spec = spec
        self.groups = groups  # group -> {"offsets": [R + 1] long, "layers": {layer: [total, D]}}
        self.key = key
        self._head: Tensor | None = None
        self._head_low: Tensor | None = None  # the head in autocast's dtype, cast once

    # ------------------------------------------------------------------ reading
    def _index(self, group: str, rows: Tensor) -> Tensor:
        offsets = self.groups[group]["offsets"]
        rows = rows.to("cpu").long()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(offsets) - 1):
            raise IndexError(f"frozen cache of {group!r} holds {len(offsets) - 1} rows; asked for row {rows.tolist()}")
        parts = [torch.arange(int(offsets[r]), int(offsets[r + 1])) for r in rows.tolist()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def gather(self, group: str, rows: Tensor, num_layers: int,
               device: torch.device | None = None) -> list[Tensor | None]:
        """Per hidden-state index ``0..num_layers - 1``, the stored ``[1, M, D]`` states of ``rows`` (dataset row
        indices, in this order) for the group's layers, None elsewhere: what ``StepComputer._states`` returns."""
        index = self._index(group, rows)
        layers = self.groups[group]["layers"]
        out: list[Tensor | None] = [None] * num_layers
        for layer, values in layers.items():
            if layer < num_layers:
                out[layer] = values[index].to(device)[None] if device is not None else values[index][None]
        return out

    def retain_logits(self, rows: Tensor, model: Any) -> Tensor:
        """``[1, M, V]`` frozen logits at the real tokens of ``rows`` (row-major): the LM head on the stored final
        states. The head's weight is frozen: gathered (FSDP) once and kept."""
        head = self.head_weight(model)
        final = self.gather("retain", rows, self.spec.final_layer + 1, device=head.device)[self.spec.final_layer]
        final = final.to(head.dtype)
        kind = head.device.type
        if torch.is_autocast_enabled(kind) and head.dtype == torch.float32:
            # the cast autocast would make of this frozen weight at every step, made once (the same bits)
            low = torch.get_autocast_dtype(kind)
            if self._head_low is None or self._head_low.dtype != low:
                self._head_low = head.to(low)
            head = self._head_low
        return torch.nn.functional.linear(final, head)

    def head_weight(self, model: Any) -> Tensor:
        if self._head is None:
            weight = output_head(model).weight.detach()
            # FSDP2: a sharded DTensor (all-gathered here), or the unsharded parameter, whose storage FSDP frees on
            # the next reshard (copied here)
            self._head = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.clone()
        return self._head

    # ------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        from crl_ray.storage import atomic_write

        buf = io.BytesIO()
        torch.save({"version": FROZEN_VERSION, "key": self.key, "spec": self.spec.__dict__, "groups": self.groups}, buf)
        atomic_write(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "FrozenOutputs":
        """Into host memory; the step moves the rows it reads to its device."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != FROZEN_VERSION:
            raise ValueError(f"{path}: frozen cache version {data.get('version')!r}, this crl_ray writes "
                             f"{FROZEN_VERSION!r}; prepare the data again")
        groups = {g: {"offsets": v["offsets"], "layers": {int(k): t for k, t in v["layers"].items()}}
                  for g, v in data["groups"].items()}
        return cls(FrozenSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["spec"].items()}),
                   groups, data["key"])


def output_head(model: Any) -> Any:
    """The LM head module of a (peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (LM head); train.frozen_cache needs one")
    return head


@torch.no_grad()
def compute_frozen(model: Any, data: Mapping[str, Mapping[str, Tensor]], spec: FrozenSpec, *,
                   batch_rows: int = _BATCH_ROWS, key: str = "") -> FrozenOutputs:
    """Run the base model (no adapter) once over every row of ``data`` (group -> encoded columns ``[R, T]``) and
    keep what :class:`FrozenSpec` says. Checks on the first retain batch that the LM head on the stored final
    state gives the model's own logits (a model with a logit transform, e.g. soft-capping, would not)."""
    from crl_ray.training.model import adapter_disabled, forward_hidden

    was_training = model.training
    model.eval()
    groups: dict[str, dict[str, Any]] = {}
    try:
        with adapter_disabled(model):
            for group, columns in data.items():
                layers = spec.layers(group)
                depth = max(layers)
                kept: dict[int, list[Tensor]] = {layer: [] for layer in layers}
                counts: list[int] = []
                total = columns["input_ids"].shape[0]
                for start in range(0, total, batch_rows):
                    batch = {k: v[start:start + batch_rows] for k, v in columns.items() if isinstance(v, Tensor)}
                    mask = spec.mask(group, batch)
                    hidden, _ = forward_hidden(model, batch, depth)
                    for layer in layers:
                        kept[layer].append(hidden[layer][mask].float().cpu())
                    counts += mask.sum(1).tolist()
                    if group == "retain" and start == 0:  # one row: its logits are [T, vocab]
                        first = {k: v[:1] for k, v in batch.items()}
                        cols = torch.arange(first["input_ids"].shape[1], device=first["input_ids"].device)
                        hidden, logits = forward_hidden(model, first, depth, logits_positions=cols)
                        _check_head(model, hidden[spec.final_layer][mask[:1]], logits[mask[:1]])
                offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
                offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
                groups[group] = {"offsets": offsets, "layers": {layer: torch.cat(v) for layer, v in kept.items()}}
    finally:
        model.train(was_training)
    return FrozenOutputs(spec, groups, key)


def _check_head(model: Any, final: Tensor, logits: Tensor) -> None:
    head = output_head(model).weight
    again = torch.nn.functional.linear(final.to(head.dtype), head).float()
    if not torch.allclose(again, logits.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(f"{type(model).__name__}'s logits are not its LM head applied to the final hidden state "
                         f"(max difference {float((again - logits.float()).abs().max()):.3g}); set "
                         "train.frozen_cache: false for this model")


# ============================================================================================ the keyed cache
def frozen_key(cfg: Any, spec: FrozenSpec, data: Mapping[str, Mapping[str, Tensor]]) -> str:
    """Hash of everything the stored values depend on."""
    from crl_ray.data.generate import library_versions

    h = hashlib.sha256()
    h.update(json.dumps({"version": FROZEN_VERSION, "model": cfg.model.name, "revision": cfg.model.revision,
                         "dtype": cfg.model.dtype, "spec": spec.__dict__, "libraries": library_versions()},
                        sort_keys=True, default=str).encode())
    for group in sorted(data):
        for column in ("input_ids", "attention_mask", "position_ids", "request_mask", "response_mask"):
            h.update(f"{group}/{column}".encode())
            h.update(data[group][column].contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cached_frozen(cfg: Any, data: Mapping[str, Mapping[str, Tensor]], out: Path, cache_dir: Path) -> str:
    """Write the frozen outputs of ``data`` to ``out`` (a file), from the node's keyed cache or computed now (the
    base model loaded here) and cached; returns the key."""
    from filelock import FileLock

    import crl_ray.data
    from crl_ray.training.step import LossPlan
    from crl_ray.validate import model_info

    spec = FrozenSpec.of(cfg, LossPlan.from_config(cfg, model_info(cfg.model.name, cfg.model.revision).num_blocks))
    key = frozen_key(cfg, spec, data)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{key}.pt"
    with FileLock(str(cache_dir / f"{key}.lock")):
        if entry.exists():
            logger.info("frozen-output cache hit: %s", entry)
        else:
            rows = sum(int(c["input_ids"].shape[0]) for c in data.values())
            logger.info("frozen-output cache miss: one frozen pass over %d rows (%s)", rows, entry.name)
            # the base model in its dtype, on the GPU when this process has one (the data task on a GPU node)
            model, _ = crl_ray.data.load_model_and_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.dtype)
            if torch.cuda.is_available():
                model.to("cuda")
            device = next(model.parameters()).device
            on_device = {g: {k: v.to(device) for k, v in c.items()} for g, c in data.items()}
            compute_frozen(model, on_device, spec, key=key).save(entry)
            del model
    shutil.copyfile(entry, out)
    return key


def data_columns(datasets: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """Group -> the encoded columns of every row (``datasets.Dataset`` in torch format)."""
    return {name: {k: v for k, v in ds[:].items() if isinstance(v, Tensor)} for name, ds in datasets.items()}


__all__ = ["FROZEN_FILE", "FROZEN_VERSION", "FrozenOutputs", "FrozenSpec", "cached_frozen",
           "compute_frozen", "data_columns", "frozen_key", "output_head"]
