"""MLflow for a sweep: one parent run per sweep, one nested run per trial, found again by tags on resume.

Who writes what (the Ray callbacks are in crl_ray.sweep.trial; this module imports neither Ray nor, until used, MLflow):
  - the sweep process: the parent run, its summary artifacts, and the final status of trial runs whose trial
    ended without saying so itself (stopped by the scheduler, killed, interrupted);
  - the trial driver: its run's params, evaluation metrics and artifacts, and FINISHED/FAILED when it ends;
  - the Ray Train controller: per-step training metrics of worker 0.
All of them run on the head node (drivers are pinned there), so a tracking server bound to 127.0.0.1 works.
Every writer goes through :class:`TrackingTarget` (URI + ids), which pickles across Ray processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

SWEEP_TAG = "crl_ray.sweep"
ROLE_TAG = "crl_ray.role"  # "sweep" (parent) or "trial"
TRIAL_TAG = "crl_ray.trial_id"
STATUS_TAG = "crl_ray.status"  # running, completed, stopped_early, failed, interrupted
ERROR_TAG = "crl_ray.error"
PARENT_TAG = "mlflow.parentRunId"
GIT_TAG = "mlflow.source.git.commit"
MAX_BATCH = 100  # MLflow's limit of params per log_batch call
MAX_PARAM_CHARS = 6000


def tracking_uri(mlflow_uri: str | None, sweep_dir: Path) -> str:
    """The sweep's tracking URI: mlflow.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite in the sweep folder."""
    if mlflow_uri:
        return mlflow_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(sweep_dir).resolve() / 'mlflow.db'}"


VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the MLflow UI opens the view stored in this experiment tag for
# ``#/experiments/<id>/runs?viewStateShareKey=<key>`` (a JSON view state: columns, expanded runs, sort order)


def view_key(sweep: str) -> str:
    return "crl_ray-" + re.sub(r"[^A-Za-z0-9_.-]", "_", sweep)


def sweep_view(parent_run_id: str, attacks: list[str], sampled: list[str]) -> dict[str, Any]:
    """The sweep's saved view of the runs table: its parent run expanded (the trials visible), sorted by objective,
    with the objective, feasibility, ASR per attack, capability, over-refusal, degeneracy, helpfulness, KL and the
    sampled values as columns, and the Dataset column."""
    metrics = ["objective", "feasible", "eval/asr/max", *[f"eval/asr/{a}" for a in attacks], "eval/capability",
               "eval/over_refusal", "eval/degeneracy", "eval/helpful_benign", "eval/kl_benign"]
    columns = ([f"metrics.`{m}`" for m in metrics] + [f"params.`sampled.{k}`" for k in sampled]
               + ["attributes.`Dataset`"])
    return {"selectedColumns": columns, "columnOrder": columns, "runsExpanded": {parent_run_id: True},
            "orderByKey": "metrics.`objective`", "orderByAsc": False}


def save_sweep_view(target: TrackingTarget, attacks: list[str], sampled: list[str]) -> str:
    """Store :func:`sweep_view` in the experiment; returns its key (for :func:`ui_command`)."""
    key = view_key(target.sweep)
    target.client().set_experiment_tag(target.experiment_id, VIEW_TAG_PREFIX + key,
                                       json.dumps(sweep_view(target.parent_run_id, attacks, sampled)))
    return key


def ui_command(uri: str, experiment_id: str = "", view: str | None = None) -> str:
    """The command (or address) that shows the sweep's runs in the MLflow UI: the experiment's runs table
    (``#/experiments/<id>/runs``; the experiment's root page opens on MLflow 3's GenAI trace overview), in the
    sweep's saved view when ``view`` names one."""
    page = f"/#/experiments/{experiment_id}/runs" if experiment_id else ""
    if page and view:
        page += f"?viewStateShareKey={view}"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page} in a browser (on a cluster: forward the port first, see docs/CLUSTER.md)"
    exe = Path(sys.executable).with_name("mlflow")  # the mlflow of this environment (e.g. .venv/bin/mlflow)
    mlflow = str(exe) if exe.is_file() else "mlflow"
    return (f"{mlflow} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
            f"# then open http://127.0.0.1:5000{page}")


def git_commit() -> str:
    """Commit of the crl_ray checkout ('+dirty' when it has local changes), or 'unknown' outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class TrackingTarget:
    """Where a sweep's runs live; small and picklable, handed to trial drivers and Train controllers."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    git_commit: str

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def _escape(value: str) -> str:
    return value.replace("'", "\\'")


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def open_sweep_run(uri: str, experiment: str, sweep: str, *, resume: bool, commit: str,
                   artifact_dir: Path | None = None) -> TrackingTarget:
    """Create the sweep's parent run, or on resume reopen the newest one tagged with this sweep name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = artifact_dir.resolve().as_uri() if artifact_dir is not None and not uri.startswith("http") else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
        # MLflow 3's UI opens a GenAI experiment on its traces ("Traces 0"); a model-training one on its runs
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    run_id = None
    if resume:
        found = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{_escape(sweep)}' and "
                                   f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"],
                                   max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, STATUS_TAG, "running")
    if run_id is None:
        run = client.create_run(experiment_id, run_name=sweep, tags={
            SWEEP_TAG: sweep, ROLE_TAG: "sweep", GIT_TAG: commit, STATUS_TAG: "running"})
        run_id = run.info.run_id
    return TrackingTarget(uri, experiment_id, run_id, sweep, commit)


def find_trial_run(target: TrackingTarget, trial_id: str) -> str | None:
    """The run id of a trial's nested run, or None."""
    found = target.client().search_runs(
        [target.experiment_id], f"tags.`{PARENT_TAG}` = '{target.parent_run_id}' and "
        f"tags.`{TRIAL_TAG}` = '{_escape(trial_id)}'", max_results=1)
    return found[0].info.run_id if found else None


