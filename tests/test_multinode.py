"""Storage on a real two-node Ray cluster on this host: the second node runs in its own mount namespace with a
tmpfs over the head's storage folder, so (like a separate machine) it cannot see the head's local files.

The sweep must stop before any trial, exit status 2, naming storage.path and the fix, when a node cannot see
storage.path; a folder both nodes see passes. Skips (saying why) where mount namespaces are unavailable.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crl_ray import cluster

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


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


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (1 CPU) + a second node (1 CPU, resource `masked`) that sees a tmpfs over ``hidden``."""
    root = tmp_path_factory.mktemp("twonode")
    hidden = root / "head_only"
    why = _namespaces_work(root / "probe")
    if why:
        pytest.skip(why)
    hidden.mkdir()
    temp = Path(f"/tmp/crt{secrets.token_hex(3)}")  # short: Ray's unix sockets live under it
    port = _free_port()
    # token authentication off on every node and in this driver: a ~/.ray/auth_token switches it on for a head
    # started by `ray start`, while nodes joining without RAY_AUTH_MODE do not send the token
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0",
                                                                          "RAY_AUTH_MODE": "disabled"}
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    common = ["--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       check=True, capture_output=True, text=True, env=env, timeout=180)
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs tmpfs {hidden} && exec {RAY} start --address=127.0.0.1:{port} "
                        f"--resources='{{\"masked\": 1}}' " + " ".join(common)],
                       check=True, capture_output=True, text=True, env=env, timeout=180)
        import ray

        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert sum(n["Alive"] for n in ray.nodes()) == 2
        yield root, hidden, port
    finally:
        try:
            import ray

            ray.shutdown()
        finally:  # only this cluster's processes (never `ray stop`, which would stop every Ray on the host)
            subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
            shutil.rmtree(temp, ignore_errors=True)
            if saved_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved_mode


def test_a_folder_the_other_node_cannot_see_is_found_and_a_shared_one_passes(two_nodes) -> None:
    root, hidden, _ = two_nodes
    checked, missing = cluster.nodes_missing_folder(hidden / "crl_runs" / "smoke")
    import ray

    masked = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "masked" in n["Resources"])
    assert checked == 1 and len(missing) == 1 and masked[:8] in missing[0]
    problem = cluster.storage_problem(str(hidden / "crl_runs"), hidden / "crl_runs" / "smoke", can_grow=False)
    assert "storage.path" in problem and "not visible on node(s)" in problem and "same path" in problem
    shared = root / "shared" / "smoke"
    assert cluster.nodes_missing_folder(shared) == (1, [])
    assert cluster.storage_problem(str(root / "shared"), shared, can_grow=False) is None
    assert not any(p.name.startswith(".storage-check") for p in shared.iterdir())  # the marker is removed


def test_sweep_on_a_head_only_folder_stops_before_any_trial_with_exit_2(two_nodes, capsys) -> None:
    from crl_ray import sweep

    root, hidden, port = two_nodes
    smoke = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
    code = sweep.main([str(smoke), f"storage.path={hidden / 'crl_runs'}", f"resources.ray_address=127.0.0.1:{port}",
                       "search.num_trials=2", "train.steps=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "storage.path" in err and "not visible on node(s)" in err and "NFS" in err
    assert not (hidden / "crl_runs" / "smoke" / "tune").exists()  # no trial was started
