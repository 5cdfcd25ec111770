"""crl_ray.data.generate: batched chat generation and the provenance-recording answer cache."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers_tiny import tiny_llama

from crl_ray.config import GenerationConfig
from crl_ray.data.encoding import build_request, end_of_turn_id, pad_id
from crl_ray.data.generate import (
    GENERATE_VERSION,
    cache_key,
    cached_answers,
    generate_answers,
)

PROMPTS = [
    "Hi",
    "How do I bake bread?",
    "Tell me a joke about cats. Why did the cat sit on the computer?",
    "The quick brown fox",
    "Sure",
]




# ----------------------------------------------------------------------------------------- generation
def test_greedy_batched_equals_one_at_a_time(tok, model):
    lengths = {len(build_request(tok, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "prompts of different lengths exercise the left padding"
    cfg = GenerationConfig(max_new_tokens=12, batch_size=5)
    batched = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg)
    single = [generate_answers([p], model=model, tokenizer=tok, cfg=cfg.model_copy(update={"batch_size": 1}))[0]
              for p in PROMPTS]
    assert batched == single
    assert any(batched), "the random model should produce some text"
    # batch size 2 splits into uneven batches: still the same answers, in prompt order
    assert generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg.model_copy(update={"batch_size": 2})) == single


def test_sampling_is_seeded_and_restores_the_global_rng(tok, model):
    cfg = GenerationConfig(max_new_tokens=12, batch_size=2, temperature=1.0, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg)
    assert torch.equal(torch.rand(3), expected_next), "generation must not consume the caller's RNG stream"
    b = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg)
    c = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg.model_copy(update={"seed": 4}))
    greedy = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg.model_copy(update={"temperature": 0.0}))
    assert a == b
    assert a != c
    assert a != greedy


def test_model_generation_defaults_do_not_leak_in(tok, model):
    """Only GenerationConfig decides the answers (it is the cache key), not the model's generation_config.json."""
    opinionated = tiny_llama(tok)
    gc = opinionated.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.top_p = True, 0.3, 3, 0.5
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.max_new_tokens = 3.0, 2, 2
    for cfg in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5)):
        assert generate_answers(PROMPTS, model=opinionated, tokenizer=tok, cfg=cfg) == generate_answers(
            PROMPTS, model=model, tokenizer=tok, cfg=cfg
        )


