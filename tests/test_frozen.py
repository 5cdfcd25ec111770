"""train.frozen_cache: the frozen model's outputs computed once and reused give the same step as the inline frozen
passes (every layout, with mining), the keyed node cache hits and misses when it should, and bad uses fail clearly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_train import build_worker, lora_model, make_cfg, ray_cluster, tiny_model_dir  # noqa: F401 (fixtures)
from torch.testing import assert_close

from crl_ray.config import parse_config
from crl_ray.training.frozen import (
    FROZEN_FILE,
    FrozenOutputs,
    FrozenSpec,
    cached_frozen,
    compute_frozen,
    frozen_key,
)
from crl_ray.training.model import enable_activation_checkpointing
from crl_ray.training.reference import synthetic_batch
from crl_ray.training.step import StepComputer
from crl_ray.validate import semantic_problems

LOSS = {"benign_mask": "response_first_k", "first_k": 3, "harmful_mask": "request_response", "target_layers": [1, 3]}


def _batches(seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [synthetic_batch(300, 3, 10, 8, gen) for _ in range(3)]


def _step(computer, batches):
    model = computer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    value, metrics = computer(*batches, micro_step=0, optimizer_step=0)
    value.backward()
    grads = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    return value.detach(), metrics, grads


@pytest.mark.parametrize("layout", [
    {"unpad": True, "checkpointing": "selective", "benign_layers": "all"},   # one shared full-depth pass
    {"unpad": True, "checkpointing": "off", "benign_layers": "target"},      # truncated pass + separate KL
    {"unpad": False, "checkpointing": "off", "benign_layers": "all"},        # padded rows (GPU layout)
])
def test_cached_h0_gives_the_same_loss_and_gradients(tiny_model_dir, layout):  # noqa: F811
    cfg = make_cfg(tiny_model_dir, loss={**LOSS, "benign_layers": layout["benign_layers"]})
    model, plan = lora_model(cfg)
    enable_activation_checkpointing(model, layout["checkpointing"])
    batches = _batches(3)
    # the batches are rows 0..2 of a data set of 5 rows whose other rows are different
    extra = _batches(4)
    data = {name: {k: torch.cat([b[k], e[k][:2]]) for k, v in b.items()}
            for name, b, e in zip(("benign", "harmful", "retain"), batches, extra)}
    frozen = compute_frozen(model, data, FrozenSpec.of(cfg, plan))
    order = torch.tensor([2, 0, 1])  # any row order
    picked = [{**{k: v[order] for k, v in b.items()}, "row": order} for b in batches]

    inline = _step(StepComputer(cfg, model, plan, unpad=layout["unpad"]), picked)
    computer = StepComputer(cfg, model, plan, unpad=layout["unpad"], frozen=frozen)
    calls = []
    computer._frozen = lambda *a, **k: calls.append(a)  # no frozen pass may run
    cached = _step(computer, picked)
    assert not calls
    assert_close(cached[0], inline[0], rtol=1e-5, atol=1e-5)
    for key in ("train/loss_b", "train/loss_h", "train/loss_kl"):
        assert math.isclose(cached[1][key], inline[1][key], rel_tol=1e-4, abs_tol=1e-5), key
    for g, ng in zip(cached[2], inline[2]):
        assert_close(g, ng, rtol=1e-3, atol=1e-5)


def test_frozen_head_under_bf16_autocast_is_cast_once_with_the_same_logits(tiny_model_dir):  # noqa: F811
    """Under bf16 autocast the frozen retain logits use a bf16 copy of the head made once, not a cast per step: the
    same bits as autocast's own cast; without autocast the float32 head, as before."""
    from crl_ray.training.frozen import output_head

    cfg = make_cfg(tiny_model_dir, loss=LOSS)
    model, plan = lora_model(cfg)
    batches = _batches(5)
    frozen = compute_frozen(model, dict(zip(("benign", "harmful", "retain"), batches)), FrozenSpec.of(cfg, plan))
    rows = torch.tensor([1, 0])
    final = frozen.gather("retain", rows, frozen.spec.final_layer + 1)[frozen.spec.final_layer]
    head = output_head(model).weight.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = frozen.retain_logits(rows, model)
        copy = frozen._head_low
        again = frozen.retain_logits(rows, model)
        expected = torch.nn.functional.linear(final, head)  # autocast casts the float32 head itself
    assert copy is not None and copy.dtype == torch.bfloat16 and frozen._head_low is copy  # cast once, kept
    assert first.dtype == torch.bfloat16 and torch.equal(first, expected) and torch.equal(again, expected)
    plain = frozen.retain_logits(rows, model)
    assert plain.dtype == torch.float32 and torch.equal(plain, torch.nn.functional.linear(final, head))


