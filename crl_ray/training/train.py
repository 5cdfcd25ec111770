"""The training job of one sweep trial: a Ray Train V2 ``TorchTrainer`` whose workers run the defense.

Per worker: load the base model, add LoRA on the configured blocks, shard it with FSDP2 (``fully_shard`` per
decoder block, then the root; gloo on CPU, nccl + bf16 mixed precision on GPU), build the CRL data (from the
generation cache the driver filled), then loop: micro-steps of :class:`crl_ray.training.step.StepComputer` (and the miner),
gradient accumulation, AdamW, ``ray.train.report`` every ``log_every`` steps, a ``torch.distributed.checkpoint``
checkpoint every ``checkpoint_every`` steps and at the end. A restarted worker group continues from the last
checkpoint; the final checkpoint holds the adapter in peft format (``adapter/``), written by rank 0.

``resources.num_workers: 0`` runs the same loop in-process (Ray Train local mode), for tests.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crl_ray.config import SweepConfig, dump_config
from crl_ray.storage import Store, is_uri, local_copy

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DATA_GROUPS = ("benign", "harmful", "retain")
ADAPTER_DIR = "adapter"
FAILED_KEY = "failed"  # reported instead of metrics when the loss became non-finite
FAILED_FILE = "failed.txt"  # rank 0 writes the reason into the run's folder
COMPLETE_MARKER = ".complete_rank"  # + rank: that rank's checkpoint files are persisted
DATA_PREFIX = "data-"  # + data_key(cfg): the training data shared by the runs of one storage (a sweep's trials)
DATA_MARKER = "prepared"  # in that folder: the name of a complete copy under it


def _base_name(location: str | Path) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _checkpoint_step(name: str) -> int:
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else -1


def complete_checkpoints(run: Store | str | Path, world_size: int) -> list[str | Path]:
    """Locations of the checkpoint folders of the run at ``run`` (a Store, or its folder or URI) that every rank
    finished writing (local mode: ``.complete``), oldest first: paths for a folder, URIs otherwise."""
    store = run if isinstance(run, Store) else Store(run)
    found = []
    for name in store.list():
        if _checkpoint_step(name) < 0:
            continue
        files = set(store.list(name))
        if STATE_FILE in files and (".complete" in files
                                    or all(f"{COMPLETE_MARKER}{r}" in files for r in range(world_size))):
            found.append(name)
    return [store.located(name) for name in sorted(found, key=_checkpoint_step)]


CHECKPOINT_PREFIX = "checkpoint_step"


@dataclass
class TrainOutcome:
    """What a finished (segment of a) training run left behind."""

    # locations in the run's storage (crl_ray.storage): local paths for a folder, URIs for an object store
    adapter_dir: str | Path
    checkpoint_dir: str | Path
    metrics: dict[str, float]
    step: int
    data_provenance: str | Path | None = None  # provenance.json of the training data (sources, sha256 / revisions)


# ============================================================================================ data sampling
def micro_batch(ds: Any, micro_index: int, *, rank: int, world_size: int, micro_batch_size: int,
                seed: int) -> dict[str, torch.Tensor]:
    """Rows of one rank's micro-batch: global micro-batch ``micro_index`` of a seeded per-epoch shuffle.

    The global micro-batch is ``world_size * micro_batch_size`` consecutive rows of the shuffled order; rank r takes
    the r-th contiguous slice, so 1 worker with batch 2B and 2 workers with batch B see the same global batch.
    """
    n = len(ds)
    global_size = world_size * micro_batch_size
    start = micro_index * global_size + rank * micro_batch_size
    rows = []
    for offset in range(start, start + micro_batch_size):
        epoch, pos = divmod(offset, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(perm[pos]))
    return {**ds[rows], "row": torch.tensor(rows, dtype=torch.long)}  # row: the frozen-output cache's index


# ============================================================================================ the worker
class Worker:
    """State of one training worker (model, optimizer, miner, data) and its loop."""

    def __init__(self, cfg: SweepConfig, *, until_step: int, data_dir: str | Path, local_dir: Path | None,
                 run_dir: str | Path | None = None):
        from crl_ray.training.model import seed_everything

        self.cfg = cfg
        self.data_dir = data_dir
        self.until_step = until_step
        self.local_dir = local_dir  # local mode: where checkpoints live (Ray does not persist them)
        # the run's place in the storage (a folder or a URI, crl_ray.storage): Ray persists checkpoints there;
        # failure reasons and completion markers go there too
        location = run_dir if run_dir is not None else local_dir
        self.run_store = Store(location) if location is not None else None
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = self._device()
        seed_everything(cfg.train.seed)  # identical LoRA init on every rank
        self._build_data()  # before the model: the miner trains on the whole harmful set
        self._build_model()
        self._build_optimizer()
        self.step = 0

    # ------------------------------------------------------------------------------------ setup
    def _device(self) -> torch.device:
        if self.cfg.resources.use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("resources.use_gpu is true but this worker sees no CUDA device")
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _build_model(self) -> None:
        from crl_ray.data import load_model_and_tokenizer
        from crl_ray.training.mining import Miner, template_suffix_length
        from crl_ray.training.model import (
            apply_lora,
            cast_frozen_linears,
            decoder_layers,
            enable_activation_checkpointing,
            lora_blocks,
            num_blocks,
            trainable_parameters,
        )
        from crl_ray.training.step import Collectives, LossPlan, StepComputer

        cfg = self.cfg
        model, self.tokenizer = load_model_and_tokenizer(cfg.model.name, cfg.model.revision, cfg.model.dtype)
        n = num_blocks(model)
        self.plan = LossPlan.from_config(cfg, n)
        self.blocks = lora_blocks(cfg, n, self.plan.lora_last_layer)
        model = apply_lora(model, cfg, self.blocks)
        enable_activation_checkpointing(model, cfg.train.activation_checkpointing,
                                        cfg.train.activation_checkpointing_every)
        model.to(self.device)
        self.sharded = self.distributed
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.device.type == "cuda" else MixedPrecisionPolicy())
            hf_model = model.get_base_model()
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(hf_model, mesh=mesh, mp_policy=mp)
            self.fsdp_root = hf_model
        model.train()
        # FSDP2 fixes its mixed-precision casts on the first forward from which params need grads: that forward
        # must run with the adapter enabled (under disable_adapter no param needs a grad; docs/LOG.md).
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=self.device), logits_to_keep=1)
        if self.sharded:
            self.fsdp_root.reshard()
        elif cfg.train.precision == "bf16":  # every pass from here on runs under bf16 autocast (micro_step)
            cast_frozen_linears(model, torch.bfloat16)
        self.model = model
        self.trainable = trainable_parameters(model)
        self.collectives = Collectives()
        miner = None
        if cfg.mining.enabled:
            from crl_ray.data.encoding import pad_id

            placeholder = self.tokenizer("!", add_special_tokens=False)["input_ids"]
            miner = Miner(cfg.mining, model, examples=self.data["harmful"], seed=cfg.train.seed + 17,
                          reduce_mean=self.collectives.mean,
                          suffix_len=template_suffix_length(self.tokenizer),
                          request_len=cfg.data.max_request_tokens,
                          placeholder_id=placeholder[0] if placeholder else pad_id(self.tokenizer))
        self.miner = miner
        self.computer = StepComputer(cfg, model, self.plan, miner=miner, collectives=self.collectives,
                                     frozen=self.frozen)

    def _build_data(self) -> None:
        import datasets

        from crl_ray.training.frozen import FROZEN_FILE, FrozenOutputs

        self.data = {}
        self.frozen = None
        with local_copy(self.data_dir) as data_dir:  # an object store: a temporary copy on this node
            for name in DATA_GROUPS:
                ds = datasets.load_from_disk(str(data_dir / name), keep_in_memory=True)
                ds.set_format("torch")
                if len(ds) == 0:
                    raise ValueError(f"data.{name} is empty after dropping evaluation behaviours; add rows")
                self.data[name] = ds
            if self.cfg.frozen_cache:
                if not (data_dir / FROZEN_FILE).is_file():
                    raise FileNotFoundError(f"train.frozen_cache is on but {self.data_dir} has no {FROZEN_FILE}; "
                                            "the data were prepared without it: prepare them again")
                self.frozen = FrozenOutputs.load(data_dir / FROZEN_FILE)

    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        t = self.cfg.train
        self.optimizer = torch.optim.AdamW([p for _, p in self.trainable], lr=t.lr, weight_decay=t.weight_decay)
        kind = "constant_with_warmup" if t.lr_schedule == "constant" and t.warmup_steps else t.lr_schedule
        self.scheduler = get_scheduler(kind, self.optimizer, num_warmup_steps=t.warmup_steps,
                                       num_training_steps=t.steps)

    # ------------------------------------------------------------------------------------ loop
    def batches(self, micro_index: int) -> dict[str, dict[str, torch.Tensor]]:
        t = self.cfg.train
        out = {}
        for i, (name, ds) in enumerate(self.data.items()):
            rows = micro_batch(ds, micro_index, rank=self.rank, world_size=self.world_size,
                               micro_batch_size=t.micro_batch_size, seed=self.cfg.data.seed + 7919 * i)
            out[name] = {k: v.to(self.device) for k, v in rows.items()}
        return out

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-steps); returns the step's metrics (same on every rank)."""
        from crl_ray.training.step import finite_or_raise, micro_step

        t = self.cfg.train
        started = time.perf_counter()
        sums: dict[str, float] = {}
        for micro in range(t.grad_accum):
            k = self.step * t.grad_accum + micro
            b = self.batches(k)
            if self.sharded:
                self.fsdp_root.set_requires_gradient_sync(micro == t.grad_accum - 1)
            _, metrics = micro_step(self.computer, self.model, b["benign"], b["harmful"], b["retain"],
                                    precision=t.precision, device_type=self.device.type, micro_step=k,
                                    optimizer_step=self.step, divisor=t.grad_accum)
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
        metrics = {k: (v if k == "tokens" else v / t.grad_accum) for k, v in sums.items()}
        finite_or_raise(metrics, self.step)
        params = [p for _, p in self.trainable]
        if t.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        metrics["train/grad_norm"] = float(norm)
        metrics["train/lr"] = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - started
        metrics["train/seconds_per_step"] = seconds
        metrics["train/tokens_per_s"] = metrics.pop("tokens") / seconds
        metrics["step"] = float(self.step)
        return metrics

    def run(self) -> None:
        import ray.train

        t = self.cfg.train
        self.maybe_resume()
        if self.step >= self.until_step:
            log.info("already at step %d (until_step %d): nothing to train", self.step, self.until_step)
        metrics: dict[str, float] = {"step": float(self.step)}
        while self.step < self.until_step:
            try:
                metrics = self.train_step()
            except FloatingPointError as exc:  # the same on every rank (global loss): retrying would repeat it
                log.error("%s", exc)
                if self.rank == 0 and self.run_store is not None:
                    self.run_store.write_text(str(exc), FAILED_FILE)
                ray.train.report({FAILED_KEY: str(exc), "step": float(self.step)})
                return
            last = self.step == self.until_step
            if self.rank == 0 and (self.step % t.log_every == 0 or last):
                log.info("step %d/%d loss %.4f (%.1f tok/s)", self.step, self.until_step,
                         metrics.get("train/loss", float("nan")), metrics["train/tokens_per_s"])
            if last or self.step % t.checkpoint_every == 0:
                self.report(metrics, final=last)
            elif self.step % t.log_every == 0:
                ray.train.report(metrics)

    # ------------------------------------------------------------------------------------ checkpoints
    def _lora_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.trainable}

    def save(self, directory: Path, *, final: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"lora": self._lora_state(), "optim": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.save(state, checkpoint_id=str(directory / "dcp"), no_dist=not self.distributed)
        torch.save({"rng": torch.get_rng_state()}, directory / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "world_size": self.world_size,
                     "miner": None}
            if self.miner is not None:
                ms = self.miner.state_dict()
                extra["miner"] = {"rng": ms["rng"].tolist(), "iterations_total": ms["iterations_total"]}
            (directory / STATE_FILE).write_text(json.dumps(extra))
        if final:
            self.export_adapter(directory / ADAPTER_DIR)

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"lora": self._lora_state(), "optim": get_optimizer_state_dict(self.model, self.optimizer)}
        dcp.load(state, checkpoint_id=str(directory / "dcp"), no_dist=not self.distributed)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        extra = json.loads((directory / STATE_FILE).read_text())
        self.step = int(extra["step"])
        self.scheduler.load_state_dict(extra["scheduler"])
        rng_file = directory / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            torch.set_rng_state(torch.load(rng_file)["rng"])
        if self.miner is not None and extra.get("miner"):
            self.miner.load_state_dict({"rng": torch.tensor(extra["miner"]["rng"], dtype=torch.uint8),
                                        "iterations_total": extra["miner"]["iterations_total"]})

    def export_adapter(self, out: Path) -> None:
        """The adapter in peft format (rank 0 writes; gathering the shards is a collective on every rank)."""
        full = {}
        for name, p in self.trainable:
            tensor = p.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            full[name] = tensor.to("cpu", torch.float32).clone()
        if self.rank == 0:
            self.model.save_pretrained(str(out), state_dict=full)

    def report(self, metrics: dict[str, float], *, final: bool) -> None:
        import ray.train

        name = f"{CHECKPOINT_PREFIX}{self.step:06d}"
        if self.local_dir is not None:  # local mode: Ray keeps only a reference, so write in place
            directory = self.local_dir / name
            directory.mkdir(parents=True, exist_ok=True)
            self.save(directory, final=final)
            (directory / ".complete").write_text("ok")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
            return
        staging = Path(tempfile.mkdtemp(prefix=f"crl_ray_ckpt_{self.rank}_"))
        try:
            self.save(staging, final=final)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                             checkpoint_dir_name=name)
            # report() returns once this rank's files are persisted: mark them, so that a worker group restarted
            # before Ray registered the checkpoint can still find it complete (see complete_checkpoints)
            if self.run_store is not None and self.run_store.exists(name):
                self.run_store.write_text("ok", name, f"{COMPLETE_MARKER}{self.rank}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def maybe_resume(self) -> None:
        import ray.train

        directory: str | Path | None = None
        checkpoint = ray.train.get_checkpoint()
        on_disk = complete_checkpoints(self.run_store, self.world_size) if self.run_store is not None else []
        registered = _checkpoint_step(_base_name(checkpoint.path)) if checkpoint is not None else -1
        if on_disk and _checkpoint_step(_base_name(on_disk[-1])) > registered:
            directory = on_disk[-1]  # persisted by every rank, not (yet) registered by Ray, or local mode
            with local_copy(directory) as d:
                self.load(d)
        elif checkpoint is not None:
            with checkpoint.as_directory() as d:
                self.load(Path(d))
                directory = Path(d)
        if directory is not None:
            log.info("resumed from %s at step %d", directory, self.step)


def log_to_stderr() -> None:
    """crl_ray's INFO messages to stderr in a Ray worker process (once; the package logger only: other libraries'
    INFO output, e.g. dill traces, is noise). Not propagated to the root logger, so no line is printed twice."""
    if not _in_ray_worker():  # the driver (or a test) configures its own logging
        return
    package_log = logging.getLogger("crl_ray")
    package_log.setLevel(logging.INFO)
    if not package_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)
        package_log.propagate = False


