"""Offline checks of the Ray cluster-launcher configs (there is no `ray up --dry-run`).

* cluster.yaml and the full YAML blocks in docs/CLUSTER.md (GCP, on-prem `local`) validate against the
  JSON schema shipped in the installed Ray wheel, and pass Ray's own offline preparation and checks
  (`prepare_config` + `validate_config`, the first steps of `ray up`).
* Deliberately broken copies fail, so the check can fail.
* Security and setup properties: MLflow and the dashboard bind 127.0.0.1, no public ingress for
  5000/8265, the project is synced and installed on every node, no literal tokens.
* Every `mlflow server` / `ray start` flag used exists in the installed versions, and the exact
  MLflow command starts a server that answers on 127.0.0.1 only.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
CLUSTER_DOC = REPO / "docs" / "CLUSTER.md"
SCHEMA_PATH = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"

PUBLIC_CIDRS = {"0.0.0.0/0", "::/0"}
PRIVATE_PORTS = (5000, 8265)  # MLflow, Ray dashboard / job API


# ---------------------------------------------------------------- helpers


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def schema_errors(config: dict) -> list[str]:
    schema = load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def ray_prepare_and_validate(config: dict) -> dict:
    """What `ray up` does before it talks to any cloud: merge the provider's defaults.yaml, fill node-type
    min/max workers, then validate (schema + head_node_type + min/max workers + cluster_synced_files)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def doc_yaml_blocks() -> list[dict]:
    text = CLUSTER_DOC.read_text()
    blocks = re.findall(r"^```ya?ml[ \t]*\n(.*?)^```", text, flags=re.M | re.S)
    return [yaml.safe_load(b) for b in blocks]


def doc_variants() -> dict[str, dict]:
    """Full configs from docs/CLUSTER.md keyed by provider type; a partial block (no cluster_name) is
    laid over cluster.yaml's top-level keys."""
    base = load_cluster()
    out: dict[str, dict] = {}
    for block in doc_yaml_blocks():
        assert isinstance(block, dict), block
        config = block if "cluster_name" in block else {**base, **block}
        out[config["provider"]["type"]] = config
    return out


def all_configs() -> list[tuple[str, dict]]:
    return [("cluster.yaml", load_cluster())] + [
        (f"docs:{k}", v) for k, v in doc_variants().items()
    ]


def command_lists(config: dict) -> list[str]:
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    cmds = [c for k in keys for c in config.get(k, [])]
    for nt in config.get("available_node_types", {}).values():
        cmds += nt.get("initialization_commands", []) + nt.get("worker_setup_commands", [])
    return cmds


def mlflow_server_command(config: dict) -> str:
    hits = [c for c in config.get("head_start_ray_commands", []) if "mlflow server" in c]
    assert len(hits) == 1, hits
    return hits[0]


def ray_head_start_command(config: dict) -> str:
    hits = [c for c in config["head_start_ray_commands"] if re.search(r"\bray start\b.*--head", c)]
    assert len(hits) == 1, hits
    return hits[0]


def option_value(command: str, option: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(option)}(?:=|\s+)(\S+)", command)
    return m.group(1) if m else None


def used_options(command: str, program: str) -> set[str]:
    """Long options given to `program` (e.g. 'mlflow server') within a shell command."""
    tail = command.split(program, 1)[1]
    tail = re.split(r"[;&|<>]", tail, maxsplit=1)[0]  # stop at the first shell operator / redirect
    return {tok.split("=", 1)[0] for tok in shlex.split(tail) if tok.startswith("--")}


def click_options(cmd) -> set[str]:
    return {o for p in cmd.params for o in list(p.opts) + list(p.secondary_opts)}


def public_ingress_violations(config: dict) -> list[str]:
    """Security-group rules that open MLflow or the dashboard port to the whole internet."""
    perms = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    bad = []
    for rule in perms:
        proto = str(rule.get("IpProtocol", "tcp"))
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        all_ports = proto == "-1" or (lo in (-1, None) and hi in (-1, None))
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if not cidrs & PUBLIC_CIDRS:
            continue
        for port in PRIVATE_PORTS:
            if all_ports or (lo is not None and hi is not None and lo <= port <= hi):
                bad.append(f"port {port} open to {sorted(cidrs & PUBLIC_CIDRS)} by {rule}")
    return bad


# ---------------------------------------------------------------- schema: cluster.yaml + doc variants


