"""Capability metrics: does the defended model still work? Pure torch/transformers: no Ray, no MLflow.

- :func:`mmlu_accuracy`: MMLU on a seeded subset stratified by topic, 0- or k-shot, scored by the
  log-likelihood of the answer letter (or, optionally, the full lm-evaluation-harness MMLU).
- :func:`over_refusal`: the fraction of benign (but risky-looking) prompts the model refuses.
- :func:`degeneracy`: how repetitive generations are (CRL's large margins can collapse answers into loops).
- :func:`benign_drift`: KL to the base model and perplexity on the base model's own answers to benign prompts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from crl_ray.config import DataSource, GenerationConfig, MMLUConfig
from crl_ray.data.encoding import build_request, end_of_turn_id, pad_id
from crl_ray.data.generate import model_device
from crl_ray.errors import UserError

__all__ = [
    "LETTERS",
    "MMLU_SOURCE",
    "DriftResult",
    "MMLUQuestion",
    "MMLUResult",
    "OverRefusalResult",
    "benign_drift",
    "degeneracy",
    "degeneracy_components",
    "degeneracy_score",
    "drift_reference",
    "head_logits",
    "hidden_states",
    "letter_logprobs",
    "load_mmlu",
    "mmlu_accuracy",
    "mmlu_items",
    "mmlu_text",
    "merged_adapter",
    "over_refusal",
    "reference_model",
    "repeated_fraction",
    "representation_reference",
    "representation_shift",
    "right_padded",
    "stratified_indices",
    "target_nll",
]

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
MMLU_SOURCE = "mmlu"  # embedded MMLU test set (question, answer_a..d, correct_answer, topic)
DEGENERACY_N = 3  # n-gram length of the degeneracy score: long enough that ordinary prose rarely repeats one


# --------------------------------------------------------------------------------------------- batching
def right_padded(seqs: Sequence[Sequence[int]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, lengths) of right-padded sequences.

    Right padding keeps every real token at its natural position, so no position ids are needed and the logits
    of a row do not depend on the other rows of its batch.
    """
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask, torch.tensor([len(s) for s in seqs])


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, desc: str,
             progress: bool) -> Iterator[list[int]]:
    """Indices of ``seqs`` in batches of similar length (longest first), with a progress bar."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        yield order[start:start + batch_size]


def _logits(model: Any, seqs: Sequence[Sequence[int]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask, lengths = right_padded(seqs, tokenizer)
    device = model_device(model)
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return out.logits.float(), lengths.to(device)


def _last_logits(model: Any, seqs: Sequence[Sequence[int]], tokenizer: Any) -> torch.Tensor:
    """[B, V] logits at each sequence's last token. The LM head runs only at those positions (``logits_to_keep``,
    the positions of the whole batch): at the MMLU prompts' ~100-300 tokens the head over every position and its
    [B, T, V] output cost ~a fifth of the pass."""
    input_ids, attention_mask, lengths = right_padded(seqs, tokenizer)
    device = model_device(model)
    keep = torch.unique(lengths - 1)  # sorted
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                logits_to_keep=keep.to(device))
    column = torch.searchsorted(keep, lengths - 1)
    return out.logits[torch.arange(len(seqs)), column.to(out.logits.device)].float()


def hidden_states(model: Any, tokenizer: Any, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                  layers: Sequence[int], *, batch_size: int, desc: str = "hidden states",
                  progress: bool = False) -> list[torch.Tensor]:
    """HF ``hidden_states`` at ``layers`` of ``seqs[i]`` at positions ``spans[i][0]:spans[i][1]``, one
    ``[len(layers), n_i, D]`` tensor per sequence, on the CPU (the model in eval mode, restored afterwards). Layer -1
    is the last hidden state after the final norm, what the LM head reads (:func:`head_logits`): ~1/85 the size of
    the logits at a 49k vocabulary, so a base model's can be cached."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in _batches(seqs, batch_size, desc, progress):
                ids, mask, _ = right_padded([seqs[i] for i in idx], tokenizer)
                h = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                          logits_to_keep=1).hidden_states
                for row, i in enumerate(idx):
                    a, b = spans[i]
                    out[i] = torch.stack([h[layer][row, a:b] for layer in layers]).cpu().clone()
    finally:
        model.train(was_training)
    return out


