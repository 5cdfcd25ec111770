"""The per-trial driver's pieces without a cluster: config resolution, metrics, MLflow callbacks, errors."""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from crl_ray.config import dump_config
from crl_ray.errors import ConfigError
from crl_ray.sweep import tracking
from crl_ray.sweep.trial import (
    StepMetricsCallback,
    TrialFailed,
    TrialStatusCallback,
    failure_reason,
    report_metrics,
    resolve_trial_config,
)
from crl_ray.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> tracking.TrackingTarget:
    folder = tmp_path_factory.mktemp("sweep")
    return tracking.open_sweep_run(tracking.tracking_uri(None, folder), "trial-tests", "sw", resume=False,
                                   commit="abc", artifact_dir=folder / "art")


def test_resolve_applies_sampled_values_and_revalidates() -> None:
    cfg, _ = load_config(SMOKE, ["search.space={loss.margin_benign: {type: float, low: 0.5, high: 8},"
                                 "loss.target_layers: {type: layer_window, start: [10, 20], size: [2, 4]}}"])
    base = dump_config(cfg)
    trial = resolve_trial_config(base, {"loss.margin_benign": 1.25, "loss.target_layers:start": 12,
                                        "loss.target_layers:size": 3})
    assert trial.loss.margin_benign == 1.25
    assert trial.loss.target_layers.resolve(30) == [12, 13, 14]
    assert trial.loss.margin_harmful == cfg.loss.margin_harmful  # everything else as in the sweep
    assert base == dump_config(cfg)  # the base is not modified
    with pytest.raises(ConfigError) as err:
        resolve_trial_config(base, {"loss.margin_benign": -1.0, "loss.target_layers:start": 12,
                                    "loss.target_layers:size": 3}, source="trial x")
    assert "loss.margin_benign" in str(err.value) and "trial x" in str(err.value)
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)


def test_errors_pickle_and_reasons_unwrap() -> None:
    err = TrialFailed("objective is nan after step 6")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is TrialFailed and str(back) == str(err)
    assert failure_reason(err) == "TrialFailed: objective is nan after step 6"
    wrapped = RuntimeError("ray wrapper\ntraceback ...")
    wrapped.cause = ValueError("NaN loss at step 3")
    assert failure_reason(wrapped) == "ValueError: NaN loss at step 3"


def test_reasons_unwrap_ray_train_worker_group_errors() -> None:
    """A NaN loss in a Train worker reaches the driver as WorkerGroupError(rank -> UserExceptionWithTraceback)."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    nan = FloatingPointError("non-finite loss at optimizer step 1: {'train/loss': nan}; lower train.lr")
    group = WorkerGroupError("rank 1 ...\nrank 0 ...", {
        1: UserExceptionWithTraceback(RuntimeError("gloo: connection reset"), "Traceback ...\nRuntimeError"),
        0: UserExceptionWithTraceback(nan, "Traceback (most recent call last):\n ...\nFloatingPointError: ...")})
    assert str(group).startswith("Training failed due to worker errors")  # what a naive reason would show
    expected = "FloatingPointError: non-finite loss at optimizer step 1: {'train/loss': nan}; lower train.lr"
    assert failure_reason(group) == expected
    assert failure_reason(pickle.loads(pickle.dumps(group))) == expected  # as it crosses process boundaries
    task = RayTaskError("run_trial", "Traceback ...", group)  # how Tune holds the driver's error
    assert failure_reason(task) == expected
    assert failure_reason(ControllerError(ValueError("controller broke"))) == "ValueError: controller broke"


@dataclass
class Evaluation:
    metrics: dict
    objective: float
    objectives: dict


def test_report_metrics() -> None:
    ev = Evaluation({"eval/asr/max": 0.25, "eval/mmlu": 0.3}, 0.05, {"asr": 0.25, "capability": 0.3})
    out = report_metrics({"train/loss": 1.5, "step": 4}, ev, step=4, final=False)
    assert out == {"train/loss": 1.5, "eval/asr/max": 0.25, "eval/mmlu": 0.3, "objective": 0.05,
                   "objectives/asr": 0.25, "objectives/capability": 0.3, "step": 4, "final": False}


def test_step_metrics_callback_logs_worker_zero_and_drops_nan(target, caplog) -> None:
    run_id = tracking.open_trial_run(target, "cb")
    callback = pickle.loads(pickle.dumps(StepMetricsCallback(target, run_id)))  # it travels to the controller
    for step, loss in ((1, 2.0), (2, math.nan), (3, 1.0)):
        with caplog.at_level(logging.WARNING, logger="crl_ray.sweep.tracking"):
            callback.after_report(None, [{"step": step, "train/loss": loss, "train/lr": 0.1},
                                         {"step": step, "train/loss": 99.0}], None)
    client = MlflowClient(tracking_uri=target.uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 2.0), (3, 1.0)]
    assert len(client.get_metric_history(run_id, "train/lr")) == 3
    assert "train/loss=nan" in caplog.text


def test_status_callback_ends_runs_the_driver_left_open(target, tmp_path) -> None:
    client = MlflowClient(tracking_uri=target.uri)
    callback = TrialStatusCallback(target)
    stopped, done = tracking.open_trial_run(target, "stopped"), tracking.open_trial_run(target, "done")
    callback.on_trial_complete(1, [], SimpleNamespace(trial_id="stopped", last_result={"final": False}))
    callback.on_trial_complete(1, [], SimpleNamespace(trial_id="done", last_result={"final": True}))
    assert client.get_run(stopped).data.tags[tracking.STATUS_TAG] == "stopped_early"
    assert client.get_run(done).data.tags[tracking.STATUS_TAG] == "completed"
    assert {client.get_run(r).info.status for r in (stopped, done)} == {"FINISHED"}
    # a trial that died before its driver opened a run still gets one, FAILED with the reason
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  ...\nValueError: NaN loss at step 3\n")
    callback.on_trial_error(1, [], SimpleNamespace(trial_id="crashed", error_file=str(error_file)))
    crashed = client.get_run(tracking.find_trial_run(target, "crashed"))
    assert crashed.info.status == "FAILED"
    assert crashed.data.tags[tracking.ERROR_TAG] == "ValueError: NaN loss at step 3"
