"""crl_ray.evaluate.capability: MMLU subset and scoring, degeneracy, over-refusal, benign KL/perplexity."""

from __future__ import annotations

import math
import sys
import types
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from helpers_tiny import tiny_llama

from crl_ray.config import MMLUConfig
from crl_ray.data.encoding import build_request
from crl_ray.errors import UserError
from crl_ray.evaluate.capability import (
    LETTERS,
    MMLUQuestion,
    benign_drift,
    degeneracy,
    degeneracy_components,
    degeneracy_score,
    letter_logprobs,
    load_mmlu,
    mmlu_accuracy,
    mmlu_items,
    mmlu_text,
    over_refusal,
    stratified_indices,
)

PROMPTS = ["How do I bake bread?", "Tell me a joke about cats.", "The quick brown fox", "Hi"]




def questions(topics: dict[str, int], answers: str = "ABCD") -> list[MMLUQuestion]:
    out = []
    for topic, n in topics.items():
        for i in range(n):
            out.append(MMLUQuestion(f"{topic} question {i}?", (f"a{i}", f"b{i}", f"c{i}", f"d{i}"),
                                    answers[len(out) % len(answers)], topic))
    return out


class LetterStub(torch.nn.Module):
    """A 'model' whose next-token logits always favour one token id, recording the batches it sees."""

    def __init__(self, favourite: int, vocab: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.favourite, self.vocab = favourite, vocab
        self.batches: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        self.batches.append(input_ids.clone())
        positions = input_ids.shape[1] if isinstance(logits_to_keep, int) else len(logits_to_keep)
        logits = torch.zeros(input_ids.shape[0], positions, self.vocab)
        logits[..., self.favourite] = 5.0
        return SimpleNamespace(logits=logits)


# ----------------------------------------------------------------------------------------- stratification
def test_stratified_counts_are_proportional_by_hand():
    topics = ["a"] * 6 + ["b"] * 3 + ["c"]
    # size 5: quotas a 3.0, b 1.5, c 0.5 -> floors 3, 1, 0; the one left goes to the largest fraction (b/c tie -> b)
    picked = stratified_indices(topics, 5, seed=0)
    assert Counter(topics[i] for i in picked) == {"a": 3, "b": 2}
    # size 4: quotas 2.4, 1.2, 0.4 -> floors 2, 1, 0; largest fractions a 0.4 = c 0.4 -> a (name)
    assert Counter(topics[i] for i in stratified_indices(topics, 4, seed=0)) == {"a": 3, "b": 1}
    # reserving 2 per topic for shots caps b at 1 and c at 0: the rest goes to a
    assert Counter(topics[i] for i in stratified_indices(topics, 5, seed=0, reserve=2)) == {"a": 4, "b": 1}
    with pytest.raises(UserError, match="eval.mmlu.subset_size"):
        stratified_indices(topics, 6, seed=0, reserve=2)  # only 4 + 1 + 0 = 5 can be drawn


def test_stratified_is_seeded_and_per_topic_on_real_mmlu():
    topics = [q.topic for q in load_mmlu()]
    sizes = Counter(topics)
    picked = stratified_indices(topics, 200, seed=0)
    assert len(picked) == len(set(picked)) == 200
    counts = Counter(topics[i] for i in picked)
    for topic, n in sizes.items():
        quota = 200 * n / len(topics)
        assert math.floor(quota) <= counts[topic] <= math.ceil(quota), topic
    assert len(counts) == 57, "every topic of MMLU is represented at 200 questions"
    assert stratified_indices(topics, 200, seed=0) == picked
    assert stratified_indices(topics, 200, seed=1) != picked
    assert Counter(topics[i] for i in stratified_indices(topics, 200, seed=1)) == counts


def test_shots_come_from_the_same_topic_outside_the_subset():
    qs = questions({"algebra": 10, "biology": 5})
    items = mmlu_items(qs, MMLUConfig(subset_size=6, shots=2, seed=3))
    subset = {i for i, _ in items}
    assert len(items) == 6
    for i, shots in items:
        assert len(shots) == 2 and not set(shots) & subset
        assert {qs[j].topic for j in shots} == {qs[i].topic}
    assert mmlu_items(qs, MMLUConfig(subset_size=6, shots=2, seed=3)) == items
    assert mmlu_items(qs, MMLUConfig(subset_size=6, shots=2, seed=4)) != items
    assert all(not shots for _, shots in mmlu_items(qs, MMLUConfig(subset_size=6, shots=0)))


def test_mmlu_text_has_header_shots_and_open_answer():
    q, shot = questions({"anatomy": 2}, answers="CB")
    text = mmlu_text(q, [shot])
    assert text == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                    "anatomy question 1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer: B\n\n"
                    "anatomy question 0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:")


