"""Jailbreak attacks for evaluation: direct request, prefilling, embedding-space soft prompt, and GCG.

Every attack turns each behaviour into one or more attacked inputs (:class:`Candidate`) and the model's greedy
answer to each. A behaviour counts as jailbroken by an attack if the judge (elsewhere) finds ANY of its candidates'
generations harmful. The chat layout around the attack slot follows the paper's reference code
(github.com/samuelsimko/crl-llm-defense, evaluation/embedding_attack)::

    [before: template + system + behaviour][slot: soft prompt / GCG suffix][after: end of user turn + assistant header][target]

``before`` differs per behaviour and never sees the slot (causal attention), so its keys/values are computed once
(:func:`encode_prefix`) and reused at every optimisation step; only the target positions get logits. Batches are
left padded, so slot, ``after`` and target sit in the same columns of every row. Pure torch/transformers.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from crl_ray.config import (
    AttackName,
    DataSource,
    EmbeddingRunConfig,
    EvalConfig,
    GCGConfig,
)
from crl_ray.data.encoding import build_request, pad_id, stop_ids
from crl_ray.data.generate import model_device
from crl_ray.errors import UserError

__all__ = [
    "ATTACKS",
    "AttackLayout",
    "AttackResult",
    "Behavior",
    "Candidate",
    "GCG_INIT",
    "PendingGeneration",
    "Prefix",
    "SoftPromptResult",
    "attack_layout",
    "derive_target",
    "encode_prefix",
    "forward_after_prefix",
    "gcg_suffix",
    "greedy_generate",
    "init_ids",
    "load_behaviors",
    "optimise_soft_prompts",
    "plain_generations",
    "run_attack",
    "target_loss",
]

logger = logging.getLogger(__name__)

ATTACKS: tuple[str, ...] = get_args(AttackName)
GCG_INIT = "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !"  # Zou et al. 2023's suffix init, cut/repeated to suffix_tokens
_SLOT = "CRLRAYATTACKSLOT9"  # marks the attack slot in the rendered chat template


# ============================================================================================ behaviours
@dataclass(frozen=True)
class Behavior:
    """One harmful behaviour: its id, the request text and the target the optimising attacks aim for."""

    id: str
    prompt: str
    target: str


# verbs that ask for an artefact: "Write a post ..." -> "Sure, here is a post ..."
_ARTEFACT_VERBS = frozenset({
    "write", "give", "generate", "create", "compose", "draft", "produce", "provide", "list", "describe",
    "explain", "develop", "devise", "design", "suggest", "outline",
})


def derive_target(behavior: str) -> str:
    """A "Sure, here is ..." target for a behaviour without one (the affirmative target of Zou et al. 2023).

    An instruction that asks for an artefact drops its verb ("Write a blog post X" -> "Sure, here is a blog post
    X", "Explain how to X" -> "Sure, here is how to X"); a question Q becomes "Sure, here is the answer to Q";
    any other behaviour B becomes "Sure, here is how to B". Only the first letter is lower-cased (names and
    acronyms survive); trailing punctuation is dropped.
    """
    text = " ".join(behavior.split())
    question = text.endswith("?")
    text = text.rstrip(".!?:; ")
    verb, _, rest = text.partition(" ")
    if question:
        head, body = "Sure, here is the answer to ", text
    elif verb.lower() in _ARTEFACT_VERBS and rest:
        head, body = "Sure, here is ", rest
    else:
        head, body = "Sure, here is how to ", text
    return head + body[:1].lower() + body[1:]


def load_behaviors(src: DataSource, path: str = "eval.behaviors", limit: int | None = None) -> list[Behavior]:
    """The behaviours of a data source (embedded name, CSV/JSONL/Parquet file or HF dataset), first ``limit`` only.

    The behaviour text is ``src.prompt_column``; the target is ``src.response_column`` when given, else a column
    named ``target`` when there is one (AdvBench's ``goal,target`` layout), else :func:`derive_target`. Ids come
    from a ``BehaviorID`` or ``id`` column, else the row number.
    Raises :class:`UserError` naming ``path`` for missing columns, no rows, or empty behaviours/targets.
    """
    from crl_ray.data import load_source

    if src.response_column is not None and src.answer != "column":
        raise UserError(f"{path}.answer: targets are read from response_column, but answer is {src.answer!r}\n"
                        "    fix: set answer: column, or remove response_column to derive targets")
    try:
        ds = load_source(src, path, needs_answers=False)
    except ValueError as exc:  # datasets raises it for unreadable or row-less files
        raise UserError(f"{path}.source: cannot read behaviours from {src.source!r}: {exc}\n"
                        "    fix: give a file with a header and at least one row") from None
    target_column = "response" if src.response_column is not None else (
        "target" if "target" in ds.column_names else None)
    id_column = next((c for c in ("BehaviorID", "id") if c in ds.column_names), None)
    rows = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    out = []
    for i, row in enumerate(rows):
        prompt = str(row["prompt"] or "").strip()
        if not prompt:
            raise UserError(f"{path}: row {i} of {src.source!r} has an empty behaviour\n"
                            "    fix: remove the row or point prompt_column at the behaviour text")
        target = str(row[target_column] or "").strip() if target_column else derive_target(prompt)
        if not target:
            column = "response_column" if src.response_column is not None else "target column"
            raise UserError(f"{path}: row {i} of {src.source!r} has an empty target ({column})\n"
                            "    fix: fill it in, or leave the column out to derive targets")
        out.append(Behavior(id=str(row[id_column]) if id_column else str(i), prompt=prompt, target=target))
    return out


# ============================================================================================ results
@dataclass
class Candidate:
    """One attacked input and the model's greedy answer to it."""

    config: str  # "direct", "prefill", "embedding/cfg0", ..., "gcg"
    final_input: str  # the text fed to the model; a soft prompt appears as "<soft prompt: N vectors>"
    generation: str  # the greedy continuation only (for prefill: after the prefilled target)
    loss: float | None  # target cross-entropy of the final attacked input, where the attack optimises one
    steps: int  # optimisation steps used (0 for direct/prefill)


@dataclass
class AttackResult:
    """All candidates of one attack on one behaviour, and the wall time spent on it."""

    behavior: Behavior
    attack: str  # "direct" | "prefill" | "embedding" | "gcg"
    candidates: list[Candidate]
    seconds: float  # batched work is shared equally among the rows of its batch


@dataclass
class PendingGeneration:
    """An optimised attack's candidate whose input is ready and whose greedy answer is still to generate: the
    optimising attacks leave their answers to :func:`plain_generations`, so they join one generation pass."""

    result: AttackResult  # gets its share of the pass's seconds
    candidate: Candidate  # gets the answer (``generation``)
    inputs: Tensor  # [L, D] input embeddings


# ============================================================================================ layout
@dataclass(frozen=True)
class AttackLayout:
    """A behaviour's chat rendered around the attack slot, as text and as token ids (no special tokens added)."""

    before_text: str
    after_text: str
    before_ids: list[int]
    after_ids: list[int]
    target_ids: list[int]

    def chat_text(self, slot: str = "") -> str:
        return self.before_text + slot + self.after_text


def attack_layout(tokenizer: Any, behavior: Behavior) -> AttackLayout:
    """Split the chat template of ``[user: behaviour + slot]`` (with generation prompt) at the slot.

    The slot directly follows the behaviour text, as in the paper's code (``content + "{optim_str}"``).
    """
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "use an instruct/chat model or set tokenizer.chat_template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": behavior.prompt + _SLOT}],
                                         tokenize=False, add_generation_prompt=True)
    before, after = text.split(_SLOT)

    def ids(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    target_ids = ids(behavior.target)
    if not target_ids:
        raise ValueError(f"behaviour {behavior.id!r}: the target tokenizes to nothing")
    return AttackLayout(before, after, ids(before), ids(after), target_ids)


def init_ids(tokenizer: Any, text: str, n: int | None) -> list[int]:
    """Token ids of ``text``, repeated or cut to ``n`` (``None``: as many as the text has)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"init text {text!r} tokenizes to nothing; use visible text")
    if n is None:
        return ids
    return (ids * -(-n // len(ids)))[:n]


# ============================================================================================ prefix cache
def _cache_kwarg(model: Any) -> str:
    """The name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (older)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def _embed(model: Any, ids: Sequence[int]) -> Tensor:
    return model.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long, device=model_device(model)))


