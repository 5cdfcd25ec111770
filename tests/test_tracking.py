"""MLflow bookkeeping on a real sqlite store in tmp_path (no Ray): URIs, parent/nested runs, params, metrics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from crl_ray.sweep import tracking


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs seconds of schema migrations)."""
    return tracking.tracking_uri(None, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture
def target(uri: str, tmp_path: Path, request) -> tracking.TrackingTarget:
    """A fresh experiment and parent run per test."""
    return tracking.open_sweep_run(uri, request.node.name, "sw", resume=False, commit="abc",
                                   artifact_dir=tmp_path / "art")


def test_tracking_uri_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None, tmp_path / "s") == f"sqlite:///{(tmp_path / 's').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert tracking.tracking_uri("http://other:1", tmp_path) == "http://other:1"
    command = tracking.ui_command("sqlite:////x/mlflow.db")
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db --host 127.0.0.1 --port 5000" in command
    exe = command.split()[0]
    assert exe == "mlflow" or Path(exe).is_file(), "the environment's own mlflow, runnable as printed"
    assert "http://127.0.0.1:5000" in tracking.ui_command("http://127.0.0.1:5000")
    # straight to the runs table (the experiment's root page is MLflow 3's GenAI trace overview)
    assert command.endswith("# then open http://127.0.0.1:5000")
    assert tracking.ui_command("sqlite:////x/mlflow.db", "7").endswith("http://127.0.0.1:5000/#/experiments/7/runs")
    assert "http://h:5000/#/experiments/7/runs in a browser" in tracking.ui_command("http://h:5000/", "7")
    assert tracking.ui_command("sqlite:////x/mlflow.db", "7", "crl_ray-smoke").endswith(
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=crl_ray-smoke")


def test_sweep_view_shows_the_trials_with_their_numbers(tmp_path) -> None:
    """The saved view (an experiment tag the MLflow UI reads for ?viewStateShareKey=): parent expanded, sorted
    by objective, the objective, ASR per attack, capability and sampled values as the first columns."""
    import json

    view = tracking.sweep_view("abc", ["direct", "embedding"], ["train.lr"])
    assert view["runsExpanded"] == {"abc": True} and view["orderByKey"] == "metrics.`objective`"
    assert view["orderByAsc"] is False and view["columnOrder"] == view["selectedColumns"]
    assert view["selectedColumns"][:5] == ["metrics.`objective`", "metrics.`feasible`", "metrics.`eval/asr/max`",
                                           "metrics.`eval/asr/direct`", "metrics.`eval/asr/embedding`"]
    assert "params.`sampled.train.lr`" in view["selectedColumns"] and "attributes.`Dataset`" in view["selectedColumns"]
    assert "metrics.`eval/helpful_benign`" in view["selectedColumns"]
    assert tracking.view_key("my sweep/1") == "crl_ray-my_sweep_1"
    target = tracking.open_sweep_run(f"sqlite:///{tmp_path / 'm.db'}", "exp", "s1", resume=False, commit="x")
    key = tracking.save_sweep_view(target, ["direct"], [])
    tags = target.client().get_experiment(target.experiment_id).tags
    assert json.loads(tags[tracking.VIEW_TAG_PREFIX + key])["runsExpanded"] == {target.parent_run_id: True}


def test_flatten_params_has_no_nested_values() -> None:
    cfg = {"loss": {"margin": 2.0, "layers": {"range": [3, 5]}, "cb": {}},
           "data": {"benign": [{"source": "a", "where": {"k": 1}}, {"source": "b"}]},
           "eval": {"attacks": ["direct", "prefill"], "limit": None}}
    flat = tracking.flatten_params(cfg)
    assert flat == {"loss.margin": "2.0", "loss.layers.range": "[3, 5]", "loss.cb": "{}",
                    "data.benign.0.source": "a", "data.benign.0.where.k": "1", "data.benign.1.source": "b",
                    "eval.attacks": '["direct", "prefill"]', "eval.limit": "None"}
    assert all(isinstance(v, str) for v in flat.values())


def test_finite_metrics_drop_nan_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="crl_ray.sweep.tracking"):
        out = tracking.finite_metrics({"a": 1, "b": math.nan, "c": math.inf, "d": "path", "e": True, "f": 0.5})
    assert out == {"a": 1.0, "f": 0.5}
    assert "b=nan" in caplog.text and "c=inf" in caplog.text


def test_parent_and_nested_runs_are_reused_not_duplicated(target, tmp_path) -> None:
    client = MlflowClient(tracking_uri=target.uri)
    exp = client.get_experiment(target.experiment_id)
    assert exp.artifact_location == (tmp_path / "art").resolve().as_uri()
    first = tracking.open_trial_run(target, "t1")
    run = client.get_run(first)
    assert run.data.tags[tracking.PARENT_TAG] == target.parent_run_id
    assert run.data.tags[tracking.TRIAL_TAG] == "t1" and run.data.tags[tracking.GIT_TAG] == "abc"
    tracking.end_run(target, first, "KILLED", "interrupted")
    # a restarted trial gets its run back, RUNNING again
    assert tracking.open_trial_run(target, "t1") == first
    assert client.get_run(first).info.status == "RUNNING"
    assert len(tracking.trial_runs(target)) == 1
    # a resumed sweep finds its parent; a new sweep of the same name gets a new one
    experiment = client.get_experiment(target.experiment_id).name
    resumed = tracking.open_sweep_run(target.uri, experiment, "sw", resume=True, commit="abc")
    assert resumed.parent_run_id == target.parent_run_id
    assert tracking.find_trial_run(resumed, "t1") == first
    fresh = tracking.open_sweep_run(target.uri, experiment, "sw", resume=False, commit="abc")
    assert fresh.parent_run_id != target.parent_run_id and tracking.find_trial_run(fresh, "t1") is None


