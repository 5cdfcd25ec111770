"""Chat-templated (request, response) pairs as fixed-length token tensors, and the position masks of docs/METHOD.md.

One example is ``T = max_request_tokens + max_response_tokens`` tokens (paper: 512 + 512)::

    [pad ... pad | request (chat template up to the assistant header) | response + end-of-turn | pad ... pad]
     <------------- max_request_tokens (LEFT padded) -------------->  <-- max_response_tokens (RIGHT padded) -->

Left padding the request puts the request/response boundary at the same column in every row, so hidden states
of a batch line up. Position ids count real tokens only (``cumsum(attention_mask) - 1``), so the padding does
not shift the positions the model sees. Pure torch/transformers: no Ray, no MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import torch
from torch import Tensor

from crl_ray.config import MaskMode

__all__ = [
    "ENCODED_COLUMNS",
    "MASK_MODES",
    "build_follow_up",
    "build_request",
    "collate",
    "encode_dataset",
    "encode_pair",
    "end_of_turn_id",
    "pad_id",
    "position_mask",
]

logger = logging.getLogger(__name__)

MASK_MODES: tuple[str, ...] = get_args(MaskMode)
ENCODED_COLUMNS = ("input_ids", "attention_mask", "request_mask", "response_mask", "position_ids", "labels")
IGNORE_INDEX = -100  # labels value ignored by torch cross-entropy

_SENTINEL = "CRLRAYSENTINEL7"  # assistant content used to find what the template appends after a turn


def _as_ids(out: Any) -> list[int]:
    """apply_chat_template's token ids, whatever transformers returned (list, BatchEncoding/dict, tensor)."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, Tensor):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        if len(out) != 1:
            raise ValueError(f"expected one conversation from apply_chat_template, got {len(out)}")
        out = out[0]
    return [int(i) for i in out]


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": prompt})
    return messages


def _require_template(tokenizer: Any) -> None:
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use an instruct/chat model or set tokenizer.chat_template"
        )


def build_request(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the chat-templated request ``[system?, user]`` ending with the assistant header."""
    _require_template(tokenizer)
    out = tokenizer.apply_chat_template(_messages(prompt, system), add_generation_prompt=True, tokenize=True)
    return _as_ids(out)


def build_follow_up(tokenizer: Any, question: str) -> list[int]:
    """Token ids that close an assistant answer and ask ``question`` as the next user turn, ending with the assistant
    header: what the chat template puts between an answer's text and the next answer (appended to request + answer
    ids)."""
    _require_template(tokenizer)
    text = tokenizer.apply_chat_template(
        [*_messages("hi", None), {"role": "assistant", "content": _SENTINEL}, {"role": "user", "content": question}],
        add_generation_prompt=True, tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template drops the assistant turn, so no follow-up question can follow an answer")
    return _as_ids(tokenizer(text.split(_SENTINEL, 1)[1], add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its eos token (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the end-of-turn token, and EOS when it differs."""
    ids = [end_of_turn_id(tokenizer)]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn (ChatML ``<|im_end|>``, Llama-3 ``<|eot_id|>``, ...).

    Found by rendering a conversation whose assistant turn is a sentinel and taking the first token the template
    writes after it, when that is a special/added token; otherwise the tokenizer's eos token.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(
        getattr(tokenizer, "added_tokens_decoder", {}) or {}
    )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        after = text[text.index(_SENTINEL) + len(_SENTINEL):]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and ids[0] in special:
            return int(ids[0])
    except Exception as exc:  # noqa: BLE001 - any template failure falls back to eos
        logger.debug("could not derive the end-of-turn token from the chat template: %s", exc)
    if tokenizer.eos_token_id is None:
        raise ValueError("cannot find the end-of-turn token: no chat-template suffix and no eos token")
    return int(tokenizer.eos_token_id)


def _assemble(
    request_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    max_request_tokens: int,
    max_response_tokens: int,
    pad: int,
) -> dict[str, list[int]]:
    req = list(request_ids)[-max_request_tokens:]  # keep the end: the assistant header must survive
    res = list(response_ids)[:max_response_tokens]
    n_req_pad = max_request_tokens - len(req)
    n_res_pad = max_response_tokens - len(res)
    input_ids = [pad] * n_req_pad + req + res + [pad] * n_res_pad
    request_mask = [0] * n_req_pad + [1] * len(req) + [0] * max_response_tokens
    response_mask = [0] * max_request_tokens + [1] * len(res) + [0] * n_res_pad
    attention_mask = [a | b for a, b in zip(request_mask, response_mask)]
    position_ids, seen = [], 0
    for a in attention_mask:
        position_ids.append(max(seen + a - 1, 0))
        seen += a
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, response_mask)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "request_mask": request_mask,
        "response_mask": response_mask,
        "position_ids": position_ids,
        "labels": labels,
    }