def open_trial_run(target: TrackingTarget, trial_id: str) -> str:
    """The trial's nested run, created once and reopened (RUNNING) when the trial restarts or resumes."""
    client = target.client()
    run_id = find_trial_run(target, trial_id)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, STATUS_TAG, "running")
        return run_id
    run = client.create_run(target.experiment_id, run_name=f"trial-{trial_id}", tags={
        PARENT_TAG: target.parent_run_id, SWEEP_TAG: target.sweep, ROLE_TAG: "trial", TRIAL_TAG: trial_id,
        GIT_TAG: target.git_commit, STATUS_TAG: "running"})
    return run.info.run_id


def trial_runs(target: TrackingTarget) -> list:
    """Every nested run of the sweep's parent run (mlflow Run objects)."""
    return target.client().search_runs([target.experiment_id], f"tags.`{PARENT_TAG}` = '{target.parent_run_id}'",
                                       max_results=10_000)


def flatten_params(data: Any, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> strings: nested mappings and lists of mappings are flattened, other lists become JSON."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        if not data and prefix:
            out[prefix] = "{}"
        for key, value in data.items():
            out.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten_params(value, f"{prefix}.{i}"))
    else:
        text = json.dumps(data) if isinstance(data, (list, tuple)) else str(data)
        out[prefix] = text[:MAX_PARAM_CHARS]
    return out


def finite_metrics(metrics: dict[str, Any], where: str = "") -> dict[str, float]:
    """Numeric metrics as floats; NaN/inf are dropped with a warning, non-numbers (paths, flags) ignored."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            log.warning("dropping non-finite metric %s=%s%s", key, value, f" ({where})" if where else "")
            continue
        out[key] = float(value)
    return out


def log_params(target: TrackingTarget, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (MLflow accepts the same value twice, so a resumed trial may log again)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    client = target.client()
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, params=items[i:i + MAX_BATCH])


def log_metrics(target: TrackingTarget, run_id: str, metrics: dict[str, Any], step: int, where: str = "") -> None:
    """Log finite metrics at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in finite_metrics(metrics, where).items()]
    client = target.client()
    for i in range(0, len(items), MAX_BATCH * 10):
        client.log_batch(run_id, metrics=items[i:i + MAX_BATCH * 10])


def end_run(target: TrackingTarget, run_id: str, status: str, state: str, error: str | None = None) -> None:
    """Set a run's final MLflow status (FINISHED/FAILED/KILLED) and crl_ray status tag (and error reason)."""
    client = target.client()
    client.set_tag(run_id, STATUS_TAG, state)
    if error:
        client.set_tag(run_id, ERROR_TAG, error[:5000])
    client.set_terminated(run_id, status=status)


def close_open_runs(target: TrackingTarget, *, interrupted: bool) -> int:
    """End trial runs still RUNNING when the sweep stops (KILLED if interrupted, else FAILED); returns how many."""
    closed = 0
    for run in trial_runs(target):
        if run.info.status == "RUNNING":
            if interrupted:
                end_run(target, run.info.run_id, "KILLED", "interrupted")
            else:
                end_run(target, run.info.run_id, "FAILED", "failed", "the trial ended without reporting a status")
            closed += 1
    return closed


def log_artifacts(target: TrackingTarget, run_id: str, files: Iterable[tuple[Path, str | None]]) -> None:
    """Log files or folders (path, artifact sub-folder); missing paths are skipped with a warning."""
    client = target.client()
    for path, sub in files:
        path = Path(path)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), sub)
        elif path.is_file():
            client.log_artifact(run_id, str(path), sub)
        else:
            log.warning("artifact %s does not exist; not logged", path)


def sample_records(records: Path, out: Path, n: int) -> Path | None:
    """The first ``n`` evaluation records (prompt, generation, verdict) as a small JSONL, or None."""
    if n <= 0 or not records.is_file():
        return None
    lines: list[str] = []
    with records.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line if line.endswith("\n") else line + "\n")
            if len(lines) >= n:
                break
    out.write_text("".join(lines), encoding="utf-8")
    return out


def trial_error(trial) -> str:
    """The last line of a failed Tune trial's error (the exception type and message)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1].strip()
    return "the trial failed (no error file)"


def log_datasets(target: TrackingTarget, run_id: str, datasets: dict[str, Any], context: str,
                 source: str) -> None:
    """Record Hugging Face datasets as the run's MLflow inputs (the UI's Dataset column; name, digest, schema,
    row count), tagged with their context ("training" or "evaluation")."""
    import warnings

    from mlflow.data.huggingface_dataset import from_huggingface
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    # MLflow cannot infer a column schema for token-id lists and warns about it once per column and call (dozens
    # of lines per trial); the dataset is recorded all the same, without a schema
    schema_log = logging.getLogger("mlflow.data.huggingface_dataset")
    level = schema_log.level
    schema_log.setLevel(logging.ERROR)
    try:
        for name, ds in datasets.items():
            with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local folder anyway
                warnings.simplefilter("ignore", UserWarning)
                dataset = from_huggingface(ds, name=name, source=source)
                entity = dataset._to_mlflow_entity()
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)]))
    finally:
        schema_log.setLevel(level)
    target.client().log_inputs(run_id, datasets=inputs)
