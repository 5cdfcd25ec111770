"""max_concurrent_trials: auto on a cluster = what the cluster can grow to (its autoscaling YAML), not what is up."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from crl_ray.errors import ConfigError
from crl_ray.sweep import run as sweep
from crl_ray.sweep.cluster import (
    ClusterConfigError,
    Node,
    shape_from_config,
    trials_fit,
)
from crl_ray.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
MARGIN = ROOT / "sweeps" / "margin.yaml"
SMOKE = ROOT / "sweeps" / "smoke.yaml"
CLUSTER = ROOT / "cluster.yaml"


def margin(*overrides: str):
    # margin.yaml: 24 trials x 4 workers x (4 CPU, 1 GPU); cluster.yaml: CPU head + up to 4 g5.12xlarge (48 CPU, 4 GPU)
    cfg, _ = load_config(MARGIN, ["resources.ray_address=auto", *overrides])
    return cfg


def test_shipped_cluster_yaml_grows_to_the_head_and_four_gpu_nodes() -> None:
    shape = shape_from_config(yaml.safe_load(CLUSTER.read_text()), "cluster.yaml", 4.0, 1.0)
    assert shape.nodes == (Node(8, 0),) + (Node(48, 4),) * 4
    assert shape.described == "head 8 CPU + 4 x gpu_a10g_x4 (48 CPU, 4 GPU)"


def test_cold_cluster_runs_what_the_autoscaler_can_add_not_one_trial() -> None:
    """The issue's case: a cold cluster (the CPU head only, or head + one GPU node) used to give 1."""
    cold_head = [Node(8, 0)]
    one_gpu_node = [Node(8, 0), Node(48, 4)]
    cfg = margin(f"resources.cluster_config={CLUSTER}")
    for now in (cold_head, one_gpu_node):
        assert sweep.resource_plan(cfg, now).concurrency == 4  # one trial per 4-GPU node, 4 nodes at most
    # without the autoscaling config only the nodes up now count (and the dry run says it is decided at run time)
    plain = margin("resources.cluster_config=null")
    assert sweep.resource_plan(plain, cold_head).concurrency == 1
    assert sweep.resource_plan(plain, one_gpu_node).concurrency == 1
    assert sweep.resource_plan(plain).concurrency is None


def test_warm_cluster_larger_than_its_config_uses_the_nodes_up() -> None:
    cfg = margin(f"resources.cluster_config={CLUSTER}")
    warm = [Node(8, 0)] + [Node(48, 4)] * 6  # e.g. nodes added by hand beyond max_workers
    assert sweep.resource_plan(cfg, warm).concurrency == 6
    # a trial count below the cluster's room caps it
    small = margin(f"resources.cluster_config={CLUSTER}", "search.num_trials=3")
    assert sweep.resource_plan(small, warm).concurrency == 3


def test_auto_reads_the_config_ray_up_leaves_on_the_head(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = margin()  # cluster_config: auto (the default)
    assert sweep.resource_plan(cfg, [Node(8, 0)]).concurrency == 1  # no bootstrap config here: the nodes up now
    (tmp_path / "ray_bootstrap_config.yaml").write_text(CLUSTER.read_text())
    plan = sweep.resource_plan(cfg, [Node(8, 0)])
    assert plan.concurrency == 4 and "autoscaling up to head 8 CPU + 4 x gpu_a10g_x4" in plan.cluster


def test_global_max_workers_caps_the_node_types_and_prefers_the_roomiest() -> None:
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 4}},
                                       "small": {"max_workers": 10, "resources": {"CPU": 8, "GPU": 1}},
                                       "big": {"max_workers": 2, "resources": {"CPU": 96, "GPU": 8}}}}
    shape = shape_from_config(config, "x", 4.0, 1.0)
    assert shape.nodes == (Node(4, 0), Node(96, 8), Node(96, 8), Node(8, 1))
    # 4 workers x 1 GPU: 2 per big node, none from a 1-GPU node (a trial's 4 workers may span nodes: 4 + 4 + 1 slots)
    assert trials_fit(shape.nodes, 4, 4.0, 1.0, 0.01) == 4
    # CPU-only trials (1 worker x 2 CPUs): every node's CPUs count
    assert trials_fit([Node(8, 0)], 1, 2.0, 0.0, 0.01) == 3  # 3.97 CPUs short of a 4th driver sliver + worker
    assert trials_fit([Node(8, 0), Node(48, 0)], 1, 2.0, 0.0, 0.01) == 4 + 24 - 1