def test_schema_is_the_installed_draft7_schema():
    schema = load_schema()
    assert schema["$schema"].startswith("http://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_config_matches_ray_schema(name, config):
    assert schema_errors(config) == []


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_config_passes_ray_offline_preparation(name, config):
    prepared = ray_prepare_and_validate(config)
    assert prepared["cluster_name"] == "crl-ray"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_docs_have_gcp_and_local_variants():
    assert set(doc_variants()) >= {"gcp", "local"}


def test_local_variant_follows_local_provider_rules():
    local = doc_variants()["local"]
    assert "available_node_types" not in local  # Ray aborts `ray up` otherwise
    assert {"head_ip", "worker_ips"} <= set(local["provider"])


# ---------------------------------------------------------------- cluster.yaml content


def test_cluster_basics():
    c = load_cluster()
    assert c["cluster_name"] == "crl-ray"
    assert c["provider"]["type"] == "aws"
    assert c["provider"]["region"]
    assert isinstance(c["max_workers"], int) and c["max_workers"] >= 1
    assert c["idle_timeout_minutes"] > 0
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != c["head_node_type"]}
    gpu_workers = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "need at least one GPU worker type"
    assert any(v.get("max_workers", 0) >= 1 for v in gpu_workers.values())
    assert sum(v.get("min_workers", 0) for v in workers.values()) <= c["max_workers"]
    for name, nt in types.items():
        assert nt["node_config"].get("InstanceType"), name
        assert nt["node_config"].get("ImageId"), name  # Ray's built-in default AMI is an Ubuntu 18.04 DLAMI
        for res, qty in nt["resources"].items():
            assert type(qty) is int and qty >= 0, (name, res, qty)
    # One image everywhere: Ray refuses nodes whose Python version differs from the head's.
    assert len({nt["node_config"]["ImageId"] for nt in types.values()}) == 1
    assert "GPU" not in head["resources"] or head["resources"]["GPU"] == 0


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_setup_syncs_and_installs_project(name, config):
    assert config["file_mounts"].get("~/crl_ray") == "."
    setup = " \n".join(config["setup_commands"])
    # every node installs the project and Ray under the committed constraints (the same versions everywhere)
    assert re.search(r"pip install -c ~/crl_ray/crl_ray/resources/constraints.txt -e ~/crl_ray\b", setup)
    assert re.search(r'pip install -c ~/crl_ray/crl_ray/resources/constraints.txt "ray\[default\]==\d', setup), \
        "pin Ray so it matches the local launcher"
    # the venv must be active in the shells that run ray/mlflow/pip
    assert any("crl_venv/bin/activate" in c and ".bashrc" in c for c in config["setup_commands"])


def test_aws_head_still_installs_boto3():
    # head_setup_commands replaces Ray's default list, which is where boto3 comes from.
    c = load_cluster()
    assert any(re.search(r"pip install\b.*\bboto3\b", cmd) for cmd in c["head_setup_commands"])


def test_gcp_head_installs_google_api_client():
    gcp = doc_variants()["gcp"]
    assert any("google-api-python-client" in cmd for cmd in gcp["head_setup_commands"])


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_mlflow_server_binds_localhost_only(name, config):
    cmd = mlflow_server_command(config)
    assert option_value(cmd, "--host") == "127.0.0.1"
    assert option_value(cmd, "--port") == "5000"
    assert option_value(cmd, "--backend-store-uri").startswith("sqlite:///")
    assert option_value(cmd, "--artifacts-destination")
    assert "nohup" in cmd and cmd.rstrip().endswith("&"), "must not block ray start"
    # after ray start --head
    cmds = config["head_start_ray_commands"]
    assert cmds.index(cmd) > cmds.index(ray_head_start_command(config))
    # the driver on the head finds the server
    assert any(
        "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in c for c in config["head_setup_commands"]
    )


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_dashboard_binds_localhost_only(name, config):
    cmd = ray_head_start_command(config)
    assert option_value(cmd, "--dashboard-host") == "127.0.0.1"
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cmd
    for c in command_lists(config):
        assert "0.0.0.0" not in c, c


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_no_public_ingress_for_mlflow_or_dashboard(name, config):
    assert public_ingress_violations(config) == []


@pytest.mark.parametrize(
    "rule",
    [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"FromPort": 4000, "ToPort": 6000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    ],
)
def test_ingress_check_catches_public_rules(rule):
    c = load_cluster()
    c["provider"]["security_group"] = {"GroupName": "x", "IpPermissions": [rule]}
    assert schema_errors(c) == []  # the schema does not care ...
    assert public_ingress_violations(c)  # ... so this test has to