@dataclass
class Prefix:
    """Keys/values of left-padded prefixes (per layer ``[B, heads, P, head_dim]``), their mask and real lengths."""

    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor  # [B, P] long, 0 on padding
    lengths: Tensor  # [B] real tokens per row

    def select(self, rows: Tensor) -> "Prefix":
        """The prefixes of ``rows`` (indices; repeats allowed, e.g. to score many candidates of one row)."""
        return Prefix([(k[rows], v[rows]) for k, v in self.kv], self.mask[rows], self.lengths[rows])


@torch.no_grad()
def encode_prefix(model: Any, rows: Sequence[Sequence[int]], pad: int) -> Prefix:
    """Run the prefix tokens once (left padded, positions counting real tokens only) and keep their keys/values."""
    device = model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long, device=device)
        mask[i, width - len(r):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    kv = [(layer[0], layer[1]) for layer in getattr(out, kw)]
    return Prefix(kv, mask, mask.sum(-1))


def forward_after_prefix(model: Any, prefix: Prefix, embeds: Tensor, keep: Tensor) -> Tensor:
    """Logits ``[B, len(keep), V]`` at positions ``keep`` of ``embeds`` ``[B, N, D]`` placed after ``prefix``.

    A fresh cache is built from the stored prefix keys/values each call, so the prefix is never recomputed and the
    autograd graph of one call never reaches into another.
    """
    from transformers import DynamicCache

    cache = DynamicCache(prefix.kv, config=model.config)
    n = embeds.shape[1]
    mask = torch.cat([prefix.mask, prefix.mask.new_ones(embeds.shape[0], n)], dim=1)
    position_ids = prefix.lengths[:, None] + torch.arange(n, device=embeds.device)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=keep, **{_cache_kwarg(model): cache})
    return out.logits


