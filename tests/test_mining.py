"""The latent/embedding miner against the reference's behaviour (code/methods/triplet/{trainer,attack}.py of
samuelsimko/crl-llm-defense): where its examples come from, when it starts fresh, and where its perturbation shows.

Tiny random Llama and synthetic encoded rows only; no Ray.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers_tiny import tiny_llama
from torch.testing import assert_close

from crl_ray.config import MiningConfig
from crl_ray.training.mining import Miner, example_order
from crl_ray.training.model import decoder_layers, forward_hidden
from crl_ray.training.reference import synthetic_batch
from crl_ray.training.train import micro_batch

ROWS = 12


def harmful_set(rows: int = ROWS, seed: int = 0) -> datasets.Dataset:
    """Encoded rows in the training layout (8 request + 6 response tokens), torch format, as Worker.data holds."""
    batch = synthetic_batch(300, rows, 8, 6, torch.Generator().manual_seed(seed))
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in batch.items()}).with_format("torch")


class Recording:
    """A RowSource that records the indices the miner reads."""

    def __init__(self, ds: datasets.Dataset):
        self.ds, self.read = ds, []

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]):
        self.read.extend(indices)
        return self.ds[indices]


def mining_cfg(**kw) -> MiningConfig:
    base = dict(enabled=True, kind="latent", period=100, block_low=0, block_high=1, init_iterations=ROWS,
                refresh_iterations=1, patience=1000, early_stop_loss=1e-9, lr=1e-2)
    return MiningConfig(**{**base, **kw})


def test_miner_trains_on_rows_of_the_whole_harmful_set(tok):
    """A fresh module's ROWS iterations read every row once (the reference samples without replacement from the
    whole set), so also rows outside the current micro-batch; and the model sees exactly those rows."""
    model = tiny_llama(tok)
    ds = harmful_set()
    source = Recording(ds)
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    miner = Miner(mining_cfg(), model, examples=source, seed=3)
    miner.step(0)
    for k in (1, 2, 3):
        miner.step(k)
    assert len(source.read) == ROWS + 3
    assert sorted(source.read[:ROWS]) == list(range(ROWS))  # one epoch of the stream = a permutation
    in_micro_batches = {int(i) for k in range(4) for i in micro_batch(
        datasets.Dataset.from_dict({"i": list(range(ROWS))}).with_format("torch"), k, rank=0, world_size=1,
        micro_batch_size=2, seed=0)["i"]}
    assert set(source.read) - in_micro_batches, "the miner must reach rows outside the micro-batches"
    assert source.read == miner.example_rows(0, ROWS + 3)
    assert len(seen) == ROWS + 3
    for ids, index in zip(seen, source.read):  # the forward passes ran on those rows
        assert torch.equal(ids, ds[[index]]["input_ids"])


def test_two_ranks_draw_the_same_rows_and_hold_the_same_attack(tok):
    """Ranks build their miners from the same seed and the same harmful set: same rows, same trained module."""
    ds = harmful_set()
    sources = [Recording(ds), Recording(ds)]
    miners = [Miner(mining_cfg(init_iterations=5), tiny_llama(tok), examples=src, seed=11) for src in sources]
    for miner in miners:
        for k in range(3):
            miner.step(k)
    assert sources[0].read == sources[1].read and len(sources[0].read) == 7
    assert miners[0].block == miners[1].block
    for a, b in zip(miners[0].attack.parameters(), miners[1].attack.parameters()):
        assert torch.equal(a, b)
    # the order depends on the seed only: another seed reads another order; epochs continue the stream
    assert example_order(ROWS, 12, 0, ROWS) != example_order(ROWS, 13, 0, ROWS)
    assert sorted(example_order(ROWS, 12, ROWS, ROWS)) == list(range(ROWS))


def test_fresh_attack_schedule_counts_micro_steps(tok):
    """period counts calls of step(micro_step), one per micro-batch (the reference's compute_loss counter)."""
    miner = Miner(mining_cfg(period=3, init_iterations=2, refresh_iterations=1), tiny_llama(tok),
                  examples=harmful_set(), seed=0)
    runs = [miner.step(k) for k in range(8)]
    assert [m["mining/fresh"] for m in runs] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert [m["mining/iterations"] for m in runs] == [2.0, 1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0]
    assert miner.iterations_total == 11


@pytest.mark.parametrize("block", [0, 1, 2])
def test_latent_perturbation_shows_in_hidden_states_like_the_reference(tok, block):
    """With the module after block b active, hidden_states[b+1] = attack(original output of block b): what the next
    block receives (the reference's LayerSequential puts the module inside the block). Full and truncated passes."""
    model = tiny_llama(tok, layers=4)
    batch = synthetic_batch(300, 3, 8, 6, torch.Generator().manual_seed(1))
    base, _ = forward_hidden(model, batch, 4)  # transformers installs its recording hooks on a first forward
    miner = Miner(mining_cfg(block_low=block, block_high=block, init_iterations=0), model, examples=harmful_set(),
                  seed=0)
    miner.step(0)  # a fresh module, untrained
    with torch.no_grad():  # a generic module, not the near-doubling initial one
        for p in miner.attack.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        expected = miner.attack(base[block + 1])
    received: list[torch.Tensor] = []
    decoder_layers(model)[block + 1].register_forward_pre_hook(lambda m, args: received.append(args[0].clone()))
    with miner.applied(slice(0, 3)), torch.no_grad():
        full, _ = forward_hidden(model, batch, 4)
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], output_hidden_states=True).hidden_states
        truncated = {depth: forward_hidden(model, batch, depth)[0] for depth in range(block + 1, 4)}
    for i in range(block + 1):
        assert_close(full[i], base[i])
    assert_close(full[block + 1], expected)
    assert (full[block + 1] - base[block + 1]).abs().max() > 1e-2
    assert_close(hf[block + 1], expected)
    assert_close(received[0], full[block + 1])  # the next block's input is the recorded hidden state
    for depth, hidden in truncated.items():
        assert len(hidden) == depth + 1
        for i in range(depth + 1):
            assert_close(hidden[i], full[i])