def head_logits(model: Any, states: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the model's LM head on final hidden states (with the final logit soft-capping that some
    models, e.g. Gemma 2, apply in their forward)."""
    logits = model.get_output_embeddings()(states.to(model_device(model))).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# --------------------------------------------------------------------------------------------- MMLU
@dataclass(frozen=True)
class MMLUQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    topic: str


@dataclass
class MMLUResult:
    accuracy: float
    n: int
    per_topic: dict[str, float]
    backend: str
    predictions: list[str] = field(default_factory=list)  # predicted letters, subset order (backend subset)


@functools.lru_cache(maxsize=1)
def load_mmlu() -> tuple[MMLUQuestion, ...]:
    """The embedded MMLU test set (14,042 questions, 57 topics); read once per process."""
    from crl_ray.data import load_source

    ds = load_source(DataSource(source=MMLU_SOURCE), "eval.mmlu")
    return tuple(MMLUQuestion(r["prompt"], (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]),
                         r["correct_answer"].strip(), r["topic"]) for r in ds)


def stratified_indices(topics: Sequence[str], size: int, seed: int, *, reserve: int = 0) -> list[int]:
    """A seeded sample of ``size`` indices whose topic counts are proportional to the topics' sizes.

    Each topic gets floor(size * n_topic / n) questions; the remaining ones go to the topics with the largest
    fractional parts (ties: topic name). ``reserve`` questions per topic stay out of the sample (for shots).
    Sorted indices.
    """
    by_topic: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(topics):
        by_topic[t].append(i)
    available = sum(max(len(ix) - reserve, 0) for ix in by_topic.values())  # same as sum(cap) below
    if size > available:
        raise UserError(f"eval.mmlu.subset_size: {size} questions asked, but only {available} can be drawn "
                        f"with {reserve} shot(s) kept aside per topic\n    fix: use a subset_size <= {available}")
    names = sorted(by_topic)
    cap = {t: max(len(by_topic[t]) - reserve, 0) for t in names}
    # exact integer arithmetic: quota_t = size * n_t / n = floor + remainder / n
    floor = {t: size * len(by_topic[t]) // len(topics) for t in names}
    remainder = {t: size * len(by_topic[t]) % len(topics) for t in names}
    counts = {t: min(floor[t], cap[t]) for t in names}
    by_remainder = sorted(names, key=lambda t: (-remainder[t], t))
    while sum(counts.values()) < size:  # terminates: size <= sum(cap)
        for t in by_remainder:
            if sum(counts.values()) < size and counts[t] < cap[t]:
                counts[t] += 1
    rng = random.Random(seed)
    picked: list[int] = []
    for t in names:
        picked += rng.sample(by_topic[t], counts[t])
    return sorted(picked)


def _question_block(q: MMLUQuestion, answer: bool) -> str:
    lines = [q.question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {q.answer}" if answer else "")


def mmlu_text(q: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """The MMLU prompt (Hendrycks et al. format): subject header, worked shots, the question, 'Answer:'."""
    header = f"The following are multiple choice questions (with answers) about {q.topic}.\n\n"
    return header + "".join(_question_block(s, True) + "\n\n" for s in shots) + _question_block(q, False)


@torch.inference_mode()
def letter_logprobs(model: Any, tokenizer: Any, contexts: Sequence[Sequence[int]],
                    continuations: Sequence[Sequence[int]], *, batch_size: int,
                    progress: bool = False) -> torch.Tensor:
    """[N, K] log-likelihood of each continuation after each context (summed over its tokens).

    When every continuation is one distinct token, one forward pass per context reads all K at once;
    otherwise each (context, continuation) pair is scored as its own sequence.
    """
    flat = [tok for cont in continuations for tok in cont]
    out = torch.empty(len(contexts), len(continuations))
    if all(len(c) == 1 for c in continuations) and len(set(flat)) == len(flat):
        for idx in _batches(contexts, batch_size, "mmlu", progress):
            last = _last_logits(model, [contexts[i] for i in idx], tokenizer).log_softmax(-1)
            out[idx] = last[:, flat].cpu()
        return out
    pairs = [(i, k) for i in range(len(contexts)) for k in range(len(continuations))]
    seqs = [list(contexts[i]) + list(continuations[k]) for i, k in pairs]
    for idx in _batches(seqs, batch_size, "mmlu", progress):
        logits, _ = _logits(model, [seqs[j] for j in idx], tokenizer)
        logp = logits.log_softmax(-1)
        for row, j in enumerate(idx):
            i, k = pairs[j]
            start = len(contexts[i])
            targets = torch.tensor(continuations[k], device=logp.device)
            positions = torch.arange(start - 1, start - 1 + len(targets), device=logp.device)
            out[i, k] = logp[row, positions, targets].sum().cpu()
    return out


def _contexts(tokenizer: Any, texts: Sequence[str], fmt: str) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of the four answer continuations, for the chat or plain format."""
    if fmt == "chat":
        try:
            contexts = [build_request(tokenizer, t) for t in texts]
        except ValueError as exc:
            raise UserError(f"eval.mmlu.format: {exc}\n    fix: set eval.mmlu.format: plain") from None
        continuations = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    else:
        contexts = [tokenizer(t)["input_ids"] for t in texts]
        continuations = [tokenizer(" " + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    return contexts, continuations


def mmlu_items(questions: Sequence[MMLUQuestion], cfg: MMLUConfig) -> list[tuple[int, list[int]]]:
    """(question index, shot indices) for each question of the subset: ``cfg.subset_size`` questions
    stratified by topic (seed ``cfg.seed``), each with ``cfg.shots`` questions of its topic from outside the
    subset (the same shots for every question of a topic, as MMLU's dev examples are)."""
    subset = stratified_indices([q.topic for q in questions], cfg.subset_size, cfg.seed, reserve=cfg.shots)
    in_subset = set(subset)
    pool: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        if i not in in_subset:
            pool[q.topic].append(i)
    rng = random.Random(cfg.seed)
    shots = {t: rng.sample(pool[t], cfg.shots) for t in sorted(pool)}
    return [(i, shots.get(questions[i].topic, [])) for i in subset]


def mmlu_accuracy(model: Any, tokenizer: Any, cfg: MMLUConfig, *, batch_size: int, progress: bool = False,
                  questions: Sequence[MMLUQuestion] | None = None) -> MMLUResult:
    """MMLU accuracy (``cfg.backend``): the predicted letter is the one with the highest log-likelihood.

    Backend subset: the questions of :func:`mmlu_items` (``questions`` defaults to the embedded MMLU test
    set), prompted in ``cfg.format``. Backend lm_eval: lm-evaluation-harness's ``mmlu`` task on the same model.
    """
    if cfg.backend == "lm_eval":
        return _mmlu_lm_eval(model, tokenizer, cfg, batch_size)
    questions = list(load_mmlu() if questions is None else questions)
    items = mmlu_items(questions, cfg)
    texts = [mmlu_text(questions[i], [questions[j] for j in shots]) for i, shots in items]
    contexts, continuations = _contexts(tokenizer, texts, cfg.format)
    was_training = model.training
    model.eval()
    try:
        scores = letter_logprobs(model, tokenizer, contexts, continuations, batch_size=batch_size,
                                 progress=progress)
    finally:
        model.train(was_training)
    predictions = [LETTERS[int(k)] for k in scores.argmax(-1)]
    per_topic: dict[str, list[bool]] = defaultdict(list)
    for letter, (i, _) in zip(predictions, items):
        per_topic[questions[i].topic].append(letter == questions[i].answer)
    correct = sum(sum(v) for v in per_topic.values())
    return MMLUResult(accuracy=correct / len(items), n=len(items),
                      per_topic={t: sum(v) / len(v) for t, v in sorted(per_topic.items())},
                      backend="subset", predictions=predictions)


def _mmlu_lm_eval(model: Any, tokenizer: Any, cfg: MMLUConfig, batch_size: int) -> MMLUResult:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("eval.mmlu.backend: lm_eval (lm-evaluation-harness) is not installed\n"
                        "    fix: pip install lm-eval, or set eval.mmlu.backend: subset") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["mmlu"], num_fewshot=cfg.shots, apply_chat_template=cfg.format == "chat",
        random_seed=cfg.seed, numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
    )
    results = out["results"]
    per_topic = {name.removeprefix("mmlu_").replace("_", " "): float(r["acc,none"])
                 for name, r in results.items() if name.startswith("mmlu_") and "acc,none" in r}
    n = int(sum(v.get("effective", 0) for v in out.get("n-samples", {}).values()))
    return MMLUResult(accuracy=float(results["mmlu"]["acc,none"]), n=n, per_topic=per_topic, backend="lm_eval")


# --------------------------------------------------------------------------------------------- degeneracy
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def repeated_fraction(tokens: Sequence[Any], n: int = DEGENERACY_N) -> float:
    """The share of the n-grams of ``tokens`` (words or token ids) that repeat an earlier one; 0 if fewer than n."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def degeneracy_score(text: str, n: int = DEGENERACY_N) -> float:
    """Degeneracy in [0, 1]: the fraction of the text's word n-grams (n = 3) that repeat an earlier one; 1 if empty.

    Tokens are lower-cased words and single punctuation marks. 0 = no 3-gram occurs twice (ordinary prose of a
    few sentences); "a b c a b c" = 1 - 3 distinct / 4 = 0.25; a loop of one word tends to 1. Texts shorter than
    n tokens (but not empty) score 0.
    """
    tokens = _tokens(text)
    return 1.0 if not tokens else repeated_fraction(tokens, n)


def degeneracy_components(text: str) -> dict[str, float]:
    """The parts behind :func:`degeneracy_score`: empty (0/1), distinct_1, distinct_2, repeated_3."""
    tokens = _tokens(text)
    if not tokens:
        return {"empty": 1.0, "distinct_1": 0.0, "distinct_2": 0.0, "repeated_3": 0.0}
    bigrams = list(zip(tokens, tokens[1:]))
    return {
        "empty": 0.0,
        "distinct_1": len(set(tokens)) / len(tokens),
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
        "repeated_3": repeated_fraction(tokens, 3),
    }


def degeneracy(texts: Sequence[str]) -> dict[str, float]:
    """Means over ``texts``: ``score`` (:func:`degeneracy_score`) and each of :func:`degeneracy_components`."""
    if not texts:
        raise ValueError("degeneracy needs at least one text")
    parts = [degeneracy_components(t) for t in texts]
    out = {"score": sum(degeneracy_score(t) for t in texts) / len(texts)}
    for key in parts[0]:
        out[key] = sum(p[key] for p in parts) / len(parts)
    return out


# --------------------------------------------------------------------------------------------- over-refusal
@dataclass
class OverRefusalResult:
    rate: float
    answers: list[str]
    refused: list[bool]


def over_refusal(answers: Sequence[str], *, is_refusal: Callable[[str], bool]) -> OverRefusalResult:
    """The fraction of the answers to benign prompts that ``is_refusal`` flags (lower is better).

    The answers come from :func:`crl_ray.evaluate.attacks.plain_generations`, which generates them together
    with the plain attacks'.
    """
    answers = list(answers)
    if not answers:
        raise ValueError("over_refusal needs at least one answer")
    refused = [is_refusal(a) for a in answers]
    return OverRefusalResult(rate=sum(refused) / len(refused), answers=answers, refused=refused)


# --------------------------------------------------------------------------------------------- drift
@dataclass
class DriftResult:
    kl: float  # mean over answer tokens of KL(base || model), nats
    ppl: float  # perplexity of the model on the base model's answers
    ppl_reference: float  # perplexity of the base model on its own answers
    tokens: int
    answers: list[str]


@contextlib.contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """The base model: ``model`` with its peft adapter disabled, or ``model`` itself when it has no adapter."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        yield model


@torch.inference_mode()
def benign_drift(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                 reference: Any = None, progress: bool = False,
                 base_answers: Sequence[str] | None = None,
                 reference_states: Sequence[torch.Tensor] | None = None) -> DriftResult:
    """How far ``model`` moved from the base model on benign text.

    The base model (``reference``, default :func:`reference_model`) answers each prompt greedily (or
    ``base_answers`` are those answers, e.g. from the generation cache); on those answer tokens (end-of-turn
    included) this computes the token-mean KL(p_base || p_model) and the perplexity exp(mean NLL) of both models.
    KL is 0 for the base model itself; higher = more drift. ``reference_states``: the base model's
    :func:`drift_reference` on these prompts and answers (e.g. cached: the same for every trial of a sweep); its
    logits are then its LM head on them instead of a forward pass.
    """
    from crl_ray.data.generate import generate_answers

    if not prompts:
        raise ValueError("benign_drift needs at least one prompt")
    def base() -> contextlib.AbstractContextManager:
        return reference_model(model) if reference is None else contextlib.nullcontext(reference)

    if base_answers is not None:
        if len(base_answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(base_answers)} base answers")
        answers = list(base_answers)
    else:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0.0)
        with base() as ref:
            answers = generate_answers(prompts, model=ref, tokenizer=tokenizer, cfg=gen, desc="base answers")
    requests, seqs = _drift_sequences(tokenizer, prompts, answers)
    if reference_states is not None and [len(h) for h in reference_states] != [len(s) - len(r)
                                                                              for r, s in zip(requests, seqs)]:
        raise ValueError("reference_states do not fit these prompts and answers")
    same = reference is None and not _has_adapter(model)  # the model is its own base: one pass, KL 0
    kl_sum = nll_sum = ref_nll_sum = 0.0
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(seqs, batch_size, "benign KL", progress):
            batch = [seqs[i] for i in idx]
            with base() as ref:
                ref_logits = None if reference_states is not None else _logits(ref, batch, tokenizer)[0]
                ref_head = [head_logits(ref, reference_states[i]) for i in idx] if reference_states else None
            logits = ref_logits if same and ref_logits is not None else _logits(model, batch, tokenizer)[0]
            for row, i in enumerate(idx):
                start, end = len(requests[i]), len(seqs[i])
                targets = torch.tensor(seqs[i][start:end], device=logits.device)
                ref_logp = (ref_head[row] if ref_head else ref_logits[row, start - 1:end - 1]).log_softmax(-1)
                logp = logits[row, start - 1:end - 1].log_softmax(-1)
                kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
                nll_sum -= float(logp.gather(-1, targets[:, None]).sum())
                ref_nll_sum -= float(ref_logp.gather(-1, targets[:, None]).sum())
                tokens += end - start
    finally:
        model.train(was_training)
    return DriftResult(kl=max(kl_sum / tokens, 0.0), ppl=math.exp(nll_sum / tokens),
                       ppl_reference=math.exp(ref_nll_sum / tokens), tokens=tokens, answers=answers)


