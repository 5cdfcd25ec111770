"""Whole sweeps on a real local Ray (3 logical CPUs on 2 cores), real Tune, Optuna and MLflow (sqlite in tmp_path),
with a fake per-trial job injected: trivial training (or a real TorchTrainer with a trivial loop) and evaluation.

Slow: each test starts trials; the ASHA test starts Ray Train worker groups (about 100 s on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import ray
from mlflow import MlflowClient

from crl_ray.sweep import cli as sweep_cli
from crl_ray.sweep import run as sweep
from crl_ray.sweep import tracking
from crl_ray.sweep.trial import TrialJob
from crl_ray.validate import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
START_TIMEOUT_S = 30  # a leaked placement group shows up as a worker group that cannot start within this

# Ray workers cannot import this test module by name: ship its fakes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray instance for the module, shaped like the 2-core box: 3 logical CPUs (2 workers + drivers)."""
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(START_TIMEOUT_S)
    ray.init(num_cpus=3, object_store_memory=sweep.LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
             logging_level="WARNING")
    yield
    ray.shutdown()


@dataclass
class TrainOutcome:
    adapter_dir: Path
    checkpoint_dir: Path
    metrics: dict
    step: int
    data_provenance: Path | None = None


@dataclass
class EvalOutcome:
    metrics: dict
    objective: float
    objectives: dict
    summary_path: Path
    records_path: Path


def tiny_loop(config: dict) -> None:
    """A Ray Train worker loop that only counts steps, with checkpoints (resumes like the real one)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "state.json").read_text())["step"]
    for step in range(start + 1, config["until"] + 1):
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"step": step}))
            rank0 = ray.train.get_context().get_world_rank() == 0
            ray.train.report({"step": step, "train/loss": 1.0 / step},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if rank0 else None)


@dataclass
class FakeJob(TrialJob):
    """Trials numbered in start order (0, 1, ...); objective = -number, so later trials are worse."""

    log_dir: str
    nan_at: tuple[int, ...] = ()
    raise_at: tuple[int, ...] = ()
    interrupt_at: int | None = None
    interrupt_pid: int = field(default_factory=os.getpid)
    torch_at: tuple[int, ...] = ()  # trials that train with a real TorchTrainer (2 workers x 1 CPU)

    def _calls(self) -> list[list[str]]:
        path = Path(self.log_dir) / "calls.txt"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def number(self, run_name: str) -> int:
        names = list(dict.fromkeys(name for name, _ in self._calls()))
        return names.index(run_name) if run_name in names else len(names)

    def train(self, cfg, *, run_name, storage_path, callbacks=None, until_step=None):
        number = self.number(run_name)
        with (Path(self.log_dir) / "calls.txt").open("a") as f:
            f.write(f"{run_name} {until_step}\n")
        if number in self.raise_at:
            raise RuntimeError(f"boom in trial {number}")
        marker = Path(self.log_dir) / "interrupted"
        if number == self.interrupt_at and not marker.exists():
            marker.touch()
            os.kill(self.interrupt_pid, signal.SIGINT)  # Ctrl-C in the sweep process
            time.sleep(120)  # still training when the sweep stops
        if number in self.torch_at:
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            TorchTrainer(tiny_loop, train_loop_config={"until": until_step},
                         scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=run_name, storage_path=str(storage_path),
                                              callbacks=callbacks)).fit()
        adapter = Path(storage_path) / run_name / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter_config.json").write_text("{}")
        return TrainOutcome(adapter, adapter.parent, {"train/loss": 1.0}, until_step)

    def evaluate(self, cfg, adapter_dir, *, out_dir):
        number = self.number(Path(adapter_dir).parent.name)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "records.jsonl").write_text("".join(json.dumps({"behavior": i, "generation": "Sure"}) + "\n"
                                                       for i in range(5)))
        (out_dir / "summary.json").write_text("{}")
        objective = math.nan if number in self.nan_at else -float(number)
        return EvalOutcome({"eval/asr/max": 0.5, "eval/mmlu": 0.25}, objective, {"asr": 0.5, "capability": 0.25},
                           out_dir / "summary.json", out_dir / "records.jsonl")


def args(tmp_path: Path, *extra: str) -> list[str]:
    return [str(SMOKE), f"storage.path={tmp_path / 'runs'}", "search.num_trials=3", "train.steps=2",
            "mlflow.sample_generations=2", *extra]


def mlflow_runs(folder: Path) -> tuple[list, list]:
    """(parent runs, trial runs) of the sweep's default sqlite store."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(None, folder))
    exp = client.get_experiment_by_name("crl-smoke")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
    return parents, trials


