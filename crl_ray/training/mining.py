"""Adversarial hard-negative mining (the "Adv" variant of CRL; docs/METHOD.md), pure torch.

Two kinds of attack, both trained to make the *current* LoRA model comply with harmful requests (cross-entropy of
the harmful completions), and both applied to the harmful rows of the LoRA pass only when the gate allows:

- ``latent``: a residual module ``h <- h + W h + b`` (``nn.Linear(D, D)``, W initialised to the identity, b = 1e-7,
  as in the reference; or a small MLP) inserted after a decoder block drawn uniformly from
  ``block_low..block_high``.
- ``embedding``: a soft prompt of ``soft_prompt_tokens`` vectors in the user turn (just before the template's
  end-of-user-turn suffix), initialised from the embeddings of ``!`` tokens.

Schedule (reference, code/methods/triplet/trainer.py of samuelsimko/crl-llm-defense): every ``period`` micro-steps
(the reference counts its ``compute_loss`` calls, one per micro-batch) a fresh attack is trained for up to
``init_iterations`` (early stop when the mean of the last ``patience`` losses < ``early_stop_loss``); on other
micro-steps it gets ``refresh_iterations`` more. One harmful example per iteration, drawn from the *whole* harmful
training set (the reference samples its iterations' rows from the full preprocessed harmful data, without
replacement), not from the current micro-batch. With probability ``use_prob``, and only while the mean of its last
``gate_window`` losses < ``gate``, the harmful LoRA pass runs with the attack active.

The latent module acts *inside* the decoder block it follows (the reference wraps block and module in one
``LayerSequential``), so ``hidden_states[block + 1]`` of an ``output_hidden_states`` pass is the perturbed output,
the one the next block receives. transformers >= 5 records hidden states with forward hooks on the decoder
blocks; the attack's hook is therefore prepended, to run before that recording.

Data parallel: every rank draws blocks, use decisions and example rows from the same seeded streams, and averages
the attack's gradients and losses across ranks (``reduce_mean``), so all ranks hold the same attack, make the same
early-stop and gate decisions, and run the same number of collective-bearing forward passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import deque
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crl_ray.config import MiningConfig
from crl_ray.data.encoding import IGNORE_INDEX
from crl_ray.data.generate import model_device
from crl_ray.training.model import (
    base_causal_lm,
    decoder_layers,
    forward_hidden,
    num_blocks,
)

log = logging.getLogger(__name__)

ReduceMean = Callable[[Tensor], Tensor]


class RowSource(Protocol):
    """The harmful training set as the miner reads it: ``len`` and rows by index list (a torch-format
    ``datasets.Dataset`` of encoded rows, or any mapping-returning sequence), each value [len(indices), T]."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: list[int]) -> Any: ...


def _identity_reduce(x: Tensor) -> Tensor:
    return x