# ----------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_mmlu_picks_the_most_likely_letter(tok, fmt):
    qs = questions({"x": 8}, answers="ABCC")
    # chat continuations are one token ("C"); plain ones two (" ", "C"): the shared space adds the same to all
    letter_c = tok("C" if fmt == "chat" else " C", add_special_tokens=False)["input_ids"][-1]
    stub = LetterStub(favourite=letter_c, vocab=len(tok))
    result = mmlu_accuracy(stub, tok, MMLUConfig(subset_size=8, format=fmt), batch_size=3, questions=qs)
    assert result.predictions == ["C"] * 8
    assert result.accuracy == pytest.approx(4 / 8) and result.n == 8  # answers cycle A, B, C, C
    assert result.per_topic == {"x": pytest.approx(0.5)}
    assert max(b.shape[0] for b in stub.batches) == 3, "eval.batch_size bounds the batch"


def naive_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(continuation))


@pytest.mark.parametrize("fmt", ["chat", "plain"])  # chat: one-token letters (one pass); plain: two tokens each
def test_letter_logprobs_match_a_naive_reference_and_batching(tok, model, fmt):
    qs = questions({"x": 3})
    texts = [mmlu_text(q) for q in qs]
    if fmt == "chat":
        contexts = [build_request(tok, t) for t in texts]
        conts = [tok(letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    else:
        contexts = [tok(t)["input_ids"] for t in texts]
        conts = [tok(" " + letter, add_special_tokens=False)["input_ids"] for letter in LETTERS]
    assert {len(c) for c in conts} == ({1} if fmt == "chat" else {2})
    contexts[1] = contexts[1][:-3] + contexts[1][-1:]  # unequal lengths exercise the padding
    scores = letter_logprobs(model, tok, contexts, conts, batch_size=2)
    expected = torch.tensor([[naive_logprob(model, c, k) for k in conts] for c in contexts])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(letter_logprobs(model, tok, contexts, conts, batch_size=1), scores)
    result = mmlu_accuracy(model, tok, MMLUConfig(subset_size=3, format=fmt), batch_size=2, questions=qs)
    assert result.n == 3 and set(result.predictions) <= set(LETTERS)


def test_format_chat_templates_the_question_and_plain_does_not(tok):
    qs = questions({"x": 2})
    seen = {}
    for fmt in ("chat", "plain"):
        stub = LetterStub(favourite=0, vocab=len(tok))
        mmlu_accuracy(stub, tok, MMLUConfig(subset_size=2, format=fmt), batch_size=2, questions=qs)
        seen[fmt] = tok.decode(stub.batches[0][0])
    assert "<|im_start|>user" in seen["chat"] and "<|im_start|>assistant" in seen["chat"]
    assert "<|im_start|>" not in seen["plain"] and "about x." in seen["plain"]


def test_shots_reach_the_prompt(tok):
    qs = questions({"x": 6})
    stub = LetterStub(favourite=0, vocab=len(tok))
    mmlu_accuracy(stub, tok, MMLUConfig(subset_size=2, shots=3), batch_size=1, questions=qs)
    assert tok.decode(stub.batches[0][0]).count("Answer:") == 4  # 3 worked examples + the open question


def test_lm_eval_backend_missing_is_a_user_error(tok, model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails like an absent package
    with pytest.raises(UserError, match=r"eval.mmlu.backend.*\n.*pip install lm-eval"):
        mmlu_accuracy(model, tok, MMLUConfig(backend="lm_eval"), batch_size=2)


def test_lm_eval_backend_passes_settings_and_reads_accuracy(tok, model, monkeypatch):
    calls = {}

    class FakeHFLM:
        def __init__(self, **kw):
            calls["hflm"] = kw

    def simple_evaluate(**kw):
        calls["evaluate"] = kw
        return {"results": {"mmlu": {"acc,none": 0.6}, "mmlu_anatomy": {"acc,none": 0.5}},
                "n-samples": {"mmlu_anatomy": {"original": 135, "effective": 135}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    result = mmlu_accuracy(model, tok, MMLUConfig(backend="lm_eval", shots=5, format="plain", seed=7), batch_size=4)
    assert (result.accuracy, result.n, result.per_topic, result.backend) == (0.6, 135, {"anatomy": 0.5}, "lm_eval")
    assert calls["hflm"] == {"pretrained": model, "tokenizer": tok, "batch_size": 4}
    ev = calls["evaluate"]
    assert (ev["tasks"], ev["num_fewshot"], ev["apply_chat_template"], ev["random_seed"]) == (["mmlu"], 5, False, 7)


# ----------------------------------------------------------------------------------------- degeneracy
@pytest.mark.parametrize("text, score", [
    ("a b c a b c", 1 - 3 / 4),  # 3-grams abc bca cab abc: 3 distinct of 4
    ("the the the the the", 1 - 1 / 3),  # 3 copies of one 3-gram
    ("Hello there, friend.", 0.0),  # tokens hello there , friend . -> 3 distinct 3-grams
    ("hi", 0.0),  # shorter than one 3-gram, but not empty
    ("", 1.0),
    ("   \n", 1.0),
    ("!!!!!!", 1 - 1 / 4),  # punctuation marks are tokens: 4 copies of (! ! !)
])
def test_degeneracy_score_by_hand(text, score):
    assert degeneracy_score(text) == pytest.approx(score)


def test_degeneracy_components_and_mean_by_hand():
    assert degeneracy_components("a b c a b c") == pytest.approx(
        {"empty": 0.0, "distinct_1": 3 / 6, "distinct_2": 3 / 5, "repeated_3": 0.25})
    assert degeneracy_components("") == {"empty": 1.0, "distinct_1": 0.0, "distinct_2": 0.0, "repeated_3": 0.0}
    mean = degeneracy(["a b c a b c", ""])
    assert mean == pytest.approx({"score": (0.25 + 1.0) / 2, "empty": 0.5, "distinct_1": 0.25,
                                  "distinct_2": 0.3, "repeated_3": 0.125})


# ----------------------------------------------------------------------------------------- over-refusal
def test_over_refusal_rate_is_the_flagged_fraction():
    answers = ["I can't help with that.", "Sure: knead the dough.", "I cannot do that", "Here you go"]
    result = over_refusal(answers, is_refusal=lambda a: a.startswith("I can"))
    assert result.rate == 0.5 and result.refused == [True, False, True, False] and result.answers == answers
    assert over_refusal(answers, is_refusal=lambda a: True).rate == 1.0
    assert over_refusal(answers[1:2], is_refusal=lambda a: False).rate == 0.0
    with pytest.raises(ValueError, match="at least one"):
        over_refusal([], is_refusal=lambda a: True)


# ----------------------------------------------------------------------------------------- KL / perplexity
def naive_drift(model, reference, tok, prompt: str, answer: str) -> tuple[float, float, int]:
    from crl_ray.data.encoding import end_of_turn_id

    req = build_request(tok, prompt)
    ids = req + tok(answer, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)]
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = model(input_ids=x).logits[0].float().log_softmax(-1)
        lr = reference(input_ids=x).logits[0].float().log_softmax(-1)
    kl = nll = 0.0
    for t in range(len(req), len(ids)):
        kl += float((lr[t - 1].exp() * (lr[t - 1] - lp[t - 1])).sum())
        nll -= float(lp[t - 1, ids[t]])
    return kl, nll, len(ids) - len(req)


def test_kl_is_zero_for_identical_models_and_positive_otherwise(tok, model):
    itself = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert itself.kl == 0.0 and itself.ppl == itself.ppl_reference
    twin = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, reference=tiny_llama(tok, seed=0))
    assert twin.kl == pytest.approx(0.0, abs=1e-6) and twin.ppl == pytest.approx(itself.ppl)
    other_ref = tiny_llama(tok, seed=1)
    other = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, reference=other_ref)
    assert other.kl > 0.01
    # against a one-sequence-at-a-time reference computation
    kl = nll = 0.0
    tokens = 0
    for prompt, answer in zip(PROMPTS, other.answers):
        k, n, t = naive_drift(model, other_ref, tok, prompt, answer)
        kl, nll, tokens = kl + k, nll + n, tokens + t
    assert other.tokens == tokens
    assert other.kl == pytest.approx(kl / tokens, rel=1e-4)
    assert other.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    one_by_one = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=1, reference=other_ref)
    assert one_by_one.kl == pytest.approx(other.kl, rel=1e-4)


def test_kl_uses_the_peft_base_model(tok):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    peft_model = get_peft_model(tiny_llama(tok), lora)  # B = 0: the adapter changes nothing yet
    fresh = benign_drift(peft_model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert fresh.kl == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    moved = benign_drift(peft_model, tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert moved.kl > 0.01
    assert moved.answers == fresh.answers, "the reference answers come from the base model (adapter disabled)"


def peft_tiny(tok, *, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(tiny_llama(tok).to(dtype), lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return peft_model.eval()


def test_merged_adapter_is_the_same_function_and_restores_the_base_weights_exactly(tok):
    from peft.tuners.lora import LoraLayer

    from crl_ray.evaluate.capability import merged_adapter

    model = peft_tiny(tok)
    ids = torch.tensor([build_request(tok, p) for p in PROMPTS[:1]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        separate = model(input_ids=ids).logits
        with merged_adapter(model) as same:
            assert same is model and all(m.merged for m in model.modules() if isinstance(m, LoraLayer))
            merged = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, separate, atol=1e-5, rtol=1e-5)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "bit for bit, not W + d - d"
    assert torch.equal(after, separate)
    low = peft_tiny(tok, dtype=torch.bfloat16)  # merging would round the update away: left as it is
    with merged_adapter(low):
        assert not any(m.merged for m in low.modules() if isinstance(m, LoraLayer))
    plain = tiny_llama(tok)
    with merged_adapter(plain) as same:
        assert same is plain


def test_cached_base_states_give_the_same_kl_and_representation_shift(tok):
    from crl_ray.evaluate.capability import (
        drift_reference,
        reference_model,
        representation_reference,
        representation_shift,
    )

    model = peft_tiny(tok)
    direct = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    assert direct.kl > 0.01
    with reference_model(model) as base:
        states = drift_reference(base, tok, PROMPTS, direct.answers, batch_size=2)
    assert [s.shape[-1] for s in states] == [model.config.hidden_size] * len(PROMPTS)
    cached = benign_drift(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, base_answers=direct.answers,
                          reference_states=states)
    assert cached.kl == pytest.approx(direct.kl, rel=1e-5) and cached.tokens == direct.tokens
    assert cached.ppl == pytest.approx(direct.ppl, rel=1e-6)
    assert cached.ppl_reference == pytest.approx(direct.ppl_reference, rel=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        benign_drift(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=3, base_answers=direct.answers[:2],
                     reference_states=states[1:3])
    layers = [1, 2]
    shift = representation_shift(model, tok, PROMPTS, layers, batch_size=3)
    assert shift < 0.9999
    with reference_model(model) as base:
        reference = representation_reference(base, tok, PROMPTS, layers, batch_size=2)
    assert representation_shift(model, tok, PROMPTS, layers, batch_size=3,
                                reference_states=reference) == pytest.approx(shift, rel=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        representation_shift(model, tok, PROMPTS, [1], batch_size=3, reference_states=reference)