def test_stale_rows_and_other_kinds_are_refused(tiny_model_dir):  # noqa: F811
    cfg = make_cfg(tiny_model_dir, loss=LOSS)
    model, plan = lora_model(cfg)
    batches = _batches(3)
    other = make_cfg(tiny_model_dir, loss={**LOSS, "harmful_mask": "response_all"})  # other positions stored
    frozen = compute_frozen(model, dict(zip(("benign", "harmful", "retain"), batches)), FrozenSpec.of(other, plan))
    rows = [{**b, "row": torch.arange(3)} for b in batches]
    with pytest.raises(RuntimeError, match="does not belong"):
        StepComputer(cfg, model, plan, frozen=frozen)(*rows, micro_step=0, optimizer_step=0)
    with pytest.raises(IndexError, match="holds 3 rows"):
        frozen.gather("benign", torch.tensor([5]), 5)
    cb = make_cfg(tiny_model_dir, loss={"kind": "circuit_breakers"}, train={"frozen_cache": True})
    problems = [p for p in semantic_problems(cb, None) if p.path == "train.frozen_cache"]
    assert len(problems) == 1 and "loss.kind: crl" in problems[0].fix
    assert not [p for p in semantic_problems(make_cfg(tiny_model_dir, train={"frozen_cache": True}), None)
                if p.path == "train.frozen_cache"]
    # auto: on for crl, off (and no error) for the other kinds, so a CRL file can be swapped to another kind
    auto_cb = make_cfg(tiny_model_dir, loss={"kind": "circuit_breakers"}, train={"frozen_cache": "auto"})
    assert not auto_cb.frozen_cache and not [p for p in semantic_problems(auto_cb, None)
                                             if p.path == "train.frozen_cache"]
    assert make_cfg(tiny_model_dir, train={"frozen_cache": "auto"}).frozen_cache
    assert not make_cfg(tiny_model_dir, train={"frozen_cache": False}).frozen_cache
    with pytest.raises(ValueError, match="loss.kind crl"):
        cb_model, cb_plan = lora_model(cb)
        StepComputer(cb, cb_model, cb_plan, frozen=frozen)


def test_a_model_whose_logits_are_not_its_head_is_refused(tiny_model_dir):  # noqa: F811
    cfg = make_cfg(tiny_model_dir, loss=LOSS)
    model, plan = lora_model(cfg)
    base = model.get_base_model()
    base.config.final_logit_softcapping = None
    original = base.forward

    def capped(*args, **kwargs):  # a logit transform after the head (as Gemma's soft-capping)
        out = original(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    base.forward = capped
    with pytest.raises(ValueError, match="frozen_cache: false"):
        compute_frozen(model, dict(zip(("benign", "harmful", "retain"), _batches(3))), FrozenSpec.of(cfg, plan))


def test_keyed_cache_hits_for_the_same_rows_and_misses_on_any_change(tiny_model_dir, tmp_path, caplog,  # noqa: F811
                                                                      monkeypatch):
    import crl_ray.data

    cfg = make_cfg(tiny_model_dir, loss=LOSS)
    data = dict(zip(("benign", "harmful", "retain"), _batches(3)))
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="crl_ray.training.frozen"):
        key = cached_frozen(cfg, data, tmp_path / "a.pt", cache)

        def no_model(*args, **kwargs):
            raise AssertionError("a cache hit must not load the model")

        monkeypatch.setattr(crl_ray.data, "load_model_and_tokenizer", no_model)
        again = cached_frozen(cfg, data, tmp_path / "b.pt", cache)
    assert key == again and "cache miss" in caplog.text and "cache hit" in caplog.text
    a, b = FrozenOutputs.load(tmp_path / "a.pt"), FrozenOutputs.load(tmp_path / "b.pt")
    assert a.key == key and all(torch.equal(a.groups["benign"]["layers"][i], b.groups["benign"]["layers"][i])
                                for i in a.groups["benign"]["layers"])
    spec = a.spec
    changed = {**data, "harmful": {**data["harmful"], "input_ids": data["harmful"]["input_ids"].flip(0)}}
    assert frozen_key(cfg, spec, changed) != key
    layers = FrozenSpec(**{**spec.__dict__, "harmful_layers": (1, 2)})
    assert frozen_key(cfg, layers, data) != key
    other_model = parse_config({**cfg.model_dump(mode="json"), "model": {"name": str(tiny_model_dir),
                                                                          "dtype": "bfloat16"}})
    assert frozen_key(other_model, spec, data) != key