def example_order(num_rows: int, seed: int, start: int, count: int) -> list[int]:
    """Rows of miner iterations ``start .. start + count - 1`` in a stream of seeded per-epoch permutations.

    Iteration k reads row ``perm_e[k mod N]`` with ``e = k div N`` and ``perm_e`` a permutation of all ``N`` rows
    seeded by (seed, e): consecutive iterations never repeat a row within an epoch (the reference draws each
    training run's rows without replacement from the whole set), and the order depends only on the seed, so every
    data-parallel rank reads the same rows.
    """
    if num_rows < 1:
        raise ValueError("the miner needs at least one harmful example")
    return [_epoch_permutation(num_rows, seed, k // num_rows)[k % num_rows] for k in range(start, start + count)]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_rows, generator=gen).tolist())


class LatentAttack(nn.Module):
    """``h + f(h)``: f = Linear(D, D) with W = I and b = 1e-7 (reference init), or Linear-ReLU-Linear (MLP)."""

    def __init__(self, hidden_size: int, mlp_hidden: int | None = None):
        super().__init__()
        if mlp_hidden is None:
            self.f = nn.Linear(hidden_size, hidden_size)
            with torch.no_grad():
                self.f.weight.copy_(torch.eye(hidden_size))
                self.f.bias.fill_(1e-7)
        else:
            self.f = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, hidden_size))
            with torch.no_grad():  # start as a (near) no-op perturbation
                self.f[2].weight.mul_(1e-3)
                self.f[2].bias.fill_(1e-7)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.f(h.to(self.f_dtype)).to(h.dtype)

    @property
    def f_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def template_suffix_length(tokenizer) -> int:
    """Tokens the chat template writes after the user's text (end of user turn + assistant header).

    Found as the common suffix of two requests that differ only at the end of the user text.
    """
    from crl_ray.data.encoding import build_request

    a = build_request(tokenizer, "Tell me about the weather today")
    b = build_request(tokenizer, "Tell me about the weather tomorrow please")
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def insert_soft_prompt(batch: dict[str, Tensor], *, n: int, suffix_len: int, request_len: int,
                       placeholder_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """The batch with ``n`` placeholder tokens before the template suffix of each request, and their [B, T] mask.

    Request tokens before the insertion point move ``n`` columns left (dropping the leftmost ``n`` columns, pads
    when the request is short enough), so the response keeps its columns and stays aligned with the original pass.
    """
    cut = request_len - suffix_len
    if cut - n < 0:
        raise ValueError(f"soft prompt of {n} tokens does not fit in max_request_tokens={request_len}")
    out: dict[str, Tensor] = {}
    b = batch["input_ids"].shape[0]
    fill = {"input_ids": placeholder_id, "attention_mask": 1, "request_mask": 1, "response_mask": 0,
            "labels": IGNORE_INDEX}
    for key, value in batch.items():
        if key == "position_ids" or value.dim() != 2:
            continue
        soft = value.new_full((b, n), fill.get(key, 0))
        out[key] = torch.cat([value[:, n:cut], soft, value[:, cut:]], dim=1)
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    soft_mask = torch.zeros_like(out["input_ids"], dtype=torch.bool)
    soft_mask[:, cut - n:cut] = True
    return out, soft_mask


def completion_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of the response tokens (``labels``), with logits only where a label is predicted."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    cols = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # logit column c predicts label c+1
    _, logits = forward_hidden(model, batch, num_blocks(model), logits_positions=cols)
    return F.cross_entropy(logits.float().flatten(0, 1), targets[:, cols].flatten(), ignore_index=IGNORE_INDEX)


class Miner:
    """The hard-negative miner of one training run: owns the attack, its optimizer and its schedule.

    ``examples``: the whole harmful training set (encoded rows); the attack trains on one row of it per iteration.
    """

    def __init__(self, cfg: MiningConfig, model: nn.Module, *, examples: RowSource, seed: int,
                 reduce_mean: ReduceMean | None = None, suffix_len: int = 0, request_len: int = 0,
                 placeholder_id: int = 0):
        self.cfg = cfg
        self.model = model
        self.examples = examples
        if len(examples) < 1:
            raise ValueError("the miner needs at least one harmful example; data.harmful is empty")
        self.example_seed = seed + 1  # the rows' order: a stream of its own, the same on every rank
        self.reduce_mean = reduce_mean or _identity_reduce
        self.rng = torch.Generator().manual_seed(seed)  # same stream on every rank
        self.hidden_size = int(base_causal_lm(model).config.hidden_size)
        self.suffix_len, self.request_len, self.placeholder_id = suffix_len, request_len, placeholder_id
        self.attack: nn.Module | None = None
        self.block: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.losses: deque[float] = deque(maxlen=max(cfg.patience, cfg.gate_window))
        self.iterations_total = 0
        self._rows: slice | None = None  # rows of the current forward the attack applies to
        self._soft_mask: Tensor | None = None  # [B, T] soft-prompt positions of the current forward (embedding)
        self._hook = None
        if cfg.kind == "latent":
            n = num_blocks(model)
            if cfg.block_high >= n:
                raise ValueError(f"mining.block_high={cfg.block_high} but the model has {n} blocks")

    # ------------------------------------------------------------------ attack construction and hooks
    def _device(self) -> torch.device:
        return model_device(self.model)

    def _fresh_attack(self) -> None:
        cfg = self.cfg
        self.remove()
        if cfg.kind == "latent":
            span = cfg.block_high - cfg.block_low + 1
            self.block = cfg.block_low + int(torch.randint(span, (1,), generator=self.rng))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=self.rng)))
                self.attack = LatentAttack(self.hidden_size, cfg.mlp_hidden).to(self._device())
            layer = decoder_layers(self.model)[self.block]
            # before transformers' hidden-state recording hook: hidden_states[block + 1] is the perturbed output
            self._hook = layer.register_forward_hook(self._latent_hook, prepend=True)
        else:
            self.block = None
            self.attack = nn.ParameterDict()  # the soft prompt is created from the first forward's embeddings
            emb = base_causal_lm(self.model).get_input_embeddings()
            self._hook = emb.register_forward_hook(self._embedding_hook)
        self.losses.clear()
        self.optimizer = None

    def _latent_hook(self, module: nn.Module, args, output):
        if self._rows is None or self.attack is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        rows = self._rows
        perturbed = torch.cat([hidden[:rows.start], self.attack(hidden[rows]), hidden[rows.stop:]], dim=0)
        return (perturbed, *output[1:]) if isinstance(output, tuple) else perturbed

    def _embedding_hook(self, module: nn.Module, args, output):
        if self._rows is None or self._soft_mask is None:
            return None
        rows, mask = self._rows, self._soft_mask
        if "prompt" not in self.attack:
            init = output[rows][mask[rows]].reshape(-1, self.cfg.soft_prompt_tokens, output.shape[-1])[0]
            self.attack["prompt"] = nn.Parameter(init.detach().float().clone())
        soft = self.attack["prompt"].to(output.dtype)
        part = output[rows].clone()
        part[mask[rows]] = soft.repeat(part.shape[0], 1)
        return torch.cat([output[:rows.start], part, output[rows.stop:]], dim=0)

    def prepare(self, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """The harmful batch as the attack sees it, and the soft-prompt positions (embedding kind; else None)."""
        if self.cfg.kind != "embedding":
            return batch, None
        return insert_soft_prompt(batch, n=self.cfg.soft_prompt_tokens, suffix_len=self.suffix_len,
                                  request_len=self.request_len, placeholder_id=self.placeholder_id)

    @contextlib.contextmanager
    def applied(self, rows: slice, soft_mask: Tensor | None = None) -> Iterator[None]:
        """Within the block, forward passes perturb ``rows`` of their batch with the current attack."""
        self._rows, self._soft_mask = rows, soft_mask
        try:
            yield
        finally:
            self._rows, self._soft_mask = None, None

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.attack = None

    # ------------------------------------------------------------------ training the attack
    def example_rows(self, start: int, count: int) -> list[int]:
        """Indices into ``examples`` of miner iterations ``start .. start + count - 1`` (see ``example_order``)."""
        return example_order(len(self.examples), self.example_seed, start, count)

    def _example(self, index: int) -> dict[str, Tensor]:
        """Row ``index`` of the harmful set as a one-row batch on the model's device (tensor columns only)."""
        row = self.examples[[index]]
        device = self._device()
        return {k: v.to(device) for k, v in row.items() if isinstance(v, Tensor)}

    def _iterate(self, iterations: int, early_stop: bool) -> int:
        """Up to ``iterations`` Adam steps on one harmful example each; returns the number run."""
        cfg = self.cfg
        done = 0
        for it in range(iterations):
            (index,) = self.example_rows(self.iterations_total + it, 1)
            row, soft_mask = self.prepare(self._example(index))
            with self.applied(slice(0, 1), soft_mask):
                if self.optimizer is None:  # the embedding attack's soft prompt exists after one forward
                    if cfg.kind == "embedding":
                        with torch.no_grad():
                            completion_loss(self.model, row)
                    self.optimizer = torch.optim.Adam(list(self.attack.parameters()), lr=cfg.lr)
                loss = completion_loss(self.model, row)
                params = list(self.attack.parameters())
                grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = self.reduce_mean(g.detach().clone())
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.losses.append(float(self.reduce_mean(loss.detach().float())))
            done += 1
            if early_stop and len(self.losses) >= cfg.patience and self._mean(cfg.patience) < cfg.early_stop_loss:
                break
        self.iterations_total += done
        return done

    def _mean(self, window: int) -> float:
        last = list(self.losses)[-window:]
        return sum(last) / len(last) if last else float("inf")

    def step(self, micro_step: int) -> dict[str, float]:
        """Train the attack for micro-step ``micro_step`` (a fresh one when ``micro_step % period == 0``, or when
        there is none yet); returns mining metrics. Micro-steps, not optimizer steps: the reference's unit."""
        cfg = self.cfg
        fresh = micro_step % cfg.period == 0 or self.attack is None
        if fresh:
            self._fresh_attack()
        iterations = cfg.init_iterations if fresh else cfg.refresh_iterations
        done = self._iterate(iterations, early_stop=fresh) if iterations else 0
        metrics = {"mining/iterations": float(done), "mining/fresh": float(fresh)}
        if self.losses:
            metrics["mining/attack_loss"] = self.losses[-1]
            metrics["mining/attack_loss_mean"] = self._mean(cfg.gate_window)
        if self.block is not None:
            metrics["mining/block"] = float(self.block)
        return metrics

    def draw_use(self) -> bool:
        """Whether this micro-step's harmful LoRA pass uses the attack: P = use_prob, and the gate must be open."""
        draw = float(torch.rand((), generator=self.rng))
        gate_open = len(self.losses) > 0 and self._mean(self.cfg.gate_window) < self.cfg.gate
        return draw < self.cfg.use_prob and gate_open

    def state_dict(self) -> dict:
        """Enough to continue after a restart (the attack itself is re-mined: a fresh one starts the next period)."""
        return {"rng": self.rng.get_state(), "iterations_total": self.iterations_total}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.iterations_total = int(state["iterations_total"])
