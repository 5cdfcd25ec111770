"""Storage on a real two-node Ray cluster on this host: the second node runs in its own mount namespace with a
tmpfs over the head's run folder and its caches, so (like a separate machine) it cannot see the head's local files.
The head has 1 CPU and every trial task needs 2, so the head holds the trial drivers only.

- storage.path on the head's own disk: the sweep stops before any trial, exit status 2, naming storage.path and
  the fix;
- a folder both nodes see passes the same check;
- an S3 bucket (moto's server on 127.0.0.1, reached through AWS_ENDPOINT_URL): the reduced smoke sweep (2 trials x
  2 steps, a small evaluation) is interrupted after its first trial and resumed, and completes, with its files
  where docs/CLUSTER.md says; and the worker node killed mid-training, the trial resumes from its checkpoint.

Skips (saying why) where mount namespaces are unavailable.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.s3server import s3_server

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "crl-twonode"
SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


@dataclass(frozen=True)
class Cluster:
    root: Path  # both nodes see it
    hidden: Path  # the head's run folder: the worker node sees an empty tmpfs there
    port: int
    env: dict[str, str]  # for processes that join the cluster (drivers)
    temp: Path  # Ray's temp folder (both nodes)
    start_worker_node: Callable[[], None]




def _namespaces_work(probe: Path) -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs tmpfs {probe}"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"cannot make a mount namespace here: {done.stderr.strip()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _driver(code: str, port: int, env: dict[str, str], timeout: float = 300) -> object:
    """Run ``code`` (which sets ``result``) in a fresh Python process connected to the test cluster; returns
    ``result`` (JSON). Nothing in the pytest process joins the cluster: its token-authentication setting (off, see
    the fixture) would stay cached in this process's Ray and break the local Ray of later tests."""
    script = ("import json, ray\n"
              f"ray.init(address='127.0.0.1:{port}', logging_level='WARNING')\n"
              f"{code}\n"
              "print('RESULT=' + json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT=")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT="))


def _alive_workers(cluster: Cluster | None = None, *, port: int = 0, env: dict[str, str] | None = None) -> int:
    port, env = (cluster.port, cluster.env) if cluster is not None else (port, env)
    return int(_driver("result = sum(1 for n in ray.nodes() if n['Alive'] and 'masked' in n['Resources'])",
                       port, env, timeout=120))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (1 CPU: trial drivers only, every trial task needs 2) + a worker node (2 CPUs, resource `masked`) in its
    own mount namespace with tmpfs over ``hidden`` (the head's run folder) and over ~/.cache (model, asset and pip
    caches), so it sees none of the head's run files and fetches its own assets, like another machine; an
    S3-compatible server on 127.0.0.1 that both reach (AWS_* variables)."""
    root = tmp_path_factory.mktemp("twonode")
    hidden = root / "head_only"
    why = _namespaces_work(root / "probe")
    if why:
        pytest.skip(why)
    hidden.mkdir()
    caches = Path.home() / ".cache"
    caches.mkdir(exist_ok=True)
    temp = Path(f"/tmp/crt{secrets.token_hex(3)}")  # short: Ray's unix sockets live under it; outside HOME
    port = _free_port()
    with s3_server(BUCKET) as aws:
        # token authentication off on every node and in every driver: a ~/.ray/auth_token switches it on for a
        # head started by `ray start`, while nodes joining without RAY_AUTH_MODE do not send the token
        env = ({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CRL_RAY_CACHE")}
               | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"} | aws)
        common = [f"--temp-dir={temp}", "--disable-usage-stats"]
        try:
            subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", "--num-cpus=1",
                            *common], check=True, capture_output=True, text=True, env=env, timeout=180)

            def start_worker_node() -> None:  # a fresh mount namespace each time: empty run folder and caches
                subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                f"mount -t tmpfs tmpfs {hidden} && mount -t tmpfs tmpfs {caches} && exec {RAY} "
                                f"start --address=127.0.0.1:{port} --num-cpus=2 --resources='{{\"masked\": 1}}' "
                                + " ".join(common)],
                               check=True, capture_output=True, text=True, env=env, timeout=180)
                deadline = time.monotonic() + 60
                while _alive_workers(port=port, env=env) < 1 and time.monotonic() < deadline:
                    time.sleep(1)
                assert _alive_workers(port=port, env=env) == 1

            start_worker_node()
            yield Cluster(root, hidden, port, env, temp, start_worker_node)
        finally:  # only this cluster's processes (never `ray stop`, which would stop every Ray on the host)
            subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
            shutil.rmtree(temp, ignore_errors=True)


def test_a_folder_the_other_node_cannot_see_is_found_and_a_shared_one_passes(two_nodes) -> None:
    root, hidden = two_nodes.root, two_nodes.hidden
    shared = root / "shared" / "smoke"
    result = _driver(f"""
