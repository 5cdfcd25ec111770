"""The training job: the efficient step equals the reference step, the worker loop, checkpoints, resume, export.

Fast tests use a tiny random Llama saved to a temporary folder and Ray Train's local mode (num_workers=0);
tests marked slow start real Ray workers (FSDP2 on gloo) or load the embedded SmolLM2 model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers_tiny import tiny_llama, tiny_tokenizer
from torch.testing import assert_close

from crl_ray.config import parse_config
from crl_ray.errors import UserError
from crl_ray.training.model import (
    apply_lora,
    enable_activation_checkpointing,
    forward_hidden,
    lora_blocks,
    num_blocks,
    segments,
    use_packed_attention,
)
from crl_ray.training.reference import naive_step, synthetic_batch
from crl_ray.training.step import LossPlan, StepComputer
from crl_ray.training.train import (
    ADAPTER_DIR,
    DATA_MARKER,
    Worker,
    data_key,
    micro_batch,
    prepare_data,
    run_training,
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    tok = tiny_tokenizer()
    tiny_llama(tok, layers=4).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_cfg(model_dir: Path, **sections):
    """A small sweep config on the tiny model: 8 rows per set, 32 + 16 tokens, 4 steps."""
    cfg = {
        "name": "t", "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"kind": "crl", "margin_benign": 2.0, "margin_harmful": 3.0, "dist_benign_pos": "l2",
                 "dist_benign_neg": "cosine", "dist_harmful_pos": "cosine", "dist_harmful_neg": "cosine"},
        "data": {"benign": [{"source": "benign_prompts", "answer": "refusal_template", "limit": 8}],
                 "harmful": [{"source": "advbench", "answer": "refusal_template", "limit": 8}],
                 "retain": [{"source": "benign_prompts", "answer": "refusal_template", "limit": 8}],
                 "max_request_tokens": 32, "max_response_tokens": 16},
        "train": {"steps": 4, "lr": 1e-3, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1,
                  "checkpoint_every": 2},
        "resources": {"num_workers": 0},
        "search": {"algorithm": "none", "num_trials": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return parse_config(cfg)


def lora_model(cfg, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    n = num_blocks(model)
    plan = LossPlan.from_config(cfg, n)
    model = apply_lora(model, cfg, lora_blocks(cfg, n, plan.lora_last_layer))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train(), plan


def assert_same_as_naive(cfg, *, seed: int, project) -> None:
    """The reference's 6 full passes, then ``project(model, plan)``'s step on the same model and batches: the same
    loss, loss terms and gradients."""
    model, plan = lora_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    batches = [synthetic_batch(300, 3, 10, 8, gen) for _ in range(3)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    naive_loss, naive_terms = naive_step(model, cfg, plan, *batches)
    naive_loss.backward()
    naive_grads = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    value, metrics = project(model, plan)(*batches, micro_step=0, optimizer_step=0)
    value.backward()
    assert_close(value, naive_loss, rtol=1e-5, atol=1e-6)
    for key, naive_value in naive_terms.items():
        assert math.isclose(metrics[key], naive_value, rel_tol=1e-5, abs_tol=1e-6), key
    for g, ng in zip((p.grad for p in trainable), naive_grads):
        assert_close(g, ng, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------- the step
def test_forward_hidden_truncated_equals_full_pass(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir)
    model, _ = lora_model(cfg)
    batch = synthetic_batch(300, 2, 8, 6, torch.Generator().manual_seed(0))
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], output_hidden_states=True)
    head = model.get_base_model().get_output_embeddings()
    head_outputs: list[tuple[int, ...]] = []
    hook = head.register_forward_hook(lambda mod, args, out: head_outputs.append(tuple(out.shape)))
    for depth in range(1, 5):
        hidden, logits = forward_hidden(model, batch, depth)
        assert len(hidden) == depth + 1 and logits is None
        for i in range(depth + 1):
            assert_close(hidden[i], full.hidden_states[i])
    assert model.get_base_model().config.num_hidden_layers == 4  # restored after truncation
    assert "forward" not in head.__dict__  # the head's own forward is back after the headless passes
    cols = torch.tensor([3, 7, 13])
    _, logits = forward_hidden(model, batch, 4, logits_positions=cols)
    hook.remove()
    assert_close(logits, full.logits[:, cols])
    # the passes without logits got empty logits from the head (no matmul); the pass with logits the vocabulary
    assert head_outputs == [(2, 1, 0)] * 4 + [(2, 3, head.out_features)]


def test_packed_attention_takes_float32_for_short_rows_under_cpu_autocast(monkeypatch):
    """Under CPU bf16 autocast, a row of up to FLOAT32_ATTENTION_MAX_TOKENS tokens gets float32 attention (the
    bits of float32 SDPA on its inputs), a longer row autocast's bf16; a CPU with AMX keeps bf16 for every row."""
    import torch.nn.functional as F

    import crl_ray.training.model as model_module

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q, k, v = (torch.randn(1, heads, 30, 8, generator=gen) for heads in (4, 2, 2))
    spans = ((0, 10), (10, 30))
    monkeypatch.setattr(model_module, "FLOAT32_ATTENTION_MAX_TOKENS", 12)

    def alone(s, e, low):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            out = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                                 enable_gqa=True)
        return out.transpose(1, 2).float()

    for amx in (False, True):
        monkeypatch.setattr(model_module, "_cpu_has_amx", lambda amx=amx: amx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = model_module._packed_attention(module, q, k, v, None, crl_segments=spans)
        assert out.shape == (1, 30, 4, 8)
        short, long = out[:, :10].float(), out[:, 10:].float()
        assert torch.equal(long, alone(10, 30, low=True))
        assert torch.equal(short, alone(0, 10, low=amx))
        assert not torch.equal(alone(0, 10, low=True), alone(0, 10, low=False))  # the two precisions differ here
    out, _ = model_module._packed_attention(module, q, k, v, None, crl_segments=spans)  # no autocast: float32
    assert out.dtype == torch.float32 and torch.equal(out[:, 10:], alone(10, 30, low=False))


def test_packed_rows_equal_each_row_alone(tiny_model_dir):
    """One packed sequence with per-row attention = a forward on each row's real tokens (hidden states, logits)."""
    from crl_ray.training.step import _packed_batch

    cfg = make_cfg(tiny_model_dir)
    model, _ = lora_model(cfg)
    assert use_packed_attention(model)
    batch = synthetic_batch(300, 3, 8, 6, torch.Generator().manual_seed(2))
    sub, lengths, real = _packed_batch(batch)
    assert sub["input_ids"].shape == (1, int(batch["attention_mask"].sum())) and lengths == real.sum(1).tolist()
    every = torch.arange(sum(lengths))
    hidden, logits = forward_hidden(model, sub, 4, logits_positions=every, segments=segments(lengths))
    start = 0
    for row, n in enumerate(lengths):
        cols = real[row].nonzero().squeeze(-1)
        alone = model(input_ids=batch["input_ids"][row, cols][None], position_ids=batch["position_ids"][row, cols][None],
                      output_hidden_states=True)
        for i in range(5):
            assert_close(hidden[i][:, start:start + n], alone.hidden_states[i], rtol=1e-5, atol=1e-5)
        assert_close(logits[:, start:start + n], alone.logits, rtol=1e-5, atol=1e-5)
        # and the padded batch's states at this row's real tokens
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], output_hidden_states=True)
        assert_close(hidden[2][0, start:start + n], padded.hidden_states[2][row, cols], rtol=1e-5, atol=1e-5)
        start += n
    assert segments([2, 0, 3]) == ((0, 2), (2, 5))
    # without segments the registered attention is plain sdpa: a padded batch gives what it gave before
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"])
    assert_close(plain.logits, padded.logits)