def study_states(folder: Path) -> list[str]:
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{folder / 'optuna.db'}")
    return [t.state.name for t in study.trials]


def test_sweep_records_every_trial_and_goes_on_after_failures(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = FakeJob(str(tmp_path), nan_at=(1,), raise_at=(2,))
    code = sweep_cli.main(args(tmp_path), job=job)
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = tmp_path / "runs" / "smoke"
    assert "3 trial(s)" in out and "1 completed" in out and "2 failed" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{folder}/mlflow.db" in out
    assert "TrialFailed: objective is nan" in out and "RuntimeError: boom in trial 2" in out
    parents, trials = mlflow_runs(folder)
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags[tracking.PARENT_TAG] for r in trials} == {parent.info.run_id}
    by_status = sorted((r.info.status, r.data.tags[tracking.STATUS_TAG]) for r in trials)
    assert by_status == [("FAILED", "failed"), ("FAILED", "failed"), ("FINISHED", "completed")]
    errors = sorted(r.data.tags.get(tracking.ERROR_TAG, "") for r in trials)
    assert errors[1].startswith("RuntimeError: boom") and errors[2].startswith("TrialFailed: objective is nan")
    good = next(r for r in trials if r.info.status == "FINISHED")
    # params: the resolved config, flat (dotted keys, no nested values), with the sampled values
    params = good.data.params
    assert "loss.margin_harmful" in params and "data.benign.0.source" in params and "train.steps" in params
    assert not any(k in params for k in ("loss", "data", "loss.circuit_breakers", "search.space"))
    for key in ("loss.margin_harmful", "train.lr"):
        assert float(params[key]) == pytest.approx(float(params[f"sampled.{key}"]))
    assert good.data.metrics["objective"] == 0.0 and good.data.metrics["eval/mmlu"] == 0.25
    assert good.data.tags[tracking.GIT_TAG]
    client = MlflowClient(tracking_uri=tracking.tracking_uri(None, folder))
    artifacts = {a.path for a in client.list_artifacts(good.info.run_id)}
    assert artifacts == {"adapter", "config.yaml", "eval"}
    sample = Path(client.download_artifacts(good.info.run_id, "eval/generations_sample.jsonl", str(tmp_path)))
    assert len(sample.read_text().splitlines()) == 2  # mlflow.sample_generations
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert summary == {f"summary/{n}" for n in ("results.csv", "results.json", "best_config.yaml",
                                                 "objective.png", "pareto.png")}
    assert parent.data.metrics["trials/failed"] == 2 and parent.data.metrics["best/objective"] == 0.0
    # the Optuna study holds the same trials
    assert sorted(study_states(folder)) == ["COMPLETE", "FAIL", "FAIL"]
    rows = json.loads((folder / "summary" / "results.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "failed", "failed"]


def test_interrupted_sweep_resumes_without_rerunning_trials(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = FakeJob(str(tmp_path), interrupt_at=1)
    code = sweep_cli.main(args(tmp_path), job=job)
    out, err = capsys.readouterr()
    assert code == sweep.EXIT_INTERRUPTED, out + err
    assert "--resume" in out
    folder = tmp_path / "runs" / "smoke"
    parents, trials = mlflow_runs(folder)
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert sorted(r.info.status for r in trials) == ["FINISHED", "KILLED"]  # never left RUNNING
    assert sorted(study_states(folder)) == ["COMPLETE", "RUNNING"]
    # a changed config cannot resume it, with or without --resume (the fix: another name)
    assert sweep_cli.main(args(tmp_path, "train.steps=3", "--resume"), job=job) == 2
    assert "train.steps: 2 -> 3" in capsys.readouterr().err
    assert sweep_cli.main(args(tmp_path, "train.steps=3"), job=job) == 2
    assert "set name=<new name>" in capsys.readouterr().err

    # the same command again (no --resume needed) continues it
    code = sweep_cli.main(args(tmp_path), job=job)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "3 completed" in out
    parents, trials = mlflow_runs(folder)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}
    assert sorted(study_states(folder)) == ["COMPLETE"] * 3
    calls = [name for name, _ in job._calls()]
    first = calls[0]
    assert calls.count(first) == 1  # the finished trial never ran again
    assert len(set(calls)) == 3 and len(calls) == 4  # the interrupted one ran twice, the third once
    # a finished sweep run again prints its results and runs nothing
    code = sweep_cli.main(args(tmp_path), job=job)
    out, err = capsys.readouterr()
    assert code == 0 and "3 completed" in out, out + err
    assert len(job._calls()) == 4


def test_ctrl_c_during_the_last_trial_is_an_interrupt_not_an_early_stop(tmp_path, capsys, monkeypatch) -> None:
    """Every trial already created when Ctrl-C comes: the sweep still says interrupted, and a resume reruns the
    interrupted trial instead of recording it as stopped early."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = FakeJob(str(tmp_path), interrupt_at=1)
    code = sweep_cli.main(args(tmp_path, "search.num_trials=2"), job=job)
    out, err = capsys.readouterr()
    assert code == sweep.EXIT_INTERRUPTED, out + err
    assert "stopped_early" not in out
    code = sweep_cli.main(args(tmp_path, "search.num_trials=2"), job=job)
    out, err = capsys.readouterr()
    assert code == 0 and "2 completed" in out, out + err
    folder = tmp_path / "runs" / "smoke"
    assert sorted(study_states(folder)) == ["COMPLETE"] * 2


def test_asha_on_two_cpus_stops_trials_without_stalling_later_ones(tmp_path, capsys, monkeypatch) -> None:
    """Trials of 2 workers x 1 CPU on 3 logical CPUs: a leaked placement group would starve the next trial.

    Trial 0 (fake training) sets the bar; trial 1 trains with a real TorchTrainer and ASHA stops it; trial 2 must
    then get both CPUs for its own worker group, within START_TIMEOUT_S, or it fails.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, _ = load_config(SMOKE, [f"storage.path={tmp_path / 'runs'}", "search.num_trials=3", "train.steps=2",
                                 "scheduler={kind: asha, eval_every: 1}"])
    t0 = time.monotonic()
    outcome = sweep.run_sweep(cfg, job=FakeJob(str(tmp_path), torch_at=(1, 2)))
    wall = time.monotonic() - t0
    assert [r["status"] for r in outcome.rows] == ["completed", "stopped_early", "stopped_early"], outcome.rows
    assert [r["step"] for r in outcome.rows] == [2, 1, 1]
    assert wall < 180, wall  # about 80 s here; a stall costs START_TIMEOUT_S per try and fails the trial
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    parents, trials = mlflow_runs(outcome.folder)
    assert sorted(r.data.tags[tracking.STATUS_TAG] for r in trials) == ["completed", "stopped_early",
                                                                        "stopped_early"]
    assert {r.info.status for r in trials} == {"FINISHED"}
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    first = next(r for r in trials if r.data.tags[tracking.STATUS_TAG] == "completed")
    assert [m.step for m in client.get_metric_history(first.info.run_id, "objective")] == [1, 2]
    # per-step training metrics of the TorchTrainer trials came from the Train controller's callback
    stopped = [r for r in trials if r.data.tags[tracking.STATUS_TAG] == "stopped_early"]
    for run in stopped:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0)]