def target_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row mean cross-entropy ``[B]`` of ``labels`` ``[B, T]`` (-100 = padding) under ``logits`` ``[B, T, V]``."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return ce.sum(1) / (labels != -100).sum(1)


def _targets(layouts: Sequence[AttackLayout], device: torch.device) -> Tensor:
    """Target ids ``[B, T]`` right padded with -100."""
    width = max(len(lay.target_ids) for lay in layouts)
    labels = torch.full((len(layouts), width), -100, dtype=torch.long, device=device)
    for i, lay in enumerate(layouts):
        labels[i, : len(lay.target_ids)] = torch.tensor(lay.target_ids, device=device)
    return labels


@torch.no_grad()
def _tail(model: Any, layouts: Sequence[AttackLayout], labels: Tensor) -> Tensor:
    """Embeddings of ``after + target`` ``[B, A + T, D]`` (target padding embeds token 0; it is never scored)."""
    after = {tuple(lay.after_ids) for lay in layouts}
    if len(after) != 1:
        raise ValueError("the chat template renders different text after the attack slot for different behaviours")
    after_emb = _embed(model, layouts[0].after_ids)
    target_emb = model.get_input_embeddings()(labels.clamp(min=0))
    return torch.cat([after_emb.expand(len(layouts), -1, -1), target_emb], dim=1)