def test_worker_with_frozen_cache_trains_like_the_inline_worker(tiny_model_dir, tmp_path):  # noqa: F811
    runs = {}
    for flag in (False, True):
        cfg = make_cfg(tiny_model_dir, loss=LOSS, train={"frozen_cache": flag})
        worker = build_worker(cfg, tmp_path / str(flag))
        assert (Path(worker.data_dir) / FROZEN_FILE).is_file() == flag
        assert (worker.frozen is not None) == flag
        runs[flag] = [worker.train_step() for _ in range(3)]
    for a, b in zip(runs[False], runs[True]):
        for key in ("train/loss", "train/loss_b", "train/loss_h", "train/loss_kl", "train/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), key


@pytest.mark.parametrize("kind", ["latent", "embedding"])
def test_worker_with_mining_and_frozen_cache_matches_inline(tiny_model_dir, tmp_path, kind):  # noqa: F811
    mining = {"enabled": True, "kind": kind, "period": 3, "init_iterations": 4, "refresh_iterations": 1,
              "patience": 2, "use_prob": 1.0, "gate": 1000.0, "block_high": 2, "soft_prompt_tokens": 3}
    runs = {}
    for flag in (False, True):
        worker = build_worker(make_cfg(tiny_model_dir, mining=mining, train={"frozen_cache": flag}),
                              tmp_path / str(flag))
        runs[flag] = [worker.train_step() for _ in range(2)]
    for a, b in zip(runs[False], runs[True]):
        assert a["mining/used"] == b["mining/used"] == 1.0
        for key in ("train/loss", "train/grad_norm", "mining/attack_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-5), key


@pytest.mark.slow
def test_two_fsdp_workers_with_frozen_cache_match_inline(tiny_model_dir, tmp_path, ray_cluster):  # noqa: F811
    """FSDP2 shards the LM head the cached retain logits need: 2 gloo workers x batch 1 with the cache = 1 process x
    batch 2 with inline frozen passes (one Ray Train run: worker-group start-up is most of this test's time)."""
    from crl_ray.training.train import run_training

    train = {"steps": 2, "grad_accum": 1, "checkpoint_every": 2}
    local = run_training(make_cfg(tiny_model_dir, loss=LOSS, train={**train, "micro_batch_size": 2}),
                         run_name="local", storage_path=tmp_path)
    cached = make_cfg(tiny_model_dir, loss=LOSS, train={**train, "micro_batch_size": 1, "frozen_cache": True},
                      resources={"num_workers": 2, "cpus_per_worker": 1})
    dist = run_training(cached, run_name="fsdp", storage_path=tmp_path)
    assert (dist.data_provenance.parent / FROZEN_FILE).is_file()
    assert not (local.data_provenance.parent / FROZEN_FILE).exists()
    for key in ("train/loss", "train/loss_kl", "train/grad_norm"):
        assert math.isclose(dist.metrics[key], local.metrics[key], rel_tol=1e-4, abs_tol=1e-5), key