from pathlib import Path
from crl_ray.sweep import cluster
hidden, shared = Path({str(hidden)!r}), Path({str(shared)!r})
result = {{
    "masked": next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "masked" in n["Resources"]),
    "hidden": cluster.nodes_missing_folder(hidden / "crl_runs" / "smoke"),
    "hidden_problem": cluster.storage_problem(str(hidden / "crl_runs"), hidden / "crl_runs" / "smoke",
                                              can_grow=False),
    "shared": cluster.nodes_missing_folder(shared),
    "shared_problem": cluster.storage_problem(str(shared.parent), shared, can_grow=False),
}}""", two_nodes.port, two_nodes.env)
    checked, missing = result["hidden"]
    assert checked == 1 and len(missing) == 1 and result["masked"][:8] in missing[0]
    problem = result["hidden_problem"]
    assert "storage.path" in problem and "not visible on node(s)" in problem and "same path" in problem
    assert result["shared"] == [1, []] and result["shared_problem"] is None
    assert not any(p.name.startswith(".storage-check") for p in shared.iterdir())  # the marker is removed


def test_sweep_on_a_head_only_folder_stops_before_any_trial_with_exit_2(two_nodes) -> None:
    hidden, port = two_nodes.hidden, two_nodes.port
    done = subprocess.run([sys.executable, "-m", "crl_ray.sweep", str(SMOKE), f"storage.path={hidden / 'crl_runs'}",
                           f"resources.ray_address=127.0.0.1:{port}", "search.num_trials=2", "train.steps=2"],
                          capture_output=True, text=True, env=two_nodes.env, timeout=600, cwd=SMOKE.parents[1])
    assert done.returncode == 2, done.stderr[-3000:]
    assert "storage.path" in done.stderr and "not visible on node(s)" in done.stderr and "NFS" in done.stderr
    assert not (hidden / "crl_runs" / "smoke" / "tune").exists()  # no trial was started


# ------------------------------------------------------------------------------------------ the reduced smoke sweep
NAME = "smoke2"


def reduced_smoke(folder: Path, storage: str, head_path: Path | None, name: str = NAME, steps: int = 2) -> Path:
    """sweeps/smoke.yaml reduced: 2 trials x 2 steps, one worker x 2 CPUs, 8 rows per data source, a 2-behaviour
    direct-attack evaluation with the keyword judge (the probe judge would be fitted on the worker node first:
    minutes; the judge is not what this test checks)."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["name"] = name
    for group in ("benign", "harmful", "retain"):
        for source in cfg["data"][group]:
            source["limit"] = 8
    cfg["data"]["generation"]["max_new_tokens"] = 16
    cfg["train"].update(steps=steps, checkpoint_every=1, log_every=1)
    cfg["resources"] = {"num_workers": 1, "cpus_per_worker": 2, "max_concurrent_trials": 1}
    cfg["eval"].update(limit=2, attacks=["direct"], max_new_tokens=16, judge="keyword", over_refusal_limit=2,
                       kl_limit=2, mmlu={"subset_size": 4, "shots": 0})
    cfg["eval"].pop("embedding", None)
    cfg["search"]["num_trials"] = 2
    cfg["mlflow"] = {"experiment": "twonode"}
    cfg["storage"] = {"path": storage, **({"head_path": str(head_path)} if head_path else {})}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _wait_for_a_finished_trial(process: subprocess.Popen, state: Path, timeout_s: float) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(state.glob("trials/*/eval-step2/summary.json"))
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"the sweep ended before a trial finished:\n{process.stdout.read()[-6000:]}")
        time.sleep(2)
    process.kill()
    pytest.fail(f"no trial finished in {timeout_s:.0f} s:\n{process.stdout.read()[-6000:]}")