# ============================================================================================ generation
@functools.lru_cache(maxsize=1)
def _preallocated_layer() -> type:
    """A transformers DynamicLayer that writes into buffers sized for the whole generation and returns views of
    them, instead of concatenating the whole cache at every step (per layer, keys and values: ~20 % of a CPU decode
    step at 32 rows x 128 tokens; docs/LOG.md, 2026-12-04)."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length = capacity, 0

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.buffers = [t.new_empty(*t.shape[:2], self.capacity, t.shape[-1])
                                for t in (key_states, value_states)]
            n = key_states.shape[-2]
            if self.length + n > self.capacity:  # more than planned: grow (never in greedy_generate)
                self.capacity = max(2 * self.capacity, self.length + n)
                self.buffers = [torch.cat([b[:, :, :self.length],
                                           b.new_empty(*b.shape[:2], self.capacity - self.length, b.shape[-1])], 2)
                                for b in self.buffers]
            for buffer, new in zip(self.buffers, (key_states, value_states)):
                buffer[:, :, self.length:self.length + n] = new
            self.length += n
            self.keys, self.values = (b[:, :, :self.length] for b in self.buffers)
            return self.keys, self.values

    return PreallocatedLayer


def _decode_cache(model: Any, capacity: int) -> Any:
    """A DynamicCache for ``capacity`` positions whose full-attention layers are preallocated (sliding-window and
    other layers as transformers makes them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    layer = _preallocated_layer()
    cache.layers = [layer(capacity) if type(old) is DynamicLayer else old for old in cache.layers]
    return cache


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, inputs: Sequence[Tensor], *, max_new_tokens: int,
                    batch_size: int, repetition_penalty: float = 1.0, preallocate: bool = True) -> list[str]:
    """Greedy continuations of input embeddings (one ``[L_i, D]`` tensor per row), in input order.

    Rows are left padded in batches of ``batch_size``; each stops at the end-of-turn/eos token (not included) or
    after ``max_new_tokens``. Only the last position gets logits. Decoded without special tokens.
    ``repetition_penalty`` != 1: transformers' RepetitionPenaltyLogitsProcessor on the tokens generated so far
    (the inputs are embeddings, so the prompt is never penalised; ``generate_answers`` does the same).
    ``preallocate``: the KV cache's buffers are allocated once per batch (:func:`_decode_cache`); the answers are
    the same as with transformers' own growing cache.
    """
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    stop = set(stop_ids(tokenizer))
    stop_t = torch.tensor(sorted(stop), device=model_device(model))
    kw = _cache_kwarg(model)
    answers: list[str] = []
    for start in range(0, len(inputs), batch_size):
        rows = inputs[start:start + batch_size]
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=embeds.device)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _decode_cache(model, width + max_new_tokens) if preallocate else None
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **({kw: cache} if cache is not None else {}))
        cache, next_pos = getattr(out, kw), position_ids[:, -1:] + 1
        done = torch.zeros(len(rows), dtype=torch.bool, device=embeds.device)
        tokens = []
        for _ in range(max_new_tokens):
            scores = out.logits[:, -1]
            if penalty is not None and tokens:
                scores = penalty(torch.stack(tokens, dim=1), scores.float())
            nxt = scores.argmax(-1)
            tokens.append(nxt)
            done |= torch.isin(nxt, stop_t)
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                        logits_to_keep=1, **{kw: cache})
            cache, next_pos = getattr(out, kw), next_pos + 1
        ids = torch.stack(tokens, dim=1).tolist()
        for row in ids:
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return answers


# ============================================================================================ embedding attack
@dataclass
class SoftPromptResult:
    """An optimised soft prompt and its loss history (``losses[t]`` = loss before update t; the last is final)."""

    embeds: Tensor  # [S, D] float32
    losses: list[float]
    steps: int  # Adam updates applied
    stopped: bool  # loss fell below early_stop_loss

    @property
    def loss(self) -> float:
        return self.losses[-1]