def _in_ray_worker() -> bool:
    try:
        from ray._private import worker

        return worker.global_worker.mode == worker.WORKER_MODE
    except (ImportError, AttributeError):  # pragma: no cover - another Ray layout: keep the old behaviour
        return True


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` = {"cfg": dumped SweepConfig, "until_step", "data_dir", "local_dir", ...}."""
    log_to_stderr()
    if config.get("cache_dir"):
        os.environ["CRL_RAY_CACHE"] = config["cache_dir"]
    torch.set_num_threads(max(1, int(config.get("threads") or torch.get_num_threads())))
    cfg = SweepConfig.model_validate(config["cfg"])
    local_dir = Path(config["local_dir"]) if config.get("local_dir") else None
    Worker(cfg, until_step=int(config["until_step"]), data_dir=config["data_dir"], local_dir=local_dir,
           run_dir=config.get("run_dir")).run()


# ============================================================================================ the driver side
def prepare_data(cfg: SweepConfig, out: Path) -> Path:
    """Build the encoded training sets once on the driver (answers generated once, cached) and save them to ``out``.

    Workers only load them, so they neither generate nor re-tokenize.
    """
    from transformers import AutoTokenizer

    from crl_ray.data import build_crl_data, generator_loader
    from crl_ray.data.assets import cache_dir, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model.name), revision=cfg.model.revision)
    data = build_crl_data(cfg, tokenizer, cache_dir=cache_dir() / "generations", load_generator=generator_loader(cfg))
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for name in DATA_GROUPS:
        getattr(data, name).save_to_disk(str(staging / name))
    if cfg.frozen_cache:  # the frozen model's outputs, once for these rows (crl_ray.training.frozen)
        from crl_ray.training.frozen import FROZEN_FILE, cached_frozen, data_columns

        columns = data_columns({name: getattr(data, name) for name in DATA_GROUPS})
        cached_frozen(cfg, columns, staging / FROZEN_FILE, cache_dir() / "frozen")
    (staging / "provenance.json").write_text(json.dumps(data.provenance, indent=2, default=str))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def data_key(cfg: SweepConfig) -> str:
    """Hash of everything :func:`prepare_data` reads: the model, the data section, the held-out evaluation
    behaviours and, with the frozen-output cache on, what the frozen outputs hold (layers, masks). Runs that differ
    only elsewhere (lr, margins, loss weights, steps, ...) share one preparation."""
    import hashlib

    from crl_ray.data.generate import library_versions

    spec = None
    if cfg.frozen_cache:
        from crl_ray.training.frozen import FROZEN_VERSION, FrozenSpec
        from crl_ray.training.step import LossPlan
        from crl_ray.validate import model_info

        plan = LossPlan.from_config(cfg, model_info(cfg.model.name, cfg.model.revision).num_blocks)
        spec = {"version": FROZEN_VERSION, **FrozenSpec.of(cfg, plan).__dict__}
    payload = {"model": cfg.model.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
               "held_out": cfg.eval.behaviors.model_dump(mode="json"), "frozen": spec,
               "libraries": library_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shared_data(cfg: SweepConfig, store: Store, *, local: bool) -> Store:
    """The prepared training data for ``cfg`` under ``store`` (the copy's folder, as a Store): prepared once per :func:`data_key`
    and reused by every later run there (a sweep's trials, a resumed segment). A preparation writes a copy under a
    fresh name and then the marker naming it, and no copy is ever deleted, so runs preparing at once (concurrent
    trials) each get a complete copy and a reader never sees a partial one, on a folder or an object store.
    ``local``: prepare in this process (local mode), else in a Ray task with a worker's resources."""
    folder = store.child(f"{DATA_PREFIX}{data_key(cfg)}")
    if folder.is_file(DATA_MARKER):
        name = folder.read_text(DATA_MARKER).strip()
        if name and folder.is_file(name, "provenance.json"):
            log.info("training data prepared before: %s", folder.uri(name))
            return folder.child(name)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"
    if local:
        prepare_data(cfg, Path(folder.path(name)))
    else:
        prepare_data_on_a_worker(cfg, folder.uri(name))
    folder.write_text(name, DATA_MARKER)
    return folder.child(name)


def prepare_data_on_a_worker(cfg: SweepConfig, out: str | Path) -> str:
    """:func:`prepare_data` as a Ray task with one training worker's resources (its GPU when ``use_gpu``), outside
    the caller's placement group: answers that are not cached yet are generated there in the model's dtype, not on
    the CPU head that runs the trial drivers. ``out`` is a location in the run's storage (a folder every node sees,
    or an object-store URI: the task prepares a local copy and uploads it); returns it."""
    return run_task(_prepare_data_task, cfg.resources.worker_task(), cfg, str(out))


def run_task(fn, options: dict[str, float], *args: Any) -> Any:
    """``fn(*args)`` as a Ray task with ``options`` (resources), outside the caller's placement group (a trial
    driver's), in a fresh worker process (max_calls=1) that frees its memory when done; returns its result."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    task = ray.remote(max_calls=1)(fn).options(
        **options, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(*args))


def _prepare_data_task(cfg: SweepConfig, out: str) -> str:
    log_to_stderr()  # generation progress reaches the sweep's console
    if not is_uri(out):
        return str(prepare_data(cfg, Path(out)))
    with tempfile.TemporaryDirectory(prefix="crl_ray_data_") as tmp:
        return Store(out).upload(prepare_data(cfg, Path(tmp) / "data"))


def run_training(cfg: SweepConfig, *, run_name: str, storage_path: str | Path, callbacks: list | None = None,
                 until_step: int | None = None) -> TrainOutcome:
    """Train (or continue training) ``run_name`` under ``storage_path`` up to ``until_step`` (default train.steps).

    ``storage_path`` is a folder (local, or mounted on every node) or an object-store URI (crl_ray.storage); Ray
    Train keeps the run's checkpoints there, and the returned locations point into it. Calling it again with the
    same name and storage resumes from the run's latest checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from crl_ray.data.assets import cache_dir

    until = cfg.train.steps if until_step is None else min(until_step, cfg.train.steps)
    res = cfg.resources
    store = Store(storage_path)
    run = store.child(run_name)
    local = res.num_workers == 0
    if local and store.remote:
        raise ValueError("resources.num_workers: 0 (local mode) keeps checkpoints in a folder: storage.path must "
                         "be a folder, not an object-store URI")
    data = shared_data(cfg, store, local=local)
    data_dir = str(data.located())
    loop_config = {"cfg": dump_config(cfg), "until_step": until, "cache_dir": str(cache_dir()),
                   "data_dir": data_dir, "local_dir": run.path() if local else None, "run_dir": run.uri(),
                   "threads": int(res.cpus_per_worker) if not res.use_gpu else None}
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if res.use_gpu else {})}
    scaling = ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                      resources_per_worker=None if local else per_worker)
    run_config = ray.train.RunConfig(name=run_name, storage_path=store.path(),
                                     storage_filesystem=store.fs if store.remote else None,
                                     callbacks=callbacks or None,
                                     failure_config=ray.train.FailureConfig(  # every retry limit finite
                                         max_failures=res.max_failures,
                                         controller_failure_limit=res.max_failures,
                                         max_preemption_failures=res.max_failures),
                                     checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2))
    run.delete(FAILED_FILE)
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if run.is_file(FAILED_FILE):
        raise FloatingPointError(run.read_text(FAILED_FILE))
    if result.metrics and FAILED_KEY in result.metrics:
        raise FloatingPointError(result.metrics[FAILED_KEY])
    if result.checkpoint is not None:
        name = _base_name(result.checkpoint.path)
    else:  # local mode with nothing left to train: the latest checkpoint on disk
        done = complete_checkpoints(run, 1)
        if not done:
            raise RuntimeError(f"training run {run_name!r} reported no checkpoint")
        name = _base_name(done[-1])
    state = json.loads(run.read_text(name, STATE_FILE))
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float)) and math.isfinite(float(v))}
    return TrainOutcome(adapter_dir=run.located(name, ADAPTER_DIR), checkpoint_dir=run.located(name),
                        metrics=metrics, step=int(state["step"]), data_provenance=data.located("provenance.json"))