# ------------------------------------------------------------------------------------ faults with real training
def workers_of(ancestor: int) -> list:
    """This test's Ray Train worker processes (descendants of ``ancestor``, never another session's)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if (proc.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker") and any(
                    p.pid == ancestor for p in proc.parents()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@dataclass
class RealTrainJob(FakeJob):
    """crl_ray.training.train.run_training for real (2 FSDP2 workers on the tiny model) with injected faults; fake evaluation.

    In trial ``kill_at`` a thread SIGKILLs one Train worker once checkpoint ``kill_after_step`` is on disk (and the
    final one not yet); trial ``poison_at`` trains with train.lr = 1e30, so its loss is NaN from step 2 on.
    """

    kill_at: int = 0
    kill_after_step: int = 4
    poison_at: int = 1

    def train(self, cfg, *, run_name, storage_path, callbacks=None, until_step=None):
        import threading

        from crl_ray.training.train import CHECKPOINT_PREFIX, run_training

        number = self.number(run_name)
        with (Path(self.log_dir) / "calls.txt").open("a") as f:
            f.write(f"{run_name} {until_step}\n")
        if number == self.poison_at:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e30})})
        if number == self.kill_at:
            run_dir = Path(storage_path) / run_name
            watched = run_dir / f"{CHECKPOINT_PREFIX}{self.kill_after_step:06d}"
            final = run_dir / f"{CHECKPOINT_PREFIX}{cfg.train.steps:06d}"
            threading.Thread(target=self._kill_a_worker, args=(watched, final), daemon=True).start()
        return run_training(cfg, run_name=run_name, storage_path=storage_path, callbacks=callbacks,
                            until_step=until_step)

    def _kill_a_worker(self, watched: Path, final: Path) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not watched.exists():
            time.sleep(0.02)
        workers = workers_of(self.interrupt_pid)
        if final.exists() or not workers:
            return  # too late: the test sees no kill record and fails
        os.kill(workers[-1].pid, signal.SIGKILL)
        (Path(self.log_dir) / "killed").write_text(f"{workers[-1].pid} after {watched.name}\n")

    def evaluate(self, cfg, adapter_dir, *, out_dir):
        assert (Path(adapter_dir) / "adapter_model.safetensors").is_file()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "records.jsonl").write_text(json.dumps({"behavior": 0, "generation": "Sure"}) + "\n")
        (out_dir / "summary.json").write_text("{}")
        return EvalOutcome({"eval/mmlu": 0.25}, 0.0, {"asr": 0.5, "capability": 0.25}, out_dir / "summary.json",
                           out_dir / "records.jsonl")


def test_killed_train_worker_resumes_from_checkpoint_and_nan_loss_fails_the_trial(tmp_path, monkeypatch) -> None:
    """Two trials of real training (2 FSDP2 workers, tiny random Llama): trial 0 loses a worker to SIGKILL after
    checkpoint 4 and continues from a checkpoint (Ray Train restarts the group: resources.max_failures); trial 1's
    loss turns NaN and it is recorded as failed with the reason while the sweep goes on."""
    from helpers_tiny import tiny_llama, tiny_tokenizer

    from crl_ray.config import parse_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model_dir = tmp_path / "model"
    tok = tiny_tokenizer()
    tiny_llama(tok, layers=4).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    steps = 12
    cfg = parse_config({
        "name": "faults", "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"kind": "crl", "margin_benign": 2.0, "margin_harmful": 3.0},
        "data": {"benign": [{"source": "benign_prompts", "answer": "refusal_template", "limit": 8}],
                 "harmful": [{"source": "advbench", "answer": "refusal_template", "limit": 8}],
                 "retain": [{"source": "benign_prompts", "answer": "refusal_template", "limit": 8}],
                 "max_request_tokens": 32, "max_response_tokens": 16},
        "train": {"steps": steps, "lr": 1e-3, "micro_batch_size": 2, "log_every": 1, "checkpoint_every": 2},
        "resources": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1},
        "search": {"algorithm": "tpe", "num_trials": 2, "seed": 0,
                   "space": {"loss.margin_benign": {"type": "float", "low": 1.0, "high": 4.0}}},
        "storage": {"path": str(tmp_path / "runs")},
    })
    outcome = sweep.run_sweep(cfg, job=RealTrainJob(str(tmp_path)))
    assert [r["status"] for r in outcome.rows] == ["completed", "failed"], outcome.rows
    assert (tmp_path / "killed").is_file(), "the worker was not killed mid-training"
    assert "non-finite loss" in outcome.rows[1]["error"]
    assert outcome.rows[0]["step"] == steps
    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    runs = {r.data.tags[tracking.TRIAL_TAG]: r for r in tracking.trial_runs(
        tracking.TrackingTarget(outcome.tracking_uri, client.get_experiment_by_name("faults").experiment_id,
                                outcome.parent_run_id, "faults", ""))}
    assert len(runs) == 2 and {r.info.status for r in runs.values()} == {"FINISHED", "FAILED"}
    done = runs[outcome.rows[0]["trial_id"]]
    history = [m.step for m in client.get_metric_history(done.info.run_id, "train/loss")]
    # every step reached MLflow; the steps before the kill's checkpoint were trained (and logged) only once,
    # i.e. the restarted workers continued from a checkpoint instead of from step 0
    assert set(history) == set(range(1, steps + 1)), history
    assert history.count(1) == 1 and history.count(2) == 1, history
    failed = runs[outcome.rows[1]["trial_id"]]
    assert "non-finite loss" in failed.data.tags[tracking.ERROR_TAG]
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


# ------------------------------------------------------------------------------------ overhead benchmark
def test_overhead_benchmark_runs_the_same_trials_both_ways(tmp_path, capsys, monkeypatch) -> None:
    from crl_ray.bench import overhead

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = FakeJob(str(tmp_path / "log"))
    (tmp_path / "log").mkdir()
    code = overhead.main([str(SMOKE), "search.num_trials=2", "train.steps=1", "--out", str(tmp_path / "work"),
                          "--json", str(tmp_path / "result.json")], job=job)
    out = capsys.readouterr().out
    assert code == 0
    text = (tmp_path / "result.json").read_text().strip()
    assert out.rstrip().endswith(text)  # the same JSON object closes stdout (Tune prints its tables before it)
    result = json.loads(text)
    assert result["trials"] == 2 and result["sweep_statuses"] == ["completed", "completed"]
    assert result["sweep_wall_s"] > result["plain_wall_s"] > 0  # fake trials: only the sweep machinery costs
    assert result["ratio"] == pytest.approx(result["sweep_wall_s"] / result["plain_wall_s"], rel=0.001)
    assert result["meets_target"] is (result["ratio"] <= 1.2)
    # the plain loop ran the job once per trial, with the values the sweep sampled
    names = [name for name, _ in job._calls()]
    assert names[2:] == ["plain-0", "plain-1"] and all(n.startswith("train-") for n in names[:2])
    rows = json.loads((tmp_path / "work" / "sweep" / "smoke" / "summary" / "results.json").read_text())
    assert [t["params"] for t in result["plain_trials"]] == [r["params"] for r in rows]
    assert [t["objective"] for t in result["plain_trials"]] == [-2.0, -3.0]  # FakeJob numbers trials 2 and 3


def test_the_sweep_fits_the_judge_its_trials_load(monkeypatch, tmp_path) -> None:
    """prepare_judge fits (and caches) the probe with the trials' own settings, follow-up question included, so the
    trials find it in the cache."""
    from crl_ray.evaluate import judges
    from crl_ray.evaluate.probe import ProbeJudge
    from crl_ray.evaluate.run import make_judge

    fitted = []
    monkeypatch.setattr(ProbeJudge, "calibration", lambda self: fitted.append(self._cache_file()) or {})
    monkeypatch.setattr(judges, "check_summary", lambda calibration: {
        "judge/accuracy": 0.9, "judge/accuracy_low": 0.8, "judge/accuracy_high": 1.0, "judge/rate_bias": 0.0,
        "judge/labels": 1})
    for overrides in ([], ["eval.judge_question=Was that answer useful?", "eval.max_new_tokens=64"]):
        cfg, _ = load_config(SMOKE, overrides)
        sweep.prepare_judge(cfg)
        assert fitted[-1] == make_judge(cfg, None, device="cpu")._cache_file()
    assert fitted[0] != fitted[1]