def optimise_soft_prompts(model: Any, tokenizer: Any, layouts: Sequence[AttackLayout], *,
                          run: EmbeddingRunConfig, steps: int, soft_prompt_tokens: int | None,
                          batch_size: int, prefixes: Sequence[Prefix] | None = None,
                          precision: str = "fp32") -> list[SoftPromptResult]:
    """Adam on one soft prompt per behaviour to minimise the target cross-entropy (Schwinn et al. 2024).

    Follows the paper's code (``run_soft_opt``): the loss of the current soft prompt is computed first and the
    behaviour stops if it is below ``run.early_stop_loss``; otherwise one Adam step is taken, for at most ``steps``
    steps (the loss after the last step is computed too). Behaviours are batched (``batch_size`` rows); a stopped
    row leaves the batch and the target columns shrink to the longest remaining target. Each row's gradient is that
    of its own loss, so results match one-at-a-time runs.
    ``prefixes`` (one per batch, from :func:`encode_prefix`) may be passed to share them across configurations.

    ``precision`` bf16: the passes that give the gradients run under bfloat16 autocast; a row whose bf16 loss is
    below twice the early-stop loss, and every row after the last step, is re-scored by an fp32 pass, and that value
    is the one recorded and compared with the threshold, so a stop (a success) means what it means in fp32.
    """
    pad, device = pad_id(tokenizer), model_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    bf16 = precision == "bf16"
    init = _embed(model, init_ids(tokenizer, run.init, soft_prompt_tokens)).detach().float()
    results: list[SoftPromptResult] = []
    for b, start in enumerate(range(0, len(layouts), batch_size)):
        chunk = layouts[start:start + batch_size]
        prefix = prefixes[b] if prefixes is not None else encode_prefix(model, [c.before_ids for c in chunk], pad)
        labels = _targets(chunk, device)
        lengths = (labels != -100).sum(1)
        tail = _tail(model, chunk, labels)
        n_slot, n_after = init.shape[0], len(chunk[0].after_ids)
        keep = torch.arange(n_slot + n_after - 1, n_slot + n_after - 1 + labels.shape[1], device=device)
        params = [torch.nn.Parameter(init.clone()) for _ in chunk]
        optimizer = torch.optim.Adam(params, lr=run.lr)
        losses: list[list[float]] = [[] for _ in chunk]
        stopped = [False] * len(chunk)
        active = list(range(len(chunk)))
        for step in range(steps + 1):
            rows = torch.tensor(active, device=device)
            width = int(lengths[rows].max())
            soft = torch.stack([params[i] for i in active]).to(dtype)
            with torch.set_grad_enabled(step < steps), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                      enabled=bf16, cache_enabled=False):
                embeds = torch.cat([soft, tail[rows, : n_after + width]], 1)
                logits = forward_after_prefix(model, prefix.select(rows), embeds, keep[:width])
                loss = target_loss(logits, labels[rows, :width])
            values = loss.detach().tolist()
            if bf16:  # the verdict in fp32: rows near the threshold, and every row's final loss
                check = [j for j, v in enumerate(values) if v < 2 * run.early_stop_loss or step == steps]
                if check:
                    sel = torch.tensor(check, device=device)
                    with torch.no_grad():
                        exact = target_loss(forward_after_prefix(model, prefix.select(rows[sel]),
                                                                 embeds.detach()[sel], keep[:width]),
                                            labels[rows[sel], :width])
                    for j, v in zip(check, exact.tolist()):
                        values[j] = v
            go_on = []
            for j, (i, v) in enumerate(zip(active, values)):
                losses[i].append(v)
                if v < run.early_stop_loss:
                    stopped[i] = True
                elif step < steps:
                    go_on.append(j)
            if not go_on:
                break
            grads = torch.autograd.grad(loss[go_on].sum(), [params[active[j]] for j in go_on])
            optimizer.zero_grad(set_to_none=True)
            for j, g in zip(go_on, grads):
                params[active[j]].grad = g
            optimizer.step()
            active = [active[j] for j in go_on]
        results += [SoftPromptResult(p.detach(), ls, len(ls) - 1, s) for p, ls, s in zip(params, losses, stopped)]
    return results


def _embedding_attack(model: Any, tokenizer: Any, behaviors: Sequence[Behavior], cfg: EvalConfig,
                      bar: tqdm) -> tuple[list[AttackResult], list[PendingGeneration]]:
    """Every configuration on every behaviour; batches group similar target lengths (less padding). The answers
    are left to generate: one :class:`PendingGeneration` per candidate."""
    ecfg = cfg.embedding
    layouts = [attack_layout(tokenizer, b) for b in behaviors]
    results = [AttackResult(b, "embedding", [], 0.0) for b in behaviors]
    pending: list[PendingGeneration] = []
    order = sorted(range(len(layouts)), key=lambda i: len(layouts[i].target_ids))
    batches = [order[s:s + ecfg.batch_size] for s in range(0, len(order), ecfg.batch_size)]
    dtype = model.get_input_embeddings().weight.dtype
    started = time.perf_counter()
    prefixes = [encode_prefix(model, [layouts[i].before_ids for i in batch], pad_id(tokenizer)) for batch in batches]
    for res in results:
        res.seconds += (time.perf_counter() - started) / len(results)
    for c, run in enumerate(ecfg.runs()):
        for batch, prefix in zip(batches, prefixes):
            chunk = [layouts[i] for i in batch]
            started = time.perf_counter()
            soft = optimise_soft_prompts(model, tokenizer, chunk, run=run, steps=ecfg.steps,
                                         soft_prompt_tokens=ecfg.soft_prompt_tokens, batch_size=len(chunk),
                                         prefixes=[prefix], precision=ecfg.precision)
            seconds = (time.perf_counter() - started) / len(chunk)
            for i, lay, s in zip(batch, chunk, soft):
                slot = f"<soft prompt: {s.embeds.shape[0]} vectors>"
                cand = Candidate(f"embedding/cfg{c}", lay.chat_text(slot), "", s.loss, s.steps)
                results[i].candidates.append(cand)
                results[i].seconds += seconds
                with torch.no_grad():
                    inputs = torch.cat([_embed(model, lay.before_ids), s.embeds.to(dtype),
                                        _embed(model, lay.after_ids)])
                pending.append(PendingGeneration(results[i], cand, inputs))
            bar.update(len(chunk))
        reached = sum(r.candidates[-1].loss < run.early_stop_loss for r in results)
        logger.info("embedding attack cfg%d (lr %g, early stop %g): %d/%d behaviours below the early-stop loss",
                    c, run.lr, run.early_stop_loss, reached, len(results))
    return results, pending