def test_restores_training_mode(tok, model):
    model.train()
    try:
        generate_answers(["Hi"], model=model, tokenizer=tok, cfg=GenerationConfig(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()
    generate_answers(["Hi"], model=model, tokenizer=tok, cfg=GenerationConfig(max_new_tokens=2))
    assert not model.training


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: 'generates' a fixed continuation per prompt and records its calls."""

    def __init__(self, continuations: dict[int, list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations  # keyed by the number of real prompt tokens
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, generation_config):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "cfg": generation_config,
                           "training": self.training, "grad": torch.is_grad_enabled()})
        new = [self.continuations[int(m.sum())] for m in attention_mask]
        width = max(len(n) for n in new)
        pad = generation_config.pad_token_id
        tail = torch.tensor([n + [pad] * (width - len(n)) for n in new])
        return torch.cat([input_ids, tail], dim=1)


def test_answers_stop_at_end_of_turn_and_keep_prompt_order(tok):
    eot, pad = end_of_turn_id(tok), pad_id(tok)
    words = {p: tok(w, add_special_tokens=False)["input_ids"] for p, w in
             [("Hi", " short"), ("How do I bake bread?", " Mix flour."), ("The quick brown fox", " jumps")]}
    cont = {
        len(build_request(tok, "Hi")): words["Hi"] + [eot, pad, pad],
        len(build_request(tok, "How do I bake bread?")): words["How do I bake bread?"] + [eot] + words["Hi"],
        len(build_request(tok, "The quick brown fox")): words["The quick brown fox"],  # hit max_new_tokens
    }
    fake = ScriptedModel(cont)
    fake.train()
    cfg = GenerationConfig(max_new_tokens=7, batch_size=2)
    out = generate_answers(["Hi", "How do I bake bread?", "The quick brown fox"], model=fake, tokenizer=tok, cfg=cfg)
    assert out == [" short", " Mix flour.", " jumps"]
    assert fake.training
    assert len(fake.calls) == 2 and all(not c["training"] and not c["grad"] for c in fake.calls)
    first = fake.calls[0]
    # left padding: every row's real tokens end at the last column, padding is masked out
    assert bool(first["attention_mask"][:, -1].all())
    assert first["input_ids"][first["attention_mask"] == 0].eq(pad).all()
    hf = first["cfg"]
    assert hf.max_new_tokens == 7 and hf.do_sample is False
    assert eot in hf.eos_token_id and hf.pad_token_id == pad


# ----------------------------------------------------------------------------------------- cache
class Loader:
    """A load_model callable that counts its calls."""

    def __init__(self, tok, model, delay: float = 0.0):
        self.tok, self.model, self.delay, self.calls = tok, model, delay, 0

    def __call__(self):
        self.calls += 1
        time.sleep(self.delay)
        return self.model, self.tok


def _cached(prompts, cfg, cache_dir: Path, loader: Loader, system: str | None = "Be brief.", revision="r1"):
    return cached_answers(prompts, model_id="tiny/llama", revision=revision, cfg=cfg, system=system,
                          cache_dir=cache_dir, load_model=loader)


def test_cache_hit_does_not_load_the_model_and_records_provenance(tok, model, tmp_path):
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    loader = Loader(tok, model)
    first = _cached(PROMPTS, cfg, tmp_path, loader)
    assert loader.calls == 1
    assert first == generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=cfg, system="Be brief.")
    assert _cached(PROMPTS, cfg, tmp_path, loader) == first
    assert loader.calls == 1

    key = cache_key(PROMPTS, model_id="tiny/llama", revision="r1", cfg=cfg, system="Be brief.")
    meta = json.loads((tmp_path / f"{key}.meta.json").read_text())
    assert meta["model_id"] == "tiny/llama" and meta["revision"] == "r1" and meta["system"] == "Be brief."
    assert meta["settings"] == cfg.model_dump(mode="json")
    assert meta["settings"]["max_new_tokens"] == 6
    assert meta["count"] == len(PROMPTS)
    assert meta["generate_version"] == GENERATE_VERSION
    assert set(meta["versions"]) >= {"torch", "transformers"} and meta["created"]
    rows = [json.loads(line) for line in (tmp_path / f"{key}.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["answer"] for r in rows] == first
    assert not list(tmp_path.glob("*.tmp")), "no temp files are left behind"


def test_every_input_of_the_key_misses_the_cache(tok, model, tmp_path):
    cfg = GenerationConfig(max_new_tokens=4, batch_size=4)
    loader = Loader(tok, model)
    _cached(PROMPTS, cfg, tmp_path, loader)
    _cached(PROMPTS, cfg.model_copy(update={"max_new_tokens": 5}), tmp_path, loader)
    assert loader.calls == 2
    base = dict(model_id="m", revision=None, cfg=cfg, system=None)
    keys = {
        cache_key(PROMPTS, **base),
        cache_key(PROMPTS[:-1], **base),
        cache_key(PROMPTS, **{**base, "model_id": "m2"}),
        cache_key(PROMPTS, **{**base, "revision": "abc"}),
        cache_key(PROMPTS, **{**base, "system": "x"}),
        cache_key(PROMPTS, **{**base, "cfg": cfg.model_copy(update={"seed": 1})}),
        cache_key(PROMPTS, **{**base, "cfg": cfg.model_copy(update={"temperature": 0.5})}),
        cache_key(PROMPTS, **{**base, "cfg": cfg.model_copy(update={"batch_size": 2})}),
        cache_key(PROMPTS, **base, dtype="bfloat16"),
        cache_key(PROMPTS, **base, dtype="float16"),
    }
    assert len(keys) == 10
    assert cache_key(PROMPTS, **base) == cache_key(list(PROMPTS), **base)
    # float32 is the key without a dtype: entries made before the dtype was part of the key stay valid
    assert cache_key(PROMPTS, **base, dtype="float32") == cache_key(PROMPTS, **base)


def test_a_repetition_penalty_is_its_own_cache_entry_and_none_keeps_the_old_keys():
    cfg = GenerationConfig(max_new_tokens=4, batch_size=4)
    base = dict(model_id="m", revision=None, system=None)
    two = ["Hi", "How do I bake bread?"]
    # the key this entry had before GenerationConfig had a repetition_penalty (computed with that code)
    assert cache_key(two, cfg=cfg, **base) == "ec48670de55af6c0eaadafbf4d6b20050802f61fe5d42b63fb141ea732eac5c7"
    assert cache_key(two, cfg=cfg.model_copy(update={"repetition_penalty": 1.2}), **base) != cache_key(
        two, cfg=cfg, **base)


def test_the_repetition_penalty_spares_the_prompt_and_changes_looping_answers(tok, model):
    """HF generate's own repetition_penalty would penalise the prompt's tokens too; ours penalises the answer's."""
    greedy = GenerationConfig(max_new_tokens=16, batch_size=5)
    penalised = greedy.model_copy(update={"repetition_penalty": 1.5})
    plain = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=greedy)
    ours = generate_answers(PROMPTS, model=model, tokenizer=tok, cfg=penalised)
    assert ours != plain
    hf = [_hf_penalised(model, tok, p, 16, 1.5) for p in PROMPTS]
    assert ours != hf, "HF's penalty on the prompt gives other answers on these prompts"
    for p, answer in zip(PROMPTS, ours):
        assert answer == _answer_penalised(model, tok, p, 16, 1.5)


def _hf_penalised(model, tok, prompt: str, n: int, penalty: float) -> str:
    ids = torch.tensor([build_request(tok, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         repetition_penalty=penalty, eos_token_id=end_of_turn_id(tok),
                         pad_token_id=pad_id(tok))[0, ids.shape[1]:].tolist()
    return tok.decode(out[: out.index(end_of_turn_id(tok))] if end_of_turn_id(tok) in out else out,
                      skip_special_tokens=True)


@torch.no_grad()
def _answer_penalised(model, tok, prompt: str, n: int, penalty: float) -> str:
    """Independent reference: a full forward per token; a logit of a token already in the answer is divided by the
    penalty when positive and multiplied when negative (CTRL)."""
    ids, answer = build_request(tok, prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids + answer])).logits[0, -1].clone()
        for t in set(answer):
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        nxt = int(logits.argmax())
        if nxt == end_of_turn_id(tok):
            break
        answer.append(nxt)
    return tok.decode(answer, skip_special_tokens=True)


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "garbage_meta", "edit_answer"])
def test_damaged_cache_is_regenerated(tok, model, tmp_path, damage):
    cfg = GenerationConfig(max_new_tokens=4, batch_size=4)
    loader = Loader(tok, model)
    first = _cached(PROMPTS, cfg, tmp_path, loader, system=None, revision=None)
    key = cache_key(PROMPTS, model_id="tiny/llama", revision=None, cfg=cfg, system=None)
    data, meta = tmp_path / f"{key}.jsonl", tmp_path / f"{key}.meta.json"
    if damage == "truncate":
        data.write_text("".join(data.read_text().splitlines(keepends=True)[:2]))
    elif damage == "no_meta":
        meta.unlink()
    elif damage == "garbage_meta":
        meta.write_text("{not json")
    else:
        data.write_text(data.read_text().replace('"answer": "', '"answer": "EDITED', 1))
    again = _cached(PROMPTS, cfg, tmp_path, loader, system=None, revision=None)
    assert loader.calls == 2
    assert again == first
    assert _cached(PROMPTS, cfg, tmp_path, loader, system=None, revision=None) == first
    assert loader.calls == 2, "the regenerated entry is complete"


def test_concurrent_callers_generate_once(tok, model, tmp_path):
    cfg = GenerationConfig(max_new_tokens=3, batch_size=4)
    loader = Loader(tok, model, delay=0.3)
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(_cached(PROMPTS, cfg, tmp_path, loader)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == 1
    assert len(results) == 3 and results[0] == results[1] == results[2]


def test_empty_prompt_list(tok, model, tmp_path):
    assert generate_answers([], model=model, tokenizer=tok, cfg=GenerationConfig()) == []
    loader = Loader(tok, model)
    assert _cached([], GenerationConfig(), tmp_path, loader) == []
    assert loader.calls == 0, "nothing to generate: the model is not loaded"