def _runs(state: Path, experiment: str = "twonode"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(experiment)
    return client.search_runs([experiment.experiment_id])


def test_reduced_smoke_sweep_interrupted_resumes_and_completes(two_nodes, tmp_path) -> None:
    """Trial files in the bucket, the sweep's state in a folder only the head sees: Ctrl-C after one finished trial,
    the same command again resumes without redoing it and finishes. (A folder both nodes see is the local-folder
    path of tests/test_sweep.py's resume tests, plus the visibility check of the first test here; its two-node
    variant ran here until session 11: 271 s of CI for no code path of its own.)"""
    from crl_ray.storage import Store

    storage, head = f"s3://{BUCKET}/runs", two_nodes.hidden / "state"
    trial_files = Store(f"{storage}/{NAME}")
    state = head / NAME
    file = reduced_smoke(tmp_path, storage, head)
    argv = [sys.executable, "-m", "crl_ray.sweep", str(file), f"resources.ray_address=127.0.0.1:{two_nodes.port}"]
    env = two_nodes.env | {"PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=SMOKE.parents[1])
    summary = _wait_for_a_finished_trial(first, state, timeout_s=900)
    time.sleep(10)  # the driver reports to Tune after writing its evaluation
    first.send_signal(signal.SIGINT)
    out_first = first.communicate(timeout=300)[0]
    assert first.returncode == 130, out_first[-6000:]
    finished_id = summary.parents[1].name
    stamp = summary.stat().st_mtime_ns

    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200, cwd=SMOKE.parents[1])
    wall = time.monotonic() - started
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "resuming it" in out
    print(f"\ns3: interrupted after trial {finished_id}, resumed, finished in {wall:.0f} s")
    # nothing of the interrupted run still holds the worker node (a leaked placement group hung CI at stop 17)
    assert _driver("from crl_ray.sweep.cluster import orphaned, placement_group_records\n"
                   "result = [g.id for g in orphaned(*placement_group_records())]", two_nodes.port, two_nodes.env) == []

    assert summary.stat().st_mtime_ns == stamp  # the finished trial was not evaluated again
    trials = sorted(p.name for p in (state / "trials").iterdir())
    assert len(trials) == 2 and finished_id in trials
    # the training data, prepared once by the worker node for both trials (same data, other lr / margin)
    data = [name for name in trial_files.list("train") if name.startswith("data-")]
    assert len(data) == 1, trial_files.list("train")
    copy = trial_files.read_text("train", data[0], "prepared")
    assert "provenance.json" in trial_files.list("train", data[0], copy)
    for trial in trials:  # what the worker node wrote, in the storage every node reaches
        run = f"train-{trial}"
        assert "adapter_model.safetensors" in trial_files.list("train", run, "checkpoint_step000002", "adapter")
        assert (state / "trials" / trial / "eval-step2" / "records.jsonl").is_file()  # returned to the driver
        assert "records.jsonl" in trial_files.list("trials", trial, "eval-step2")
    assert not (state / "train").exists()  # nothing of the trials' files on the head's disk
    assert (state / "tune").is_dir() and (state / "optuna.db").is_file()
    runs = _runs(state)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3, [(r.info.run_name, r.info.status) for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2 and all("eval/asr/direct" in r.data.metrics for r in children)
    assert all(any(k.startswith("data.") and k.endswith(".sha256") for k in r.data.params) for r in children)


def _worker_raylet() -> int:
    found = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in found
            if "masked" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")]
    assert len(pids) == 1, f"expected one raylet with the `masked` resource, found {pids}"
    return pids[0]


def test_a_worker_node_killed_mid_training_resumes_from_its_checkpoint(two_nodes, tmp_path) -> None:
    """SIGKILL of the worker node's raylet once trial 1 has a checkpoint (step 1 of 4): the trial waits for a node,
    one is started again (fresh caches), training resumes from the checkpoint in the bucket, and the sweep
    finishes both trials; no MLflow run is left RUNNING. (A trial that cannot resume must fail with its reason in
    MLflow: the test accepts that outcome only with the reason recorded, and prints which one happened.)"""
    from crl_ray.storage import Store

    name = "fault"
    storage, state = f"s3://{BUCKET}/faults", two_nodes.hidden / "fault-state" / name
    file = reduced_smoke(tmp_path, storage, state.parent, name=name, steps=4)
    trial_files = Store(f"{storage}/{name}")
    argv = [sys.executable, "-m", "crl_ray.sweep", str(file), f"resources.ray_address=127.0.0.1:{two_nodes.port}"]
    log_file = tmp_path / "sweep.log"
    with open(log_file, "w") as out:
        sweep = subprocess.Popen(argv, env=two_nodes.env | {"PYTHONUNBUFFERED": "1"}, stdout=out,
                                 stderr=subprocess.STDOUT, text=True, cwd=SMOKE.parents[1])
        deadline = time.monotonic() + 900
        checkpoint = None
        while checkpoint is None and time.monotonic() < deadline:
            assert sweep.poll() is None, log_file.read_text()[-6000:]
            for run in trial_files.list("train"):
                if ".complete_rank0" in trial_files.list("train", run, "checkpoint_step000001"):
                    checkpoint = run
            time.sleep(1)
        assert checkpoint, "no checkpoint in 900 s:\n" + log_file.read_text()[-6000:]
        os.kill(_worker_raylet(), signal.SIGKILL)
        killed_at = time.monotonic()
        while _alive_workers(two_nodes) and time.monotonic() - killed_at < 180:  # until the cluster has noticed
            time.sleep(1)
        assert _alive_workers(two_nodes) == 0
        two_nodes.start_worker_node()
        code = sweep.wait(timeout=1200)
    text = log_file.read_text()
    assert code == 0, text[-6000:]
    runs = _runs(state, "twonode")
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    killed = next(r for r in runs if r.info.run_name == f"trial-{checkpoint.removeprefix('train-')}")
    others = [r for r in runs if r.data.tags.get("mlflow.parentRunId") and r is not killed]
    assert len(others) == 1 and others[0].info.status == "FINISHED"
    if killed.info.status == "FINISHED":
        assert "resumed from" in text and "at step 1" in text, text[-6000:]
        assert "checkpoint_step000004" in trial_files.list("train", checkpoint)
        outcome = "resumed from its step-1 checkpoint and finished"
    else:
        assert killed.info.status == "FAILED" and killed.data.tags.get("crl_ray.error"), killed.data.tags
        outcome = f"failed cleanly: {killed.data.tags['crl_ray.error'][:200]}"
    print(f"\nfault: raylet killed at step 1; trial {outcome}; sweep done {time.monotonic() - killed_at:.0f} s "
          "after the kill")