def test_a_trial_that_never_fits_is_a_warning_and_bad_configs_name_the_key(tmp_path) -> None:
    cfg = margin(f"resources.cluster_config={CLUSTER}", "resources.num_workers=40")
    plan = sweep.resource_plan(cfg, [Node(8, 0)])
    assert plan.concurrency == 1 and any("cannot hold it" in w for w in plan.warnings)
    with pytest.raises(ConfigError, match="resources.cluster_config.*not a file"):
        sweep.resource_plan(margin(f"resources.cluster_config={tmp_path / 'nope.yaml'}"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"head_node_type": "h", "available_node_types": {"x": {"resources": {"CPU": 1}}}}))
    with pytest.raises(ConfigError, match="head_node_type 'h' is not one of"):
        sweep.resource_plan(margin(f"resources.cluster_config={bad}"))
    with pytest.raises(ClusterConfigError, match="no `resources` mapping"):
        shape_from_config({"head_node_type": "h", "available_node_types": {"h": {}}}, "x")


def test_dry_run_prints_the_concurrency_the_run_will_use(capsys) -> None:
    from crl_ray.sweep.cli import main

    code = main([str(MARGIN), "--dry-run", "resources.ray_address=auto", f"resources.cluster_config={CLUSTER}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#   concurrent trials:   4\n" in out and "#   waves:               6" in out
    assert "autoscaling up to head 8 CPU + 4 x gpu_a10g_x4 (48 CPU, 4 GPU)" in out
    code = main([str(MARGIN), "--dry-run", "resources.ray_address=auto", "resources.cluster_config=null"])
    assert code == 0 and "decided at run time" in capsys.readouterr().out


def test_object_store_uris_are_accepted_and_bad_ones_refused_before_anything_runs(capsys) -> None:
    from crl_ray.sweep.cli import main

    assert main([str(SMOKE), "--dry-run", "storage.path=s3://bucket/crl_runs"]) == 0
    out = capsys.readouterr().out
    assert "trial files:         s3://bucket/crl_runs/smoke" in out
    assert f"sweep state (head):  {Path('crl_runs').resolve() / 'smoke'}" in out  # sqlite stays on the head
    code = main([str(SMOKE), "--dry-run", "storage.path=ftp://host/crl_runs"])
    err = capsys.readouterr().err
    assert code == 2 and "storage.path" in err and "unknown scheme 'ftp'" in err and "s3://bucket/prefix" in err
    code = main([str(SMOKE), "--dry-run", "storage.path=s3://b/x", "storage.head_path=s3://b/y"])
    err = capsys.readouterr().err
    assert code == 2 and "storage.head_path" in err and "sqlite" in err
    code = main([str(SMOKE), "--dry-run", "storage.path=s3://b/x", "resources.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "num_workers: 0" in err


def test_local_disk_on_a_cluster_that_grows_is_refused(monkeypatch, tmp_path) -> None:
    from crl_ray.sweep import cluster

    assert cluster.filesystem_type(Path("/")) != ""  # this machine's root mount is known
    monkeypatch.setattr(cluster, "nodes_missing_folder", lambda folder: (0, []))  # no other node up yet
    monkeypatch.setattr(cluster, "filesystem_type", lambda path: "ext4")
    problem = cluster.storage_problem(str(tmp_path), tmp_path / "s", can_grow=True)
    assert "local disk (ext4)" in problem and "will not see it" in problem
    assert cluster.storage_problem(str(tmp_path), tmp_path / "s", can_grow=False) is None  # one machine
    monkeypatch.setattr(cluster, "filesystem_type", lambda path: "nfs4")
    assert cluster.storage_problem(str(tmp_path), tmp_path / "s", can_grow=True) is None
    # other nodes up and all of them see it: shared, whatever the mount says
    monkeypatch.setattr(cluster, "nodes_missing_folder", lambda folder: (2, []))
    monkeypatch.setattr(cluster, "filesystem_type", lambda path: "ext4")
    assert cluster.storage_problem(str(tmp_path), tmp_path / "s", can_grow=True) is None


# ------------------------------------------------------------------------ placement groups left by an interrupted run
def _pg(pg_id: str, *, state: str = "CREATED", detached: bool = False, actor: str | None = "a1", job: str = "01",
        job_dead: bool = False):
    from crl_ray.sweep.cluster import PlacementGroupRecord

    return PlacementGroupRecord(pg_id, state, detached, actor, job, job_dead, ({"CPU": 2.0},))


def test_only_groups_whose_creator_is_dead_are_orphans() -> None:
    from crl_ray.sweep.cluster import orphaned

    groups = [
        _pg("leaked", actor="dead-controller"),  # created while its Train controller was being killed
        _pg("pending-leak", state="PENDING", actor="dead-controller"),
        _pg("removed", state="REMOVED", actor="dead-controller"),
        _pg("detached", detached=True, actor="dead-controller"),  # meant to outlive its creator
        _pg("live-actor", actor="live"),
        _pg("restarting-actor", actor="restarting"),
        _pg("unknown-actor", actor="not-in-table"),  # never guessed dead while its job lives
        _pg("evicted-actor", actor="not-in-table", job="03"),  # dead actors leave the table; its job is dead
        _pg("driver-alive", actor=None, job="02"),
        _pg("driver-dead", actor=None, job="03"),
        _pg("driver-flagged", actor=None, job="04", job_dead=True),
    ]
    actors = {"dead-controller": "DEAD", "live": "ALIVE", "restarting": "RESTARTING"}
    found = [pg.id for pg in orphaned(groups, actors, dead_jobs={"03"})]
    assert found == ["leaked", "pending-leak", "evicted-actor", "driver-dead", "driver-flagged"]


def _until(condition, deadline: float) -> None:
    """Poll ``condition`` every 0.2 s until it holds or the monotonic ``deadline`` passes; the caller asserts."""
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_real_cluster_keeps_live_groups_and_frees_an_orphan(monkeypatch) -> None:
    """On a real local Ray: GCS's table is read (creators, states, detached flag); nothing live is removed; a group
    whose creator is reported dead is removed for real and its CPUs are free again."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from crl_ray.sweep import cluster

    ray.init(num_cpus=3, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Creator:
            def make(self) -> str:
                pg = placement_group([{"CPU": 1.0}])
                ray.get(pg.ready())
                return pg.id.hex()

        creator = Creator.remote()
        by_actor = ray.get(creator.make.remote())
        by_driver = placement_group([{"CPU": 1.0}])
        ray.get(by_driver.ready())
        detached = placement_group([{"CPU": 1.0}], lifetime="detached")
        ray.get(detached.ready())

        groups, actors, dead_jobs = cluster.placement_group_records()
        records = {g.id: g for g in groups}
        actor_id = creator._actor_id.hex()
        assert records[by_actor].creator_actor == actor_id and actors[actor_id] == "ALIVE"
        assert records[by_driver.id.hex()].creator_actor is None and records[detached.id.hex()].detached
        ids = (by_actor, by_driver.id.hex(), detached.id.hex())
        assert all(records[i].state == "CREATED" for i in ids)
        assert cluster.remove_orphaned_placement_groups() == []
        table = placement_group_table()
        assert all(table[i]["state"] == "CREATED" for i in ids)

        def free_cpus() -> float:
            return ray.available_resources().get("CPU", 0)

        # the resource view lags GCS by a sync round (CI stop 22 read CPU 1.0 here), so wait for it to settle
        _until(lambda: free_cpus() == 0, time.monotonic() + 30)
        time.sleep(1.0)  # a group removed by mistake would free its CPU within this
        assert free_cpus() == 0

        # the leak: GCS still lists the group while its creator is dead (the race seen in CI, stop 17)
        monkeypatch.setattr(cluster, "placement_group_records",
                            lambda: (groups, actors | {actor_id: "DEAD"}, dead_jobs))
        removed = cluster.remove_orphaned_placement_groups()
        assert len(removed) == 1 and removed[0].startswith(by_actor)
        assert placement_group_table(by_driver)["state"] == "CREATED"
        deadline = time.monotonic() + 30  # for both waits together
        _until(lambda: placement_group_table()[by_actor]["state"] == "REMOVED", deadline)
        assert placement_group_table()[by_actor]["state"] == "REMOVED"
        _until(lambda: free_cpus() >= 1, deadline)
        assert free_cpus() == 1
    finally:
        ray.shutdown()
