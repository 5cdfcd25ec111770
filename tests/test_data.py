"""Data sources (embedded, files), train/eval disjointness and the CRL data build with cached generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crl_ray.config import DataSource
from crl_ray.data import (
    EMBEDDED_SOURCES,
    build_crl_data,
    check_source,
    drop_overlap,
    load_source,
    normalise,
    refusal_resources,
    template_refusal,
)
from crl_ray.errors import UserError
from crl_ray.validate import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,rows", [("harmbench_val", 80), ("harmbench_test", 320), ("advbench", 520),
                                       ("benign_prompts", 400), ("benign_borderline", 120),
                                       ("benign_borderline_train", 86), ("mmlu", 14042),
                                       ("refusal_labels", 105)])
def test_embedded_sources_load_with_prompt_column(name: str, rows: int) -> None:
    ds = load_source(DataSource(source=name))
    assert len(ds) == rows
    assert "prompt" in ds.column_names and all(isinstance(p, str) and p for p in ds["prompt"][:20])


def test_embedded_prompt_files_are_disjoint() -> None:
    """Training's borderline prompts must never be the over-refusal evaluation's (nor the benign set's)."""
    sets = {name: [normalise(p) for p in load_source(DataSource(source=name))["prompt"]]
            for name in ("benign_prompts", "benign_borderline", "benign_borderline_train")}
    for name, prompts in sets.items():
        assert len(set(prompts)) == len(prompts), name
    assert not set(sets["benign_borderline_train"]) & set(sets["benign_borderline"])
    assert not set(sets["benign_borderline_train"]) & set(sets["benign_prompts"])
    assert not set(sets["benign_borderline"]) & set(sets["benign_prompts"])


def test_where_and_limit() -> None:
    std = load_source(DataSource(source="harmbench_val", where={"FunctionalCategory": "standard"}))
    assert len(std) == 41 and set(std["FunctionalCategory"]) == {"standard"}
    test_std = load_source(DataSource(source="harmbench_test", where={"FunctionalCategory": "standard"}))
    assert len(test_std) == 159
    assert len(load_source(DataSource(source="advbench", limit=7))) == 7
    with pytest.raises(UserError, match="no rows"):
        load_source(DataSource(source="harmbench_val", where={"FunctionalCategory": "nothing"}))


def test_refusal_labels_extra_split_and_answers() -> None:
    extra = load_source(DataSource(source="refusal_labels", split="extra"))
    assert len(extra) == 64 and "response" in extra.column_names


def test_local_files_and_nested_columns(tmp_path: Path) -> None:
    rows = [{"q": f"question {i}", "messages": [{"content": f"question {i}"}, {"content": f"answer {i}"}]}
            for i in range(3)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_source(DataSource(source=str(path), prompt_column="q", response_column="messages.1.content"))
    assert ds["prompt"] == ["question 0", "question 1", "question 2"]
    assert ds["response"] == ["answer 0", "answer 1", "answer 2"]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,response\nhi,hello\n")
    assert load_source(DataSource(source=str(csv_path)))["response"] == ["hello"]


def test_check_source_problems(tmp_path: Path) -> None:
    def paths(src: DataSource, needs_answers: bool = True) -> list[str]:
        return [p.path for p in check_source(src, "data.x", needs_answers)]

    assert paths(DataSource(source="advbnch")) == ["data.x.source"]
    assert "did you mean 'advbench'" in check_source(DataSource(source="advbnch"), "d")[0].fix
    assert paths(DataSource(source="./missing.csv")) == ["data.x.source"]
    assert paths(DataSource(source="advbench")) == ["data.x.answer"]  # no answers in AdvBench
    assert paths(DataSource(source="advbench"), needs_answers=False) == []
    assert paths(DataSource(source="advbench", answer="generate", split="test")) == ["data.x.split"]
    assert paths(DataSource(source="advbench", answer="generate", where={"nope": 1})) == ["data.x.where.nope"]
    (tmp_path / "a.csv").write_text("prompt,other\nx,y\n")
    assert paths(DataSource(source=str(tmp_path / "a.csv"), response_column="resp")) == ["data.x.response_column"]
    assert paths(DataSource(source="allenai/wildguardmix", subset="wildguardtrain")) == []  # hub: checked at load


def test_drop_overlap_removes_eval_behaviours() -> None:
    val = load_source(DataSource(source="harmbench_val"))
    held = {normalise(p) for p in val["prompt"][:5]}
    mixed = load_source(DataSource(source="harmbench_val", limit=10))
    kept = drop_overlap(mixed, held)
    assert len(kept) == 5 and not ({normalise(p) for p in kept["prompt"]} & held)


def test_template_refusals_are_stable_and_from_the_set() -> None:
    templates = refusal_resources()["templates"]
    a = template_refusal("how do I do a bad thing", templates)
    assert a == template_refusal("how do I do a bad thing", templates) and a in templates
    chosen = {template_refusal(f"prompt {i}", templates) for i in range(200)}
    assert len(chosen) > len(templates) // 2  # spread over the set, not one fixed answer


def test_build_crl_data_generates_once_and_keeps_eval_out(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from crl_ray.data.assets import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    calls = []

    def load_generator():
        calls.append(1)
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(cfg).eval(), tokenizer

    # a harmful file holding 4 AdvBench goals and 2 of the evaluation behaviours (in other case/spacing)
    eval_two = load_source(DataSource(source="harmbench_test", limit=2))["prompt"]
    goals = load_source(DataSource(source="advbench", limit=4))["prompt"]
    harmful_file = tmp_path / "harmful.jsonl"
    harmful_file.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                      goals[:2] + [eval_two[0].upper(), "  " + eval_two[1] + " "] + goals[2:]))
    cfg, _ = load_config(ROOT / "sweeps" / "smoke.yaml", [
        "data.benign=[{source: benign_prompts, answer: generate, limit: 4}, "
        "{source: advbench, answer: refusal_template, limit: 3}]",
        f"data.harmful=[{{source: {harmful_file}, answer: generate}}]",
        "data.retain=[{source: benign_prompts, answer: generate, limit: 2}]",
        "data.generation.max_new_tokens=4", "eval.behaviors={source: harmbench_test, limit: 2}",
    ])
    data = build_crl_data(cfg, tokenizer, load_generator=load_generator, cache_dir=tmp_path)
    assert len(calls) == 1  # one load for all generated sources
    assert (len(data.benign), len(data.harmful), len(data.retain)) == (7, 4, 2)  # 2 eval behaviours dropped
    t = cfg.data.max_request_tokens + cfg.data.max_response_tokens
    for ds in (data.benign, data.harmful, data.retain):
        batch = ds[:]
        assert batch["input_ids"].shape == (len(ds), t)
        assert batch["response_mask"].sum(1).min() >= 1 and batch["request_mask"].sum(1).min() >= 1
    eval_prompts = set(eval_two)
    harmful_text = [tokenizer.decode(ids[m.bool()]) for ids, m in
                    zip(data.harmful[:]["input_ids"], data.harmful[:]["request_mask"])]
    assert not any(p in text for p in eval_prompts for text in harmful_text)
    # provenance says how each answer was made
    answers = {r["path"]: r["answer"] for r in data.provenance}
    assert answers == {"data.benign[0]": "generate", "data.benign[1]": "refusal_template",
                       "data.harmful[0]": "generate", "data.retain[0]": "generate"}
    assert data.stats()["benign"]["rows"] == 7
    # a second build is served from the cache: the generator is not loaded again
    again = build_crl_data(cfg, tokenizer, load_generator=load_generator, cache_dir=tmp_path)
    assert len(calls) == 1
    assert torch.equal(again.harmful[:]["input_ids"], data.harmful[:]["input_ids"])


def test_every_embedded_source_is_listed_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python -m crl_ray.data sources" in readme
    assert set(EMBEDDED_SOURCES) >= {"harmbench_val", "advbench", "benign_prompts", "mmlu"}


def test_source_identity_pins_file_contents(tmp_path: Path) -> None:
    import hashlib

    from crl_ray.data import embedded_file, source_identity

    local = tmp_path / "rows.jsonl"
    local.write_text('{"prompt": "p", "response": "r"}\n')
    assert source_identity(DataSource(source=str(local))) == {
        "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
    embedded = source_identity(DataSource(source="advbench"))
    assert embedded["sha256"] == hashlib.sha256(embedded_file("advbench").read_bytes()).hexdigest()
    assert embedded["asset"]


def test_source_identity_of_a_hub_dataset_says_when_it_could_not_resolve(monkeypatch) -> None:
    import huggingface_hub

    from crl_ray.data import source_identity

    class Info:
        sha = "c0ffee"

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo, revision=None: Info())
    assert source_identity(DataSource(source="org/set", revision="v1")) == {"revision": "v1",
                                                                            "resolved_revision": "c0ffee"}

    def offline(self, repo, revision=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", offline)
    assert source_identity(DataSource(source="org/set")) == {"revision": None, "resolved_revision": None}


def test_generator_identity_has_one_owner(monkeypatch) -> None:
    """The answer cache key and the loader take the generator's (model, revision) from the same place: a separate
    generator model is loaded at its own default revision, never at the defended model's."""
    from crl_ray import data as data_mod
    from crl_ray.config import GenerationConfig, ModelConfig

    base = ModelConfig(name="org/base", revision="abc123")
    assert GenerationConfig().generator(base) == ("org/base", "abc123")
    assert GenerationConfig(model="org/writer").generator(base) == ("org/writer", None)

    cfg, _ = load_config(ROOT / "sweeps" / "smoke.yaml", ["model.revision=abc123", "data.generation.model=org/writer"])
    loaded = []
    monkeypatch.setattr(data_mod, "load_model_and_tokenizer",
                        lambda name, revision=None, dtype="float32": loaded.append((name, revision, dtype)) or (
                            torch.nn.Linear(1, 1), None))
    data_mod.generator_loader(cfg)()
    assert loaded == [("org/writer", None, cfg.model.dtype)]