def test_unpad_needs_sdpa_attention(tiny_model_dir):
    cfg = make_cfg(tiny_model_dir)
    model, plan = lora_model(cfg)
    model.get_base_model().config._attn_implementation = "eager"
    assert StepComputer(cfg, model, plan).unpad is False  # auto falls back to padded passes
    with pytest.raises(ValueError, match="train.unpad"):
        StepComputer(cfg, model, plan, unpad=True)


@pytest.mark.parametrize("layout", [
    {"unpad": False, "checkpointing": "off", "every": 1},
    {"unpad": True, "checkpointing": "off", "every": 1},
    {"unpad": True, "checkpointing": "selective", "every": 1},
    {"unpad": True, "checkpointing": "full", "every": 2},
    {"unpad": False, "checkpointing": "selective", "every": 1},
    {"unpad": True, "checkpointing": "selective", "every": 1, "benign_layers": "target"},  # passes stop at block 3
])
def test_step_layouts_give_the_same_loss_and_gradients(tiny_model_dir, layout):
    """Packed rows and activation checkpointing change the work, not the loss or its gradients."""
    cfg = make_cfg(tiny_model_dir, loss={"benign_mask": "response_first_k", "first_k": 3,
                                         "harmful_mask": "request_response", "target_layers": [1, 3],
                                         "benign_layers": layout.get("benign_layers", "all")})

    def project(model, plan):
        enable_activation_checkpointing(model, layout["checkpointing"], layout["every"])
        computer = StepComputer(cfg, model, plan, unpad=layout["unpad"])
        assert computer.unpad is layout["unpad"]
        return computer

    assert_same_as_naive(cfg, seed=9, project=project)


@pytest.mark.parametrize("loss", [
    {},  # script distances, benign layers all
    {"dist_benign_pos": "mix", "dist_benign_neg": "mix", "dist_harmful_pos": "mix", "dist_harmful_neg": "mix",
     "margin_benign": 500.0, "margin_harmful": 1500.0, "benign_layers": "target"},
    {"benign_mask": "response_first_k", "first_k": 3, "harmful_mask": "request_response",
     "target_layers": [1, 2], "benign_layers": [0, 3]},
])
def test_project_step_equals_naive_reference_step(tiny_model_dir, loss):
    """Same loss value and same gradients as the reference's 6 full passes (truncation and shared passes are exact)."""
    cfg = make_cfg(tiny_model_dir, loss=loss)
    assert_same_as_naive(cfg, seed=5, project=lambda model, plan: StepComputer(cfg, model, plan))