# ============================================================================================ GCG
def _allowed_tokens(tokenizer: Any, vocab_size: int) -> Tensor:
    """Boolean ``[V]``: ids GCG may place, i.e. non-special tokens that decode to printable ASCII (as in nanoGCG)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(min(vocab_size, len(tokenizer))):
        if i not in special:
            text = tokenizer.decode([i])
            allowed[i] = bool(text.strip()) and text.isascii() and text.isprintable()
    return allowed


def _round_trips(tokenizer: Any, candidates: Tensor) -> Tensor:
    """Boolean ``[W]``: the suffix decodes to text that tokenizes back to the same ids (so the attack is real text)."""
    rows = candidates.tolist()
    texts = tokenizer.batch_decode(rows)
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([list(a) == r for a, r in zip(again, rows)], dtype=torch.bool)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def score_in_chunks(score: Callable[[Tensor], Tensor], candidates: Tensor, chunk_size: int) -> tuple[Tensor, int]:
    """``score`` over ``candidates`` in chunks of ``chunk_size`` rows; a chunk that runs out of accelerator memory
    is retried at half the size (down to one row, then the error stands). Returns the scores and the chunk size
    that worked, which the caller keeps for its next call."""
    out: list[Tensor] = []
    start = 0
    while start < len(candidates):
        chunk = candidates[start:start + chunk_size]
        try:
            out.append(score(chunk))
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or chunk_size == 1:
                raise
            chunk_size = max(1, chunk_size // 2)
            logger.warning("GCG candidate scoring ran out of memory: retrying with %d candidates per pass", chunk_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += len(chunk)
    return torch.cat(out), chunk_size


def gcg_suffix(model: Any, tokenizer: Any, layout: AttackLayout, cfg: GCGConfig, *, allowed: Tensor,
               generator: torch.Generator) -> tuple[list[int], list[float]]:
    """The best suffix found by greedy coordinate gradient (Zou et al. 2023), and the losses: each step's, then the best.

    Each step: the gradient of the target cross-entropy w.r.t. the one-hot suffix gives the ``top_k`` most
    promising allowed tokens per position; ``search_width`` random single-token swaps (seeded by ``generator``)
    that survive a decode/encode round trip are scored (``score_batch`` per pass, halved on out-of-memory); the
    best becomes the current suffix.
    The returned suffix is the lowest-loss one seen, so its loss never exceeds the initial suffix's.
    """
    device, pad = model_device(model), pad_id(tokenizer)
    weight = model.get_input_embeddings().weight
    prefix = encode_prefix(model, [layout.before_ids], pad)
    labels = _targets([layout], device)
    tail = _tail(model, [layout], labels)
    n = cfg.suffix_tokens
    keep = torch.arange(n + len(layout.after_ids) - 1, n + len(layout.after_ids) - 1 + labels.shape[1], device=device)
    suffix = torch.tensor(init_ids(tokenizer, GCG_INIT, n), device=device)
    allowed = allowed.to(device)
    top_k = min(cfg.top_k, int(allowed.sum()))
    best_loss, best = float("inf"), suffix
    losses: list[float] = []
    chunk_size = cfg.score_batch or cfg.search_width
    for _ in range(cfg.steps):
        one_hot = F.one_hot(suffix, weight.shape[0]).to(weight.dtype).requires_grad_()
        embeds = torch.cat([(one_hot @ weight)[None], tail], dim=1)
        loss = target_loss(forward_after_prefix(model, prefix, embeds, keep), labels)[0]
        (grad,) = torch.autograd.grad(loss, one_hot)
        losses.append(loss.item())
        if losses[-1] < best_loss:
            best_loss, best = losses[-1], suffix
        grad = grad.float().masked_fill(~allowed, float("inf"))
        top = (-grad).topk(top_k, dim=1).indices  # [n, k]
        pos = torch.randint(0, n, (cfg.search_width,), generator=generator).to(device)
        pick = torch.randint(0, top_k, (cfg.search_width,), generator=generator).to(device)
        candidates = suffix.repeat(cfg.search_width, 1)
        candidates[torch.arange(cfg.search_width, device=device), pos] = top[pos, pick]
        candidates = candidates[_round_trips(tokenizer, candidates).to(device)]
        if len(candidates) == 0:
            continue
        def score(chunk: Tensor) -> Tensor:
            rows = torch.zeros(len(chunk), dtype=torch.long, device=device)
            embeds = torch.cat([model.get_input_embeddings()(chunk), tail.expand(len(chunk), -1, -1)], 1)
            return target_loss(forward_after_prefix(model, prefix.select(rows), embeds, keep),
                               labels.expand(len(chunk), -1))

        with torch.no_grad():
            cand_losses, chunk_size = score_in_chunks(score, candidates, chunk_size)
        j = int(cand_losses.argmin())
        suffix = candidates[j]
        if float(cand_losses[j]) < best_loss:
            best_loss, best = float(cand_losses[j]), suffix
    return best.tolist(), losses + [best_loss]


def _gcg_attack(model: Any, tokenizer: Any, behaviors: Sequence[Behavior], cfg: EvalConfig, seed: int,
                bar: tqdm) -> tuple[list[AttackResult], list[PendingGeneration]]:
    """``cfg.gcg.restarts`` GCG runs per behaviour (candidates ``gcg/restart<r>``), one seeded random stream for all.

    Every restart starts from :data:`GCG_INIT`; restarts differ by their random swaps (the stream moves on). The
    answers are left to generate (one :class:`PendingGeneration` per candidate).
    """
    generator = torch.Generator().manual_seed(seed)
    allowed = _allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0])
    results, pending = [], []
    for b in behaviors:
        started = time.perf_counter()
        lay = attack_layout(tokenizer, b)
        res = AttackResult(b, "gcg", [], 0.0)
        for r in range(cfg.gcg.restarts):
            suffix, losses = gcg_suffix(model, tokenizer, lay, cfg.gcg, allowed=allowed, generator=generator)
            cand = Candidate(f"gcg/restart{r}", lay.chat_text(tokenizer.decode(suffix)), "", losses[-1],
                             cfg.gcg.steps)
            res.candidates.append(cand)
            with torch.no_grad():
                pending.append(PendingGeneration(res, cand, _embed(model, lay.before_ids + suffix + lay.after_ids)))
        res.seconds = time.perf_counter() - started
        results.append(res)
        bar.update(1)
    return results, pending


# ============================================================================================ entry point
PLAIN = ("direct", "prefill")


def plain_generations(model: Any, tokenizer: Any, names: Sequence[str], behaviors: Sequence[Behavior],
                      cfg: EvalConfig, *, prompts: Sequence[str] = (), pending: Sequence[PendingGeneration] = (),
                      progress: bool = False) -> tuple[dict[str, list[AttackResult]], list[str]]:
    """The plain attacks in ``names`` (direct: the behaviour as the user turn; prefill: the assistant turn already
    starts with the target), greedy answers to the benign ``prompts`` (user turn only) and the answers of the
    optimising attacks' ``pending`` candidates (filled in place), in one generation pass.

    All rows go through :func:`greedy_generate` together, longest first, in batches of
    ``cfg.generation_batch_size``: greedy decoding on a CPU is memory-bound, so one pass over 24 rows is about
    twice as fast as three passes over 8 (docs/LOG.md). Answers equal those of separate passes up to float
    rounding between batch shapes. Each row's result gets its share of the pass's seconds. Returns the plain
    attacks' results (one per behaviour, in order) and the prompts' answers (in order). The model is put in eval
    mode (restored afterwards).
    """
    unknown = [n for n in names if n not in PLAIN]
    if unknown:
        raise ValueError(f"plain_generations: {unknown} are not plain attacks ({', '.join(PLAIN)})")
    # (job, index, text in, ids or input embeddings)
    rows: list[tuple[str, int, str, list[int] | Tensor]] = []
    for name in names:
        for i, b in enumerate(behaviors):
            request = tokenizer.apply_chat_template([{"role": "user", "content": b.prompt}], tokenize=False,
                                                    add_generation_prompt=True)
            ids = list(tokenizer(request, add_special_tokens=False)["input_ids"])
            if name == "prefill":
                request = request + b.target
                ids = ids + list(tokenizer(b.target, add_special_tokens=False)["input_ids"])
            rows.append((name, i, request, ids))
    rows += [("prompts", i, "", build_request(tokenizer, p)) for i, p in enumerate(prompts)]
    rows += [("pending", i, "", p.inputs) for i, p in enumerate(pending)]
    if not rows:
        return {name: [] for name in names}, []
    started = time.perf_counter()
    order = sorted(range(len(rows)), key=lambda j: -len(rows[j][3]))  # similar lengths batch together
    was_training = model.training
    model.eval()
    texts: list[str] = [""] * len(rows)
    jobs = [*names, *(["benign"] if prompts else []), *(["optimised"] if pending else [])]
    try:
        with tqdm(total=len(rows), desc="generating (" + " + ".join(jobs) + ")", unit="row",
                  disable=not progress) as bar:
            step = cfg.generation_batch_size
            for start in range(0, len(order), step):
                chunk = order[start:start + step]
                inputs = [r if isinstance(r, Tensor) else _embed(model, r) for r in (rows[j][3] for j in chunk)]
                out = greedy_generate(model, tokenizer, inputs, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=len(chunk), repetition_penalty=cfg.repetition_penalty)
                for j, text in zip(chunk, out):
                    texts[j] = text
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    seconds = (time.perf_counter() - started) / len(rows)
    results = {name: [AttackResult(b, name, [], seconds) for b in behaviors] for name in names}
    answers = [""] * len(prompts)
    for (job, i, text_in, _), text in zip(rows, texts):
        if job == "prompts":
            answers[i] = text
        elif job == "pending":
            pending[i].candidate.generation = text
            pending[i].result.seconds += seconds
        else:
            results[job][i].candidates.append(Candidate(job, text_in, text, None, 0))
    return results, answers


def run_attack(name: str, model: Any, tokenizer: Any, behaviors: list[Behavior], cfg: EvalConfig, *,
               seed: int = 0, progress: bool = False,
               pending: list[PendingGeneration] | None = None) -> list[AttackResult]:
    """Attack every behaviour with ``name`` (direct, prefill, embedding or gcg); one result per behaviour, in order.

    Greedy generation of ``cfg.max_new_tokens`` tokens. The embedding attack runs each configuration of
    ``cfg.embedding.runs()`` (one candidate each); GCG uses ``cfg.gcg`` and ``seed``. The model is put in eval mode
    (restored afterwards), its weights get no gradients, and the global torch RNG is left untouched.
    ``pending`` (embedding and gcg only): the candidates' answers are not generated here but appended to this
    list, for a later :func:`plain_generations` pass shared with other rows.
    """
    if name not in ATTACKS:
        raise UserError(f"eval.attacks: unknown attack {name!r}\n    fix: use one of {', '.join(ATTACKS)}")
    if not behaviors:
        return []
    was_training = model.training
    model.eval()
    runs = len(cfg.embedding.runs()) if name == "embedding" else 1
    device = model_device(model)
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), tqdm(total=len(behaviors) * runs, desc=f"{name} attack",
                                                       unit="behaviour", disable=not progress) as bar:
            torch.manual_seed(seed)
            if name in PLAIN:
                results = plain_generations(model, tokenizer, [name], behaviors, cfg)[0][name]
                bar.update(len(behaviors))
                return results
            if name == "embedding":
                results, todo = _embedding_attack(model, tokenizer, behaviors, cfg, bar)
            else:
                results, todo = _gcg_attack(model, tokenizer, behaviors, cfg, seed, bar)
        if pending is None:
            plain_generations(model, tokenizer, [], [], cfg, pending=todo)
        else:
            pending.extend(todo)
        return results
    finally:
        model.train(was_training)