def _drift_sequences(tokenizer: Any, prompts: Sequence[str],
                     answers: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(requests, request + answer + end-of-turn) token ids, as :func:`benign_drift` scores them."""
    eot = end_of_turn_id(tokenizer)
    requests = [build_request(tokenizer, p) for p in prompts]
    seqs = [r + tokenizer(a, add_special_tokens=False)["input_ids"] + [eot] for r, a in zip(requests, answers)]
    return requests, seqs


def drift_reference(reference: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                    batch_size: int, progress: bool = False) -> list[torch.Tensor]:
    """The base model's final hidden states at the positions that predict each answer's tokens (end-of-turn
    included): what :func:`benign_drift` reads of the base model, as ``reference_states``."""
    requests, seqs = _drift_sequences(tokenizer, prompts, answers)
    spans = [(len(r) - 1, len(s) - 1) for r, s in zip(requests, seqs)]
    states = hidden_states(reference, tokenizer, seqs, spans, [-1], batch_size=batch_size, desc="benign KL (base)",
                           progress=progress)
    return [h[0] for h in states]


@contextlib.contextmanager
def merged_adapter(model: Any) -> Iterator[Any]:
    """``model`` with its LoRA adapter merged into the base weights while the block runs; afterwards the adapter is
    separate again and the base weights are restored bit for bit (from a CPU copy: peft's unmerge alone leaves
    rounding residue).

    The same function with fewer, larger matmuls: on a 2-core CPU greedy generation ran 1.33x faster and MMLU 1.14x
    (docs/LOG.md, 2026-12-04). Only for float32 weights (merging into bf16/fp16 rounds much of a small update
    away: peft warns), and never with the adapter disabled inside the block (peft would unmerge). A model without a
    peft adapter, or not in float32, is yielded as it is.
    """
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)] if _has_adapter(model) else []
    if not layers or any(m.get_base_layer().weight.dtype != torch.float32 for m in layers):
        yield model
        return
    saved = [m.get_base_layer().weight.detach().to("cpu", copy=True) for m in layers]
    model.merge_adapter()
    try:
        yield model
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.copy_(w)


def _has_adapter(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --------------------------------------------------------------------------------------------- continuous signals
@torch.inference_mode()
def target_nll(model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *,
               batch_size: int) -> list[float]:
    """Mean NLL (nats/token) of each target completion after its chat-templated request (the target prefilled).

    A continuous robustness signal that moves before ASR does: a defense that works makes harmful completions
    (e.g. the attacks' "Sure, here is ..." targets) less likely, so this rises above the base model's value.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    requests = [build_request(tokenizer, p) for p in prompts]
    answers = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
    seqs = [r + a for r, a in zip(requests, answers)]
    out = [math.nan] * len(seqs)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(seqs, batch_size, "target NLL", False):
            logits, _ = _logits(model, [seqs[i] for i in idx], tokenizer)
            logp = logits.log_softmax(-1)
            for row, i in enumerate(idx):
                start, n = len(requests[i]), len(answers[i])
                if n == 0:
                    continue
                target = torch.tensor(answers[i], device=logp.device)
                out[i] = float(-logp[row, start - 1:start - 1 + n].gather(-1, target[:, None]).mean())
    finally:
        model.train(was_training)
    return out


@torch.inference_mode()
def representation_shift(model: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int], *,
                         batch_size: int, reference_states: Sequence[torch.Tensor] | None = None) -> float:
    """Mean cosine similarity cos(h, h0) between the model's and the base model's hidden states (HF
    ``hidden_states`` indices ``layers``) over the request tokens of ``prompts``; 1.0 = unchanged.

    Held-out harmful prompts should move (the defense reroutes them) while benign ones stay near 1. A model without
    a peft adapter is its own base (1.0 exactly). ``reference_states``: the base model's
    :func:`representation_reference` of these prompts and layers (e.g. cached), instead of its forward passes.
    """
    if not prompts:
        raise ValueError("representation_shift needs at least one prompt")
    if not _has_adapter(model):
        return 1.0
    seqs = [build_request(tokenizer, p) for p in prompts]
    if reference_states is not None and [tuple(h.shape[:2]) for h in reference_states] != [
            (len(layers), len(s)) for s in seqs]:
        raise ValueError("reference_states do not fit these prompts and layers")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(seqs, batch_size, "representation shift", False):
            ids, mask, _ = right_padded([seqs[i] for i in idx], tokenizer)
            ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
            if reference_states is None:
                with reference_model(model) as ref:
                    h0 = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                             logits_to_keep=1).hidden_states
            h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1).hidden_states
            for row, i in enumerate(idx):
                n = len(seqs[i])
                for j, layer in enumerate(layers):
                    base = h0[layer][row, :n] if reference_states is None else reference_states[i][j].to(ids.device)
                    cos = torch.nn.functional.cosine_similarity(h[layer][row, :n].float(), base.float(), dim=-1)
                    total += float(cos.sum())
                    count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


def representation_reference(reference: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int], *,
                             batch_size: int) -> list[torch.Tensor]:
    """The base model's hidden states at ``layers`` over each prompt's request tokens, one ``[len(layers), n_i, D]``
    tensor per prompt on the CPU: :func:`representation_shift`'s ``reference_states``."""
    seqs = [build_request(tokenizer, p) for p in prompts]
    return hidden_states(reference, tokenizer, seqs, [(0, len(s)) for s in seqs], layers, batch_size=batch_size,
                         desc="representation shift (base)")