def test_micro_batch_global_order_is_split_across_ranks():
    """Rank r of W with batch B takes the r-th slice of the same global batch that 1 worker with W*B takes."""
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(10))}).with_format("torch")
    one = micro_batch(ds, 3, rank=0, world_size=1, micro_batch_size=4, seed=1)["x"].tolist()
    two = [micro_batch(ds, 3, rank=r, world_size=2, micro_batch_size=2, seed=1)["x"].tolist() for r in (0, 1)]
    assert two[0] + two[1] == one
    epoch0 = [micro_batch(ds, k, rank=0, world_size=1, micro_batch_size=5, seed=1)["x"].tolist() for k in (0, 1)]
    assert sorted(epoch0[0] + epoch0[1]) == list(range(10))  # one epoch = a permutation


# --------------------------------------------------------------------------------------------- the worker
def build_worker(cfg, tmp_path: Path, until_step: int | None = None) -> Worker:
    data_dir = prepare_data(cfg, tmp_path / "data")
    return Worker(cfg, until_step=until_step or cfg.train.steps, data_dir=data_dir, local_dir=tmp_path / "run")


def test_worker_moves_lora_and_keeps_base_weights(tiny_model_dir, tmp_path):
    worker = build_worker(make_cfg(tiny_model_dir), tmp_path)
    before = {k: v.detach().clone() for k, v in worker.model.named_parameters()}
    metrics = [worker.train_step() for _ in range(2)]
    after = dict(worker.model.named_parameters())
    trainable = {name for name, _ in worker.trainable}
    assert trainable and all("lora_" in name for name in trainable)
    for name, value in before.items():
        moved = not torch.equal(value, after[name].detach())
        assert moved == (name in trainable), name
    assert all(math.isfinite(m["train/loss"]) for m in metrics)
    expected = {"train/loss", "train/loss_b", "train/loss_h", "train/loss_kl", "dist/benign_pos", "dist/benign_neg",
                "dist/harmful_pos", "dist/harmful_neg", "train/lr", "train/tokens_per_s", "train/grad_norm",
                "train/active_benign", "train/active_harmful"}
    assert expected <= set(metrics[-1])
    assert all(0.0 <= m[k] <= 1.0 for m in metrics for k in ("train/active_benign", "train/active_harmful"))
    assert metrics[-1]["step"] == 2.0