def test_params_twice_metrics_and_status(target, caplog) -> None:
    client = MlflowClient(tracking_uri=target.uri)
    run_id = tracking.open_trial_run(target, "t2")
    params = {f"p{i}": str(i) for i in range(250)}  # more than one batch
    tracking.log_params(target, run_id, params)
    tracking.log_params(target, run_id, params)  # a resumed trial logs the same params again
    tracking.log_metrics(target, run_id, {"loss": 0.5, "bad": math.nan}, step=3)
    run = client.get_run(run_id)
    assert run.data.params == params
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    assert "bad" not in run.data.metrics
    tracking.end_run(target, run_id, "FAILED", "failed", "ValueError: boom")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.ERROR_TAG] == "ValueError: boom"
    assert run.data.tags[tracking.STATUS_TAG] == "failed"


def test_close_open_runs(target) -> None:
    client = MlflowClient(tracking_uri=target.uri)
    running, done = tracking.open_trial_run(target, "a"), tracking.open_trial_run(target, "b")
    tracking.end_run(target, done, "FINISHED", "completed")
    assert tracking.close_open_runs(target, interrupted=True) == 1
    assert client.get_run(running).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"
    again = tracking.open_trial_run(target, "a")
    assert tracking.close_open_runs(target, interrupted=False) == 1
    assert client.get_run(again).info.status == "FAILED"


def test_artifacts_and_generation_sample(target, tmp_path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("".join(f'{{"i": {i}}}\n' for i in range(20)))
    assert tracking.sample_records(records, tmp_path / "s.jsonl", 0) is None
    sample = tracking.sample_records(records, tmp_path / "s.jsonl", 3)
    assert sample.read_text().splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    run_id = tracking.open_trial_run(target, "t3")
    tracking.log_artifacts(target, run_id, [(adapter, "adapter"), (sample, "eval"), (tmp_path / "missing", None)])
    client = MlflowClient(tracking_uri=target.uri)
    assert [a.path for a in client.list_artifacts(run_id, "adapter")] == ["adapter/adapter_config.json"]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/s.jsonl"]
    assert (tmp_path / "art").is_dir()  # artifacts stay inside the sweep folder, not ./mlruns


def test_data_provenance_reaches_the_trial_run(target, tmp_path) -> None:
    """Every source's content pin (sha256, or the hub revision and the commit it resolved to) is a param of the
    trial's run, and the whole record an artifact."""
    import json

    from crl_ray.sweep.trial import log_data_provenance

    record = tmp_path / "provenance.json"
    record.write_text(json.dumps([
        {"path": "data.harmful[0]", "source": "advbench", "rows": 128, "answer": "generate", "sha256": "ab" * 32},
        {"path": "data.benign[1]", "source": "org/set", "rows": 9, "answer": "column", "revision": "v1",
         "resolved_revision": "c0ffee"}]))
    run_id = tracking.open_trial_run(target, "t-prov")
    log_data_provenance(target, run_id, record)
    client = MlflowClient(target.uri)
    params = client.get_run(run_id).data.params
    assert params["data.harmful.0.sha256"] == "ab" * 32 and params["data.harmful.0.rows"] == "128"
    assert params["data.benign.1.revision"] == "v1" and params["data.benign.1.resolved_revision"] == "c0ffee"
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/provenance.json"]


def test_experiment_opens_on_its_runs_not_on_traces(target) -> None:
    """MLflow 3's UI shows a GenAI trace overview unless the experiment says it is model development."""
    exp = MlflowClient(target.uri).get_experiment(target.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_training_and_evaluation_data_are_mlflow_dataset_inputs(target, tmp_path) -> None:
    import datasets

    from crl_ray.sweep.trial import log_trial_datasets
    from crl_ray.validate import load_config

    root = Path(__file__).resolve().parents[1]
    cfg, _ = load_config(root / "sweeps" / "smoke.yaml")
    for name, rows in (("benign", 3), ("harmful", 2), ("retain", 4)):
        datasets.Dataset.from_dict({"input_ids": [[1, 2]] * rows}).save_to_disk(str(tmp_path / name))
    run_id = tracking.open_trial_run(target, "t-data")
    log_trial_datasets(target, run_id, cfg, tmp_path)
    inputs = MlflowClient(target.uri).get_run(run_id).inputs.dataset_inputs
    got = {(i.dataset.name, [t.value for t in i.tags if t.key == "mlflow.data.context"][0]) for i in inputs}
    assert got == {("benign", "training"), ("harmful", "training"), ("retain", "training"),
                   (f"behaviors-{cfg.eval.behaviors.source}", "evaluation")}
    rows = {i.dataset.name: json.loads(i.dataset.profile)["num_rows"] for i in inputs}
    assert rows["harmful"] == 2 and rows["retain"] == 4