def _check_lengths(max_request_tokens: int, max_response_tokens: int) -> None:
    if max_request_tokens < 1 or max_response_tokens < 1:
        raise ValueError(
            f"max_request_tokens ({max_request_tokens}) and max_response_tokens ({max_response_tokens}) must be >= 1"
        )


def encode_pair(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_request_tokens: int,
    max_response_tokens: int,
    system: str | None = None,
) -> dict[str, list[int]]:
    """One fixed-length example (lists of ints): the request left padded, the response + end-of-turn right padded.

    A request longer than ``max_request_tokens`` keeps its last tokens; a longer response is cut on the right
    (and then has no end-of-turn token). Keys: :data:`ENCODED_COLUMNS`; ``labels`` are the response ids, -100 elsewhere.
    """
    _check_lengths(max_request_tokens, max_response_tokens)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    return _assemble(
        build_request(tokenizer, prompt, system),
        response_ids,
        max_request_tokens=max_request_tokens,
        max_response_tokens=max_response_tokens,
        pad=pad_id(tokenizer),
    )


def encode_dataset(
    ds: Any,
    tokenizer: Any,
    *,
    max_request_tokens: int,
    max_response_tokens: int,
    system: str | None = None,
) -> Any:
    """Map a ``datasets.Dataset`` with ``prompt`` and ``response`` columns to :data:`ENCODED_COLUMNS` (torch format).

    Rows keep their order; other columns are dropped. Every tensor is int64 of length
    ``max_request_tokens + max_response_tokens``.
    """
    _check_lengths(max_request_tokens, max_response_tokens)
    missing = [c for c in ("prompt", "response") if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"encode_dataset needs columns 'prompt' and 'response'; missing {missing} (columns: {ds.column_names})"
        )
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)

    def encode_batch(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {k: [] for k in ENCODED_COLUMNS}
        responses = tokenizer(list(batch["response"]), add_special_tokens=False)["input_ids"]
        for prompt, response_ids in zip(batch["prompt"], responses):
            row = _assemble(
                build_request(tokenizer, prompt, system),
                list(response_ids) + [eot],
                max_request_tokens=max_request_tokens,
                max_response_tokens=max_response_tokens,
                pad=pad,
            )
            for k in ENCODED_COLUMNS:
                out[k].append(row[k])
        return out

    encoded = ds.map(encode_batch, batched=True, remove_columns=ds.column_names, desc="tokenizing")
    encoded.set_format("torch", columns=list(ENCODED_COLUMNS))
    return encoded


def position_mask(batch: Mapping[str, Tensor], mode: MaskMode, first_k: int = 20) -> Tensor:
    """The [B, T] float mask of the token positions a loss term uses (docs/METHOD.md, "Symbols").

    - ``response_all``: every response token (default).
    - ``request_last``: the last request token of each row (the assistant header's end).
    - ``request_all``: every request token.
    - ``request_response``: every request and response token.
    - ``response_first_k``: the first ``first_k`` response tokens (fewer if the response is shorter).
    - ``response_first``: the first response token.

    Computed from ``request_mask``/``response_mask``, so it does not assume a padding layout.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; use one of {', '.join(MASK_MODES)}")
    if first_k < 1:
        raise ValueError(f"first_k must be >= 1 (got {first_k})")
    req = batch["request_mask"].bool()
    res = batch["response_mask"].bool()
    if mode == "response_all":
        mask = res
    elif mode == "request_all":
        mask = req
    elif mode == "request_response":
        mask = req | res
    elif mode == "request_last":
        # request tokens with exactly one request token at or after them
        from_right = req.flip(-1).long().cumsum(-1).flip(-1)
        mask = req & (from_right == 1)
    else:
        k = first_k if mode == "response_first_k" else 1
        mask = res & (res.long().cumsum(-1) <= k)
    return mask.float()


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Stack equal-length encoded examples (tensors or int lists) into [B, T] tensors; text fields are skipped."""
    if not examples:
        raise ValueError("collate needs at least one example")
    out: dict[str, Tensor] = {}
    for key, first in examples[0].items():
        if isinstance(first, str) or (isinstance(first, (list, tuple)) and first and isinstance(first[0], str)):
            continue  # text columns (e.g. kept prompts) are not tensors
        out[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
    return out
