"""The LoRA model of one trial and the forward passes the CRL loss needs (pure torch/transformers/peft).

``forward_hidden`` runs the causal LM only as deep as a loss needs: with ``depth < N`` the decoder stops after
block ``depth - 1`` and returns ``hidden_states[0..depth]`` exactly as a full ``output_hidden_states`` pass would
(index i = output of block i-1, before the final norm), and the LM head runs on ``logits_positions`` only.
Everything goes through the root module's ``forward`` so that FSDP2's root hooks (which gather the embedding,
final norm and LM head) run as usual.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from crl_ray.config import SweepConfig


def lora_blocks(cfg: SweepConfig, num_blocks: int, deepest_layer: int) -> list[int]:
    """Decoder blocks that get adapters: ``auto`` = 0..min(deepest used hidden state, N-1) (paper: 0..max(S))."""
    blocks = cfg.lora.blocks
    if blocks == "all":
        return list(range(num_blocks))
    if blocks == "auto":
        return list(range(min(deepest_layer, num_blocks - 1) + 1))
    return sorted(blocks)


def apply_lora(model: nn.Module, cfg: SweepConfig, blocks: Sequence[int]) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on ``cfg.lora.target_modules`` of ``blocks``; base weights frozen."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), layers_to_transform=list(blocks),
                          bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``model.model.layers`` for Llama-family models)."""
    decoder = base_causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(decoder).__name__} has no `layers` ModuleList; crl_ray supports decoder-only "
                        "transformers models with model.model.layers (Llama, Mistral, Qwen, SmolLM, ...)")
    return layers


def num_blocks(model: nn.Module) -> int:
    return int(base_causal_lm(model).config.num_hidden_layers)


@contextlib.contextmanager
def _truncated(model: nn.Module, depth: int) -> Iterator[None]:
    """Run only the first ``depth`` blocks, and keep hidden_states[depth] un-normed (HF convention for i < N)."""
    config = base_causal_lm(model).config
    n = config.num_hidden_layers
    if depth >= n:
        yield
        return
    saved_tie = getattr(config, "tie_last_hidden_states", None)
    config.num_hidden_layers = depth
    config.tie_last_hidden_states = False
    try:
        yield
    finally:
        config.num_hidden_layers = n
        if saved_tie is None:
            del config.tie_last_hidden_states
        else:
            config.tie_last_hidden_states = saved_tie


def adapter_disabled(model: nn.Module):
    """Context manager: the original model (peft ``disable_adapter``), or a no-op for a plain model."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def forward_hidden(model: nn.Module, batch: dict[str, Tensor], depth: int, *,
                   logits_positions: Tensor | None = None) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """(hidden_states[0..depth], logits) of one pass over ``batch`` (input_ids, attention_mask, position_ids).

    ``logits_positions``: 1-D column indices whose logits are needed ([B, len, V]); None = no logits (the LM head
    then runs on one position only, which transformers needs anyway).
    """
    n = num_blocks(model)
    depth = min(depth, n)
    keep: Any = 1 if logits_positions is None else logits_positions
    if logits_positions is not None and depth < n:
        raise ValueError("logits need the full depth")
    with _truncated(model, depth):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), output_hidden_states=True, use_cache=False,
                    logits_to_keep=keep)
    hidden = tuple(out.hidden_states)
    if len(hidden) != depth + 1:
        raise RuntimeError(f"{type(base_causal_lm(model)).__name__} returned {len(hidden)} hidden states for depth "
                           f"{depth}; crl_ray's truncated forward expects the decoder to honour "
                           "config.num_hidden_layers (transformers >= 5)")
    return hidden, (out.logits if logits_positions is not None else None)


def logit_columns(attention_mask: Tensor) -> Tensor:
    """Columns where at least one row has a real token (the KL term ignores the rest)."""
    return attention_mask.bool().any(0).nonzero().squeeze(-1)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