def test_ingress_check_allows_private_rules():
    c = load_cluster()
    c["provider"]["security_group"] = {
        "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
            {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        ]
    }
    assert public_ingress_violations(c) == []


def test_no_literal_secrets():
    for path in (CLUSTER_YAML, CLUSTER_DOC):
        text = path.read_text()
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), path
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path
        assert not re.search(r"HF_TOKEN=(?![.$<]|\.\.\.)\S", text), path
    assert "HF_TOKEN" in CLUSTER_YAML.read_text()  # the guidance is there (as a comment)
    # ... and only as a comment: the parsed config never carries it
    assert "HF_TOKEN" not in json.dumps(load_cluster())


def test_usage_comments_list_the_commands():
    header = "\n".join(
        line for line in CLUSTER_YAML.read_text().splitlines() if line.lstrip().startswith("#")
    )
    for needle in (
        "ray up cluster.yaml",
        "ray exec cluster.yaml",
        "--tmux",
        "ray job submit --address http://127.0.0.1:8265",
        "ray dashboard cluster.yaml",
        "ray attach cluster.yaml -p 5000",
        "ssh",
        "-L 5000:127.0.0.1:5000",
        "ray down cluster.yaml",
        "docs/CLUSTER.md",
    ):
        assert needle in header, needle


# ---------------------------------------------------------------- the check can fail


def _set_gpu(c, v):
    c["available_node_types"]["gpu_a10g_x4"]["resources"]["GPU"] = v


def _unknown_top_level(c):
    c["ssh_port_forwards"] = [5000]


def _idle_timeout_typo(c):
    c["idle_timeout"] = 10  # the real key is idle_timeout_minutes


def _node_type_typo(c):
    c["available_node_types"]["gpu_a10g_x4"]["max_worker"] = 2


def _missing_node_config(c):
    del c["available_node_types"]["gpu_a10g_x4"]["node_config"]


def _missing_provider(c):
    del c["provider"]


def _command_not_string(c):
    c["setup_commands"].append(["pip", "install", "x"])


def _bad_auth_key(c):
    c["auth"]["ssh_password"] = "nope"