def test_bf16_autocast_trains_close_to_fp32(tiny_model_dir, tmp_path):
    """train.precision bf16: the same steps as fp32 within bf16's rounding, and only LoRA weights move (fp32)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        worker = build_worker(make_cfg(tiny_model_dir, train={"precision": precision}), tmp_path / precision)
        runs[precision] = ([worker.train_step()["train/loss"] for _ in range(3)], worker)
    (fp32, _), (bf16, worker) = runs["fp32"], runs["bf16"]
    assert fp32 != bf16  # the autocast did run
    for a, b in zip(fp32, bf16):
        assert math.isclose(a, b, rel_tol=2e-2), (fp32, bf16)
    assert all(p.dtype == torch.float32 for _, p in worker.trainable)


def test_bf16_step_skips_peft_input_cast_with_the_same_result(tiny_model_dir, tmp_path, monkeypatch):
    """Under bf16 autocast the step turns off peft's cast of LoRA inputs to the float32 LoRA weights (forward and
    backward): autocast casts them to bf16 anyway, so the step is bit-identical to one with the cast, and the
    flag is back on afterwards."""
    import contextlib

    import peft.helpers
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = make_cfg(tiny_model_dir, train={"precision": "bf16"})
    worker = build_worker(cfg, tmp_path / "off")
    layers = [m for m in worker.model.modules() if isinstance(m, BaseTunerLayer)]
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.cast_input_dtype_enabled)) for m in layers]
    off = [worker.train_step()["train/loss"] for _ in range(2)]
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # every LoRA call of the step ran without peft's cast
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored
    monkeypatch.setattr(peft.helpers, "disable_input_dtype_casting",
                        lambda model, active=True: contextlib.nullcontext())
    with_cast = build_worker(cfg, tmp_path / "on")
    on = [with_cast.train_step()["train/loss"] for _ in range(2)]
    assert off == on
    for (name, a), (_, b) in zip(worker.trainable, with_cast.trainable):
        assert torch.equal(a, b), name


def test_bf16_worker_stores_frozen_block_weights_in_bf16_with_the_same_steps(tiny_model_dir, tmp_path, monkeypatch):
    """An unsharded bf16 worker keeps its frozen block linears in bf16 (the casts autocast made at every step, made
    once): the same losses and LoRA weights to the bit as a worker that keeps them float32; LoRA weights, norms,
    the embedding and the head stay float32; an fp32 worker changes nothing."""
    import crl_ray.training.model as model_module
    from crl_ray.training.model import decoder_layers

    fp32 = build_worker(make_cfg(tiny_model_dir), tmp_path / "fp32")
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())
    cfg = make_cfg(tiny_model_dir, train={"precision": "bf16"})
    worker = build_worker(cfg, tmp_path / "cast")
    linears = [m for layer in decoder_layers(worker.model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    frozen = [m for m in linears if not m.weight.requires_grad]
    assert len(frozen) == 4 * 7 and len(linears) > len(frozen)  # every block's 7 projections; the LoRA A/B too
    assert all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert all(p.dtype == torch.float32 for _, p in worker.trainable)
    assert all(p.dtype == torch.float32 for n, p in worker.model.named_parameters() if "norm" in n or "embed" in n)
    assert worker.model.get_base_model().get_output_embeddings().weight.dtype == torch.float32
    cast = [worker.train_step()["train/loss"] for _ in range(2)]
    monkeypatch.setattr(model_module, "cast_frozen_linears", lambda model, dtype: 0)
    kept = build_worker(cfg, tmp_path / "kept")
    assert all(p.dtype == torch.float32 for p in kept.model.parameters())
    assert [kept.train_step()["train/loss"] for _ in range(2)] == cast
    for (name, a), (_, b) in zip(worker.trainable, kept.trainable):
        assert torch.equal(a, b), name


def test_lora_blocks_follow_config(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, loss={"target_layers": [1, 2], "benign_layers": "target"})
    assert lora_blocks(cfg, 4, LossPlan.from_config(cfg, 4).lora_last_layer) == [0, 1, 2]
    cfg = make_cfg(tiny_model_dir, lora={"r": 4, "alpha": 8, "dropout": 0.0, "blocks": [3]})
    model, _ = lora_model(cfg)
    layers_with_lora = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert layers_with_lora == {3}


def test_exported_adapter_reloads_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    worker = build_worker(make_cfg(tiny_model_dir), tmp_path)
    for _ in range(2):
        worker.train_step()
    worker.export_adapter(tmp_path / ADAPTER_DIR)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / ADAPTER_DIR)
    batch = synthetic_batch(300, 2, 8, 6, torch.Generator().manual_seed(0))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    worker.model.eval()
    with torch.no_grad():
        ours = worker.model(**inputs).logits
        theirs = reloaded.eval()(**inputs).logits
        with reloaded.disable_adapter():
            base = reloaded(**inputs).logits
    assert_close(theirs, ours)
    assert (theirs - base).abs().max() > 1e-4  # the adapter does something


def test_resume_continues_at_the_same_step_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = make_cfg(tiny_model_dir)
    first = run_training(cfg, run_name="r", storage_path=tmp_path / "a", until_step=2)
    assert first.step == 2 and first.checkpoint_dir.name == "checkpoint_step000002"
    resumed = run_training(cfg, run_name="r", storage_path=tmp_path / "a")
    straight = run_training(cfg, run_name="r", storage_path=tmp_path / "b")
    assert resumed.step == straight.step == 4
    a = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    b = load_file(straight.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert math.isclose(resumed.metrics["train/loss"], straight.metrics["train/loss"], rel_tol=1e-5)
    again = run_training(cfg, run_name="r", storage_path=tmp_path / "a")  # finished: nothing to redo
    assert again.step == 4 and again.checkpoint_dir == resumed.checkpoint_dir


def test_data_key_changes_with_what_the_prepared_data_hold(tiny_model_dir):
    base = data_key(make_cfg(tiny_model_dir))
    # what a sweep searches besides the data: one preparation for all its trials
    assert base == data_key(make_cfg(tiny_model_dir, train={"lr": 3e-3, "steps": 8},
                                     loss={"margin_harmful": 9.0, "beta": 0.1}, lora={"r": 8, "alpha": 8}))
    changed = [make_cfg(tiny_model_dir, data={"max_response_tokens": 12}),
               make_cfg(tiny_model_dir, data={"seed": 7}),
               make_cfg(tiny_model_dir, model={"name": str(tiny_model_dir), "dtype": "bfloat16"}),
               make_cfg(tiny_model_dir, eval={"behaviors": {"source": "harmbench_test"}}),
               make_cfg(tiny_model_dir, train={"frozen_cache": True})]
    keys = [data_key(c) for c in changed]
    assert base not in keys and len(set(keys)) == len(keys)
    # with the frozen cache on, the layers it stores are part of the data; without it they are not
    cached = {"frozen_cache": True}
    assert (data_key(make_cfg(tiny_model_dir, train=cached, loss={"target_layers": [1, 2]}))
            != data_key(make_cfg(tiny_model_dir, train=cached, loss={"target_layers": [2, 3]})))
    assert (data_key(make_cfg(tiny_model_dir, loss={"target_layers": [1, 2]}))
            == data_key(make_cfg(tiny_model_dir, loss={"target_layers": [2, 3]})))


def test_runs_of_one_storage_prepare_their_data_once(tiny_model_dir, tmp_path, monkeypatch):
    import crl_ray.training.train as train

    calls = []
    real = train.prepare_data
    monkeypatch.setattr(train, "prepare_data", lambda cfg, out: calls.append(out) or real(cfg, out))
    first = run_training(make_cfg(tiny_model_dir, train={"steps": 1}), run_name="a", storage_path=tmp_path)
    second = run_training(make_cfg(tiny_model_dir, train={"steps": 1, "lr": 5e-3}, loss={"margin_harmful": 4.0}),
                          run_name="b", storage_path=tmp_path)
    assert len(calls) == 1 and first.data_provenance == second.data_provenance
    folder = first.data_provenance.parent
    assert (folder.parent / DATA_MARKER).read_text() == folder.name and first.data_provenance.is_file()
    other = run_training(make_cfg(tiny_model_dir, train={"steps": 1}, data={"seed": 3}), run_name="c",
                         storage_path=tmp_path)
    assert len(calls) == 2 and other.data_provenance.parent.parent != folder.parent
    # a marker naming a copy that is not there (deleted by hand) is not trusted: the data are prepared again
    (folder.parent / DATA_MARKER).write_text("gone")
    again = run_training(make_cfg(tiny_model_dir, train={"steps": 1}), run_name="d", storage_path=tmp_path)
    assert len(calls) == 3 and again.data_provenance.is_file() and first.data_provenance.is_file()


def test_sweep_prepares_the_trials_data_once_unless_the_space_changes_it(tiny_model_dir, tmp_path, monkeypatch):
    """crl_ray.sweep.run.prepare_training_data: a space over lr and a margin leaves the data alone, so it is prepared
    before the trials, where a trial's run_training finds it (no second preparation); a space over a data key
    (each value its own data) or over the loss layers with the frozen cache on leaves it to the trials."""
    import crl_ray.training.train as train
    from crl_ray.sweep.run import prepare_training_data

    calls = []
    real = train.prepare_data
    monkeypatch.setattr(train, "prepare_data", lambda cfg, out: calls.append(out) or real(cfg, out))
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "loss.margin_harmful": {"type": "float", "low": 1.0, "high": 5.0}}
    cfg = make_cfg(tiny_model_dir, train={"steps": 1}, search={"algorithm": "tpe", "num_trials": 2, "space": space})
    prepare_training_data(cfg, str(tmp_path / "a"))
    assert len(calls) == 1 and Path(calls[0]).parent.parent == tmp_path / "a" / "train"
    trial = run_training(make_cfg(tiny_model_dir, train={"steps": 1, "lr": 5e-3}, loss={"margin_harmful": 4.0}),
                         run_name="t", storage_path=tmp_path / "a" / "train")
    assert len(calls) == 1 and trial.data_provenance.parent == Path(calls[0])
    for sections in ({"data": {**cfg.data.model_dump(mode="json"), "max_response_tokens": 16},
                      "search": {"algorithm": "tpe", "num_trials": 2, "space": {
                          "data.max_response_tokens": {"type": "int", "low": 8, "high": 16}}}},
                     {"train": {"steps": 1, "frozen_cache": True}, "loss": {"target_layers": [1, 2]},
                      "search": {"algorithm": "tpe", "num_trials": 2, "space": {
                          "loss.target_layers": {"type": "categorical", "choices": [[1, 2], [2, 3]]}}}}):
        prepare_training_data(make_cfg(tiny_model_dir, **sections), str(tmp_path / "b"))
        assert len(calls) == 1 and not (tmp_path / "b").exists()

    class Wrapped(Exception):  # like Ray's RayTaskError: the task's own exception as ``cause``
        cause = UserError("data.harmful[0].source: no such file")

    def fail(*args, **kwargs):
        raise Wrapped()

    monkeypatch.setattr(train, "shared_data", fail)
    with pytest.raises(UserError, match="no such file"):
        prepare_training_data(cfg, str(tmp_path / "c"))


def test_schedule_and_weight_decay_change_training(tiny_model_dir, tmp_path):
    base = build_worker(make_cfg(tiny_model_dir), tmp_path / "a")
    lrs = [base.train_step()["train/lr"] for _ in range(2)]
    assert lrs == [1e-3, 1e-3]
    linear = build_worker(make_cfg(tiny_model_dir, train={"lr_schedule": "linear", "warmup_steps": 2}), tmp_path / "b")
    lrs = [linear.train_step()["train/lr"] for _ in range(3)]
    assert lrs[0] == 0.0 and math.isclose(lrs[1], 5e-4) and math.isclose(lrs[2], 1e-3)


def test_nan_loss_stops_training_with_a_reason(tiny_model_dir, tmp_path, monkeypatch):
    worker = build_worker(make_cfg(tiny_model_dir), tmp_path)
    original = worker.computer.__call__

    def poisoned(*args, **kwargs):
        value, metrics = original(*args, **kwargs)
        metrics["train/loss"] = float("nan")
        return value, metrics

    monkeypatch.setattr(worker, "computer", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        worker.train_step()


def test_run_training_fails_once_on_a_non_finite_loss(tiny_model_dir, tmp_path):
    """lr 1e30 makes the loss non-finite within a few steps: run_training raises with the reason, no retries."""
    cfg = make_cfg(tiny_model_dir, train={"steps": 4, "lr": 1e30, "max_grad_norm": None, "checkpoint_every": 100},
                   resources={"num_workers": 0, "max_failures": 3})
    with pytest.raises(FloatingPointError, match="non-finite loss at optimizer step"):
        run_training(cfg, run_name="nan", storage_path=tmp_path)
    assert not list((tmp_path / "nan").glob("checkpoint_step*"))


@pytest.mark.parametrize("kind, terms", [
    ("circuit_breakers", {"train/loss_retain", "train/loss_cb", "train/coef_retain", "train/coef_cb"}),
    ("repbend", {"train/loss_safe", "train/loss_unsafe", "train/loss_cluster", "train/loss_kl"}),
])
def test_baseline_loss_kinds_train(tiny_model_dir, tmp_path, kind, terms):
    loss = {"kind": kind, kind: ({"alpha": 10.0, "layers": [1, 3]} if kind == "circuit_breakers"
                                  else {"unsafe_layers": [2, 3]})}
    worker = build_worker(make_cfg(tiny_model_dir, loss=loss), tmp_path)
    m = [worker.train_step() for _ in range(2)]
    assert terms <= set(m[0]) and all(math.isfinite(x["train/loss"]) for x in m)
    if kind == "circuit_breakers":  # c_r = 10 t/(2*4), c_cb = 10 (1 - t/8) at optimizer step t = 0, 1
        assert (m[0]["train/coef_retain"], m[1]["train/coef_retain"]) == (0.0, 1.25)
        assert (m[0]["train/coef_cb"], m[1]["train/coef_cb"]) == (10.0, 8.75)
        assert m[0]["train/loss_retain"] == 0.0  # LoRA starts as the identity
        assert math.isclose(m[0]["train/loss"], 10.0 * m[0]["train/loss_cb"], rel_tol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the miner's passes meet bf16 frozen block weights
@pytest.mark.parametrize("kind", ["latent", "embedding"])
def test_worker_with_mining_reports_attack_metrics(tiny_model_dir, tmp_path, kind, precision):
    mining = {"enabled": True, "kind": kind, "period": 3, "init_iterations": 4, "refresh_iterations": 1,
              "patience": 2, "use_prob": 1.0, "gate": 1000.0, "block_high": 2, "soft_prompt_tokens": 3}
    worker = build_worker(make_cfg(tiny_model_dir, mining=mining, train={"precision": precision}), tmp_path)
    m = worker.train_step()
    assert m["mining/used"] == 1.0 and math.isfinite(m["mining/attack_loss"])
    assert m["mining/iterations"] == (4 + 1) / 2  # fresh at micro-step 0 (4 iterations), refresh at 1
    assert worker.miner.iterations_total == 5


@pytest.mark.parametrize("kind", ["latent", "embedding"])
def test_mining_steps_are_the_same_with_or_without_checkpointing_and_packing(tiny_model_dir, tmp_path, kind):
    """The miner's hooks perturb the LoRA pass; recomputation in backward and packed passes must not change that."""
    mining = {"enabled": True, "kind": kind, "period": 3, "init_iterations": 4, "refresh_iterations": 1,
              "patience": 2, "use_prob": 1.0, "gate": 1000.0, "block_high": 2, "soft_prompt_tokens": 3}
    runs = []
    for i, train in enumerate([{"activation_checkpointing": "off", "unpad": False},
                               {"activation_checkpointing": "selective", "unpad": True},
                               {"activation_checkpointing": "full", "unpad": True}]):
        worker = build_worker(make_cfg(tiny_model_dir, mining=mining, train=train), tmp_path / str(i))
        runs.append([worker.train_step() for _ in range(2)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert a["mining/used"] == b["mining/used"] == 1.0
            for key in ("train/loss", "train/grad_norm", "mining/attack_loss"):
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_worker_mining_period_counts_micro_steps_and_lora_stops_at_max_target(tiny_model_dir, tmp_path):
    """grad_accum 2, period 3: fresh modules at micro-steps 0, 3, 6, i.e. in optimizer steps 1, 2 and 4 (half of
    each step's two micro-steps), none in step 3. Counted in optimizer steps it would be steps 1 and 4 only.
    LoRA (blocks auto) covers blocks 0..max(S) = 0..2, although the benign layers (all) reach index 4."""
    mining = {"enabled": True, "kind": "latent", "period": 3, "init_iterations": 2, "refresh_iterations": 1,
              "patience": 2, "use_prob": 0.0, "block_high": 1}
    worker = build_worker(make_cfg(tiny_model_dir, mining=mining, loss={"target_layers": [1, 2]}), tmp_path)
    assert worker.blocks == [0, 1, 2]
    layers_with_lora = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in worker.trainable}
    assert layers_with_lora == {0, 1, 2}
    steps = [worker.train_step() for _ in range(4)]
    assert [m["mining/fresh"] for m in steps] == [0.5, 0.5, 0.0, 0.5]
    assert [m["mining/iterations"] for m in steps] == [1.5, 1.5, 1.0, 1.5]  # (2 + 1) / 2 with a fresh module
    assert worker.miner.iterations_total == 3 * 2 + 5 * 1


# --------------------------------------------------------------------------------------------- Ray workers
@pytest.fixture()
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_fsdp_workers_match_one_worker_and_resume(tiny_model_dir, tmp_path, ray_cluster):
    """2 gloo workers x batch 1 = 1 process x batch 2: same first-step loss; a second call resumes at its step."""
    mining = {"enabled": True, "kind": "latent", "period": 4, "init_iterations": 3, "refresh_iterations": 1,
              "patience": 2, "use_prob": 0.5, "gate": 1000.0, "block_high": 2}
    one = make_cfg(tiny_model_dir, train={"steps": 1, "micro_batch_size": 2, "grad_accum": 1})
    two = make_cfg(tiny_model_dir, train={"steps": 1, "micro_batch_size": 1, "grad_accum": 1},
                   resources={"num_workers": 2, "cpus_per_worker": 1})
    local = run_training(one, run_name="one", storage_path=tmp_path)
    dist = run_training(two, run_name="two", storage_path=tmp_path)
    assert math.isclose(dist.metrics["train/loss"], local.metrics["train/loss"], rel_tol=1e-5)
    assert math.isclose(dist.metrics["train/grad_norm"], local.metrics["train/grad_norm"], rel_tol=1e-4)

    mined = make_cfg(tiny_model_dir, mining=mining, train={"steps": 3, "micro_batch_size": 1, "grad_accum": 2,
                                                            "checkpoint_every": 1},
                     resources={"num_workers": 2, "cpus_per_worker": 1})
    part = run_training(mined, run_name="mined", storage_path=tmp_path, until_step=2)
    assert part.step == 2 and "mining/attack_loss" in part.metrics
    rest = run_training(mined, run_name="mined", storage_path=tmp_path)
    assert rest.step == 3 and (rest.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_fsdp_workers_mine_with_embedding_attacks(tiny_model_dir, tmp_path, ray_cluster):
    """Embedding-space mining under FSDP2 on 2 gloo workers, to a final adapter (the embedded model runs the latent
    kind the same way: test_embedded_model_two_workers_paper_loss_and_mining_export_a_working_adapter)."""
    mining = {"enabled": True, "kind": "embedding", "period": 2, "init_iterations": 2, "refresh_iterations": 1,
              "patience": 1, "use_prob": 1.0, "gate": 1000.0, "soft_prompt_tokens": 3}
    cfg = make_cfg(tiny_model_dir, mining=mining, train={"steps": 2, "micro_batch_size": 1, "grad_accum": 2,
                                                         "checkpoint_every": 2},
                   resources={"num_workers": 2, "cpus_per_worker": 1})
    out = run_training(cfg, run_name="mined-embedding", storage_path=tmp_path)
    assert out.step == 2 and out.metrics["mining/used"] == 1.0 and math.isfinite(out.metrics["mining/attack_loss"])
    assert (out.adapter_dir / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_training_pushes_harmful_representations_away(tmp_path):
    """On the embedded model with the paper's loss (mix distances, margins 500/1500) and the smoke sweep's data
    (generated compliant answers as harmful, benign answers and refusals as benign): after a short run, harmful
    target-layer states move away from the original (cosine to h0 falls) far more than benign ones."""
    import torch.nn.functional as F
    import yaml

    from crl_ray.data.assets import is_cached
    from crl_ray.training.model import adapter_disabled

    if not is_cached("smollm2-135m-instruct"):
        pytest.skip("embedded model not fetched (python -m crl_ray.data fetch)")
    smoke = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "smoke.yaml").read_text())
    layers = [18, 22]
    cfg = make_cfg(Path("."), model={"name": "embedded:smollm2-135m-instruct"}, data=smoke["data"],
                   lora={"r": 8, "alpha": 16, "dropout": 0.0},
                   loss={"target_layers": layers, "benign_layers": "target", "margin_benign": 500.0,
                         "margin_harmful": 1500.0, "dist_benign_pos": "mix", "dist_benign_neg": "mix",
                         "dist_harmful_pos": "mix", "dist_harmful_neg": "mix"},
                   train={"steps": 14, "lr": 1e-3, "micro_batch_size": 2, "grad_accum": 1, "checkpoint_every": 100})
    worker = build_worker(cfg, tmp_path)

    def cosines() -> tuple[float, float]:
        out = []
        with torch.no_grad():
            for name in ("harmful", "benign"):
                batch = {k: v for k, v in worker.data[name][:8].items()}
                mask = batch["response_mask"].float()
                h, _ = forward_hidden(worker.model, batch, max(layers))
                with adapter_disabled(worker.model):
                    h0, _ = forward_hidden(worker.model, batch, max(layers))
                cos = sum((F.cosine_similarity(h[l], h0[l], dim=-1) * mask).sum() / mask.sum() for l in layers)
                out.append(float(cos) / len(layers))
        return out[0], out[1]

    worker.model.eval()
    harmful_before, benign_before = cosines()
    worker.model.train()
    for _ in range(cfg.train.steps):
        worker.train_step()
    worker.model.eval()
    harmful_after, benign_after = cosines()
    assert harmful_before > 0.9999 and benign_before > 0.9999  # LoRA starts as the identity
    # measured 2026-11-27 after 12 steps: harmful 0.985, benign 0.9988
    assert harmful_after < 0.995, harmful_after
    assert (1 - benign_after) * 4 < 1 - harmful_after, (benign_after, harmful_after)


def test_complete_checkpoints_needs_every_rank_and_the_state(tmp_path):
    """A restarted worker group resumes from the newest checkpoint that every rank finished persisting."""
    from crl_ray.training.train import COMPLETE_MARKER, STATE_FILE, complete_checkpoints

    def make(step: int, ranks: list[int], state: bool = True) -> Path:
        d = tmp_path / f"checkpoint_step{step:06d}"
        d.mkdir()
        if state:
            (d / STATE_FILE).write_text("{}")
        for r in ranks:
            (d / f"{COMPLETE_MARKER}{r}").write_text("ok")
        return d

    two, ten = make(2, [0, 1]), make(10, [0, 1])
    make(12, [0])               # rank 1 still writing
    make(14, [0, 1], state=False)
    (tmp_path / "checkpoint_stepx").mkdir()
    assert complete_checkpoints(tmp_path, 2) == [two, ten]  # numeric order, incomplete ones left out
    assert complete_checkpoints(tmp_path, 1)[-1].name == "checkpoint_step000012"


@pytest.mark.slow
def test_embedded_model_two_workers_paper_loss_and_mining_export_a_working_adapter(tmp_path, ray_cluster):
    """The issue's check on the real model: 2 FSDP2 workers (gloo), the paper's loss (mix distances, margins
    500/1500, benign layers all) with latent mining on every step; the exported adapter loads with PeftModel on the
    base model and changes its logits (embedding mining on 2 workers: on the tiny model,
    test_two_fsdp_workers_mine_with_embedding_attacks)."""
    from peft import PeftModel

    from crl_ray.data import load_model_and_tokenizer
    from crl_ray.data.assets import is_cached

    if not is_cached("smollm2-135m-instruct"):
        pytest.skip("embedded model not fetched (python -m crl_ray.data fetch)")
    cfg = make_cfg(Path("."), model={"name": "embedded:smollm2-135m-instruct"},
                   lora={"r": 8, "alpha": 16, "dropout": 0.05},
                   loss={"target_layers": {"fraction": [0.625, 0.9375]}, "benign_layers": "all",
                         "margin_benign": 500.0, "margin_harmful": 1500.0, "dist_benign_pos": "mix",
                         "dist_benign_neg": "mix", "dist_harmful_pos": "mix", "dist_harmful_neg": "mix",
                         "alpha": 0.5, "beta": 0.4, "gamma": 0.9},
                   mining={"enabled": True, "kind": "latent", "period": 2, "init_iterations": 2,
                           "refresh_iterations": 1, "patience": 1, "use_prob": 1.0, "gate": 1000.0, "block_high": 4},
                   train={"steps": 2, "lr": 1e-3, "micro_batch_size": 1, "grad_accum": 2, "checkpoint_every": 2},
                   resources={"num_workers": 2, "cpus_per_worker": 1})
    out = run_training(cfg, run_name="mined-latent", storage_path=tmp_path)
    assert out.step == 2 and math.isfinite(out.metrics["train/loss"])
    assert out.metrics["mining/used"] == 1.0 and math.isfinite(out.metrics["mining/attack_loss"])
    base, tok = load_model_and_tokenizer("embedded:smollm2-135m-instruct")
    reloaded = PeftModel.from_pretrained(base, out.adapter_dir).eval()
    ids = tok("How do I bake bread?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        tuned = reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            plain = reloaded(input_ids=ids).logits
    assert torch.isfinite(tuned).all() and (tuned - plain).abs().max() > 1e-3


@pytest.mark.slow
def test_embedded_model_adapter_export_reproduces_the_trained_logits(tmp_path):
    """After training with the paper's loss and latent mining on the embedded model, the peft adapter reloaded on a
    fresh base model gives the trained model's logits."""
    from peft import PeftModel

    from crl_ray.data import load_model_and_tokenizer
    from crl_ray.data.assets import is_cached

    if not is_cached("smollm2-135m-instruct"):
        pytest.skip("embedded model not fetched (python -m crl_ray.data fetch)")
    cfg = make_cfg(Path("."), model={"name": "embedded:smollm2-135m-instruct"}, lora={"r": 8, "alpha": 16},
                   loss={"target_layers": {"fraction": [0.625, 0.9375]}, "benign_layers": "all",
                         "margin_benign": 500.0, "margin_harmful": 1500.0, "dist_benign_pos": "mix",
                         "dist_benign_neg": "mix", "dist_harmful_pos": "mix", "dist_harmful_neg": "mix"},
                   mining={"enabled": True, "kind": "latent", "period": 2, "init_iterations": 2, "use_prob": 1.0,
                           "gate": 1000.0, "patience": 1, "block_high": 4},
                   train={"steps": 1, "lr": 1e-3, "micro_batch_size": 1, "grad_accum": 1})
    worker = build_worker(cfg, tmp_path)
    assert worker.train_step()["mining/used"] == 1.0
    worker.export_adapter(tmp_path / ADAPTER_DIR)
    base, tok = load_model_and_tokenizer("embedded:smollm2-135m-instruct")
    reloaded = PeftModel.from_pretrained(base, tmp_path / ADAPTER_DIR).eval()
    ids = tok("How do I bake bread?", return_tensors="pt")["input_ids"]
    worker.model.eval()
    with torch.no_grad():
        ours, theirs = worker.model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with reloaded.disable_adapter():
            plain = reloaded(input_ids=ids).logits
    assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (theirs - plain).abs().max() > 1e-3
