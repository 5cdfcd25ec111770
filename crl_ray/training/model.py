"""The LoRA model of one trial and the forward passes the CRL loss needs (pure torch/transformers/peft).

``forward_hidden`` runs the causal LM only as deep as a loss needs: with ``depth < N`` the decoder stops after
block ``depth - 1`` and returns ``hidden_states[0..depth]`` exactly as a full ``output_hidden_states`` pass would
(index i = output of block i-1, before the final norm), and the LM head runs on ``logits_positions`` only.
Everything goes through the root module's ``forward`` so that FSDP2's root hooks (which gather the embedding,
final norm and LM head) run as usual.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from crl_ray.config import SweepConfig


def lora_blocks(cfg: SweepConfig, num_blocks: int, last_layer: int) -> list[int]:
    """Decoder blocks that get adapters: ``all``, an explicit list, or ``auto`` = blocks 0..min(last_layer, N-1).

    ``last_layer`` is :attr:`crl_ray.training.step.LossPlan.lora_last_layer`: max(S) for crl (paper; the reference's
    ``layers_to_transform = range(max(target_layers) + 1)``), not the deepest layer any term reads (the benign
    set ``all`` reaches index N and would put adapters on every block).
    """
    blocks = cfg.lora.blocks
    if blocks == "all":
        return list(range(num_blocks))
    if blocks == "auto":
        return list(range(min(last_layer, num_blocks - 1) + 1))
    return sorted(blocks)


def apply_lora(model: nn.Module, cfg: SweepConfig, blocks: Sequence[int]) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on ``cfg.lora.target_modules`` of ``blocks``; base weights frozen."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), layers_to_transform=list(blocks),
                          bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def _save_base_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing policy: keep the outputs of the base layers' matmuls and of attention; recompute
    the rest (norms, rotary, activations, residual adds, the rank-r LoRA matmuls) in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    if op in (aten.mm.default, aten.addmm.default):
        inner = args[1].shape[-2] if op is aten.mm.default else args[2].shape[-2]
        if inner > 64 and min(args[-1].shape) > 64:
            return CheckpointPolicy.MUST_SAVE
    if op in (aten._scaled_dot_product_flash_attention_for_cpu.default,
              aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
              aten._scaled_dot_product_cudnn_attention.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def enable_activation_checkpointing(model: nn.Module, mode: str = "selective", every_n: int = 1) -> None:
    """Activation checkpointing of every ``every_n``-th decoder block (non-reentrant; passes without grad are not
    affected): ``full`` recomputes the block in backward, ``selective`` only its cheap ops (``_save_base_matmuls``),
    ``off`` does nothing."""
    if mode == "off":
        return
    if mode not in ("selective", "full") or every_n < 1:
        raise ValueError(f"activation checkpointing {mode!r} every {every_n}; use selective, full or off, every >= 1")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_base_matmuls)
    base_causal_lm(model).activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                          every_n_layers=every_n)


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights (and biases) of the decoder blocks' linear layers in ``dtype``; returns how many
    layers changed.

    Under autocast to ``dtype`` every forward casts each float32 weight its matmuls read. A frozen weight gives the
    same copy at every step, so storing it in ``dtype`` once gives the same bits and saves those casts (and half
    the frozen weights' memory). The LoRA weights stay float32 (they train); so do the embedding and the LM head
    (tied in many models: a bf16 embedding would change the residual stream's dtype). Only for a model whose
    passes all run under that autocast (a float32 input would meet a ``dtype`` weight) and that is not FSDP-sharded
    (FSDP2 wants one dtype per parameter group).
    """
    changed = 0
    for block in decoder_layers(model):
        for module in block.modules():
            own = list(module.parameters(recurse=False))
            if (isinstance(module, nn.Linear) and not any(p.requires_grad for p in own)
                    and module.weight.dtype != dtype):
                module.to(dtype)
                changed += 1
    if changed:
        # transformers loads safetensors weights as views of the file's memory map, and the cast has read every
        # page of it: with the other frozen weights (embedding, norms) copied out, nothing holds the map and it
        # goes (-0.29 GB resident for SmolLM2-135M; docs/LOG.md, session 24)
        with torch.no_grad():
            for param in model.parameters():
                if not param.requires_grad and param.dtype != dtype:
                    param.data = param.data.clone()
    return changed


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


@contextlib.contextmanager
def _headless(model: nn.Module) -> Iterator[None]:
    """The LM head returns empty logits ([..., 0]) instead of running: for passes that read hidden states only."""
    head = base_causal_lm(model).get_output_embeddings()
    if head is None:
        yield
        return
    saved = head.__dict__.get("forward")
    head.forward = _no_logits
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


def _no_logits(hidden: Tensor) -> Tensor:
    return hidden.new_zeros(*hidden.shape[:-1], 0)