BROKEN = {
    "gpu-fraction": lambda c: _set_gpu(c, 1.5),
    "gpu-negative": lambda c: _set_gpu(c, -1),
    "gpu-string": lambda c: _set_gpu(c, "4"),
    "unknown-top-level-key": _unknown_top_level,
    "idle_timeout-typo": _idle_timeout_typo,
    "node-type-key-typo": _node_type_typo,
    "node-type-without-node_config": _missing_node_config,
    "no-provider": _missing_provider,
    "command-not-a-string": _command_not_string,
    "unknown-auth-key": _bad_auth_key,
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_copy_fails_schema(breakage):
    c = load_cluster()
    BROKEN[breakage](c)
    assert schema_errors(c), f"{breakage} was accepted"
    with pytest.raises(jsonschema.ValidationError):
        from ray.autoscaler._private.util import validate_config

        validate_config(c)


def test_ray_semantic_checks_fail_beyond_schema():
    """Valid JSON-schema-wise, rejected by Ray's own validate_config."""
    c = load_cluster()
    c["head_node_type"] = "no_such_type"
    assert schema_errors(c) == []
    with pytest.raises(ValueError, match="head_node_type"):
        ray_prepare_and_validate(c)

    c = load_cluster()
    c["available_node_types"]["gpu_a10g_x4"]["min_workers"] = c["max_workers"] + 1
    assert schema_errors(c) == []
    with pytest.raises(ValueError, match="min_workers"):
        ray_prepare_and_validate(c)


def test_local_provider_with_node_types_is_rejected():
    local = copy.deepcopy(doc_variants()["local"])
    local["available_node_types"] = {"n": {"resources": {}, "node_config": {}}}
    local["head_node_type"] = "n"
    assert schema_errors(local) == []  # schema-valid, but Ray aborts
    import click

    with pytest.raises(click.ClickException):  # cli_logger.abort
        ray_prepare_and_validate(local)


# ---------------------------------------------------------------- flags exist in the installed tools


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_mlflow_server_flags_exist(name, config):
    mlflow_cli = pytest.importorskip("mlflow.cli")
    used = used_options(mlflow_server_command(config), "mlflow server")
    assert {"--host", "--port", "--backend-store-uri"} <= used
    assert used <= click_options(mlflow_cli.server), used - click_options(mlflow_cli.server)


@pytest.mark.parametrize("name,config", all_configs(), ids=[n for n, _ in all_configs()])
def test_ray_start_flags_exist(name, config):
    from ray.scripts.scripts import start

    known = click_options(start)
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if re.search(r"\bray start\b", cmd):
            used = used_options(cmd, "ray start")
            assert used <= known, used - known


def test_used_options_parser():
    cmd = "x || nohup setsid mlflow server --host 127.0.0.1 --port=5000 > log 2>&1 < /dev/null &"
    assert used_options(cmd, "mlflow server") == {"--host", "--port"}


# ---------------------------------------------------------------- the MLflow command really runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_mentioning(marker: str) -> list[tuple[int, int]]:
    # -ww: never truncate the command line (ps cuts it to 80 columns when piped)
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,sid=,args="], capture_output=True, text=True
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and marker in parts[2]:
            rows.append((int(parts[0]), int(parts[1])))
    return rows


@pytest.mark.slow
def test_mlflow_command_starts_a_localhost_only_server(tmp_path):
    """Run cluster.yaml's exact MLflow command (port swapped for a free one, HOME pointed at tmp_path):
    it must return at once, serve /health on 127.0.0.1, not on other interfaces, and be idempotent."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "mlflow").exists() or not shutil.which("curl") or not shutil.which("ps"):
        pytest.skip("needs the mlflow CLI next to this python, curl and ps")
    port = _free_port()
    cmd = mlflow_server_command(load_cluster()).replace("5000", str(port))
    home = tmp_path / "home"
    (home / "crl_mlflow" / "artifacts").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home), "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)

    t0 = time.time()
    subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
    assert time.time() - t0 < 10, "the command must background the server"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.time() > deadline:
                    log = home / "crl_mlflow" / "server.log"
                    pytest.fail("MLflow did not come up:\n" + (log.read_text() if log.exists() else ""))
                time.sleep(1)
        # bound to loopback only: a non-loopback address of this host must not answer
        ips = [
            ip
            for ip in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
            if ":" not in ip and not ip.startswith("127.")
        ]
        for ip in ips[:1]:
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=2).close()
        # idempotent: running it again while the server is up starts nothing new
        sessions = {sid for _, sid in _pids_mentioning(str(home))}
        assert len(sessions) == 1, sessions  # found the server ...
        assert sessions != {os.getsid(0)}  # ... in its own session (setsid)
        subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=30)
        time.sleep(3)
        assert {sid for _, sid in _pids_mentioning(str(home))} == sessions
        assert (home / "crl_mlflow" / "mlflow.db").exists()
    finally:
        _stop_sessions_mentioning(str(home))
    assert _pids_mentioning(str(home)) == []


def _stop_sessions_mentioning(marker: str) -> None:
    """Stop only what this test started: the session(s) whose leader's command line names `marker`
    (setsid made the server a session leader, so its session id is its process-group id)."""
    rows = _pids_mentioning(marker)
    # only session leaders' groups (never the session pytest runs in); other matches one by one
    sessions = {sid for pid, sid in rows if pid == sid and sid != os.getsid(0)}
    loners = {pid for pid, sid in rows if pid != sid}
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for sid in sessions:
            try:
                os.killpg(sid, sig)
            except ProcessLookupError:
                pass
        for pid in loners:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline:
            alive = subprocess.run(
                ["ps", "-eo", "sid="], capture_output=True, text=True
            ).stdout.split()
            if not sessions & {int(x) for x in alive}:
                return
            time.sleep(0.5)


def test_constraints_pin_every_dependency_within_pyproject_ranges_and_match_this_install():
    """The lock file the nodes and CI install with: every dependency of pyproject.toml pinned, inside its range,
    Ray pinned at cluster.yaml's version, and this very environment built from it (CI installs with -c too)."""
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "crl_ray" / "resources" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt: regenerate it (see its header)"
        assert req.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
        installed = md.version(req.name).split("+")[0]
        assert installed == pins[name], f"{req.name}: installed {installed}, pinned {pins[name]}"
    ray_pin = re.search(r'ray\[default\]==([\d.]+)', (root / "cluster.yaml").read_text()).group(1)
    assert pins["ray"] == ray_pin