# ------------------------------------------------------------------------------------------ packed rows
# Unpadded passes put the real tokens of all rows of a batch into one sequence ([1, N]): the linear layers then
# run on N tokens in one matmul (no padding, no per-row calls), and attention runs causally inside each row's
# segment only (one SDPA call per segment: what a forward on that row alone computes). The segments travel as a
# forward keyword (``crl_segments``) down to the attention function registered below, so activation
# checkpointing's recomputation sees them too; without it the function is transformers' sdpa attention.
PACKED_ATTENTION = "crl_packed_rows"


def _packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                      dropout: float = 0.0, scaling: float | None = None,
                      crl_segments: tuple[tuple[int, int], ...] | None = None, **kwargs: Any) -> tuple[Tensor, Any]:
    """Causal SDPA within each segment of a packed [1, heads, N, d] sequence -> [1, N, heads, d] (HF's layout)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if crl_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != crl_segments[-1][1]:
        raise RuntimeError(f"packed attention got a query of shape {tuple(query.shape)} for segments ending at "
                           f"{crl_segments[-1][1]}; packed passes take one [1, N] sequence")
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    short = FLOAT32_ATTENTION_MAX_TOKENS if float32_short_rows(query.device.type) else 0

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                is_causal=q.shape[2] > 1, enable_gqa=gqa)

    outs = []
    for s, e in crl_segments:
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if e - s <= short:
            with torch.autocast(query.device.type, enabled=False):
                outs.append(attend(q.float(), k.float(), v.float()))
        else:
            outs.append(attend(q, k, v))
    return torch.cat(outs, 2).transpose(1, 2).contiguous(), None


# Rows up to this many tokens take float32 attention in a CPU pass under bf16 autocast (float32_short_rows).
FLOAT32_ATTENTION_MAX_TOKENS = 256


def float32_short_rows(device_type: str) -> bool:
    """Whether packed rows of up to FLOAT32_ATTENTION_MAX_TOKENS run attention in float32 here: on a CPU under
    low-precision autocast, unless the CPU has AMX tiles.

    Measured on a 2-vCPU AMD EPYC with avx512_bf16 and no AMX (docs/LOG.md, session 24), SDPA's flash kernel
    forward + backward in the packed layout: float32 takes ~0.5x bf16's time at 48 tokens a row, ~0.6x at 90-160,
    ~0.86x at 192, about the same at 256-512 and 1.25x at 1024. In the steps: smoke shape (<= 112 tokens a row)
    1.91 -> 1.69 s, and its gradient's error against fp32 0.16 -> 0.05 (float32 attention has no bf16 rounding);
    dense 4 x 256 with selective checkpointing ~5 % faster than bf16 attention, peak memory within the bench's
    bar (it keeps twice the bytes for backward). CPUs with AMX tiles keep bf16: their bf16 kernel may use the
    tiles, and that case is not measured.
    """
    return device_type == "cpu" and torch.is_autocast_enabled(device_type) and not _cpu_has_amx()


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_bf16" in f.read()
    except OSError:  # not Linux: unknown, keep bf16
        return True


def use_packed_attention(model: nn.Module) -> bool:
    """Let ``model`` run packed passes (see ``forward_hidden(segments=...)``); False if it does not use sdpa.

    Other passes are unchanged: without segments the registered function is sdpa attention with sdpa's mask.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = base_causal_lm(model).config
    if config._attn_implementation not in ("sdpa", PACKED_ATTENTION):
        return False
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    config._attn_implementation = PACKED_ATTENTION
    return True


def segments(lengths: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, end) of each non-empty row in a packed sequence of rows of ``lengths`` tokens."""
    bounds, start = [], 0
    for n in lengths:
        if n > 0:
            bounds.append((start, start + int(n)))
        start += int(n)
    return tuple(bounds)


def adapter_disabled(model: nn.Module):
    """Context manager: the original model (peft ``disable_adapter``), or a no-op for a plain model."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def forward_hidden(model: nn.Module, batch: dict[str, Tensor], depth: int, *,
                   logits_positions: Tensor | None = None,
                   segments: tuple[tuple[int, int], ...] | None = None) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """(hidden_states[0..depth], logits) of one pass over ``batch`` (input_ids, attention_mask, position_ids).

    ``logits_positions``: 1-D column indices whose logits are needed ([B, len, V]); None = no logits (the LM head
    is skipped: transformers would run it on one position, and under autocast cast its whole weight to do so).
    ``segments``: ``batch`` is one packed sequence of rows at these (start, end) spans (needs
    ``use_packed_attention(model)``).
    """
    n = num_blocks(model)
    depth = min(depth, n)
    keep: Any = 1 if logits_positions is None else logits_positions
    if logits_positions is not None and depth < n:
        raise ValueError("logits need the full depth")
    with _truncated(model, depth), (_headless(model) if logits_positions is None else contextlib.nullcontext()):
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), output_hidden_states=True, use_cache=False,
                    logits_to_keep=keep, **({} if segments is None else {"crl_segments": segments}))
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
