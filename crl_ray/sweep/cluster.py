"""How many trials a cluster can run at once: the nodes up now, or what an autoscaling cluster can grow to.

Tune only asks the autoscaler for more nodes when trials are pending, so ``max_concurrent_trials: auto`` must be
sized from the cluster's upper bound (the autoscaling config's node types and ``max_workers``), not from the nodes
that happen to be up when the sweep starts (on a cold cluster: the head alone, so one trial at a time and no
scale-up). The upper bound comes from a cluster YAML (``resources.cluster_config``: a path, or ``auto`` = the
config that ``ray up`` leaves on the head, ``~/ray_bootstrap_config.yaml``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # written by `ray up` on the head node


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterShape:
    """The largest cluster an autoscaling config allows: the head plus worker nodes up to the caps."""

    source: str
    nodes: tuple[Node, ...]
    described: str  # e.g. "head 8 CPU + 4 x gpu_a10g_x4 (48 CPU, 4 GPU)"


class ClusterConfigError(ValueError):
    pass


def _resources(spec: dict, name: str) -> Node:
    res = spec.get("resources")
    if not isinstance(res, dict):
        raise ClusterConfigError(f"node type {name!r} has no `resources` mapping (e.g. resources: {{CPU: 48, GPU: "
                                 "4}); the autoscaler needs it to know what a node offers")
    try:
        return Node(float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    except (TypeError, ValueError) as exc:
        raise ClusterConfigError(f"node type {name!r}: resources must be numbers ({exc})") from exc


def slots(node: Node, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """Ray Train workers one node holds (each worker's CPUs and GPUs come from one node)."""
    fit = math.floor(node.cpus / cpus_per_worker + 1e-9) if cpus_per_worker > 0 else 10**9
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(node.gpus / gpus_per_worker + 1e-9))
    return max(fit, 0)


def shape_from_config(config: dict, source: str, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0
                      ) -> ClusterShape:
    """The largest cluster a ``ray up`` YAML allows: the head, then worker nodes up to each type's ``max_workers``
    and the global ``max_workers``, the types that hold most workers first (the autoscaler launches the types the
    pending trials fit; this is the upper bound)."""
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise ClusterConfigError(f"{source}: no `available_node_types` mapping; is this a `ray up` cluster YAML?")
    head_type = config.get("head_node_type")
    if head_type not in types:
        raise ClusterConfigError(f"{source}: head_node_type {head_type!r} is not one of available_node_types "
                                 f"({', '.join(types)})")
    head = _resources(types[head_type], head_type)
    workers = []
    for name, spec in types.items():
        if name == head_type:
            continue
        cap = int(spec.get("max_workers", 0) or 0)
        if cap > 0:
            workers.append((name, _resources(spec, name), cap))
    budget = config.get("max_workers")
    budget = sum(cap for _, _, cap in workers) if budget is None else int(budget)
    workers.sort(key=lambda w: (slots(w[1], cpus_per_worker, gpus_per_worker), w[1].gpus, w[1].cpus), reverse=True)
    nodes = [head]
    parts = [f"head {head.cpus:g} CPU" + (f", {head.gpus:g} GPU" if head.gpus else "")]
    for name, node, cap in workers:
        take = min(cap, budget)
        if take <= 0:
            continue
        budget -= take
        nodes.extend([node] * take)
        parts.append(f"{take} x {name} ({node.cpus:g} CPU" + (f", {node.gpus:g} GPU)" if node.gpus else ")"))
    return ClusterShape(source, tuple(nodes), " + ".join(parts))


def read_shape(setting: str | None, *, cpus_per_worker: float, gpus_per_worker: float) -> ClusterShape | None:
    """``resources.cluster_config`` of a sweep on a cluster: a path to a cluster YAML, ``auto`` (the head's
    bootstrap config when it exists) or None."""
    if setting is None:
        return None
    if setting == "auto":
        path = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
        if not path.is_file():
            return None
    else:
        path = Path(os.path.expanduser(setting))
        if not path.is_file():
            raise ClusterConfigError(f"resources.cluster_config: {setting!r} is not a file; pass the cluster YAML "
                                     "you gave `ray up` (e.g. cluster.yaml), auto, or null")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"resources.cluster_config: {path} is not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise ClusterConfigError(f"resources.cluster_config: {path} does not hold a mapping")
    return shape_from_config(config, str(path), cpus_per_worker, gpus_per_worker)


def trials_fit(nodes, workers: int, cpus_per_worker: float, gpus_per_worker: float, driver_cpus: float) -> int:
    """Trials that run at once on these nodes: every trial needs ``workers`` worker bundles (each on one node) and
    a driver's sliver of CPU."""
    nodes = list(nodes)
    total_cpus = sum(n.cpus for n in nodes)
    if workers == 0:  # in-process trial: the driver trains, with the workers' share of one node
        per_trial = driver_cpus + cpus_per_worker
        return int(math.floor(total_cpus / per_trial + 1e-9))
    total_slots = sum(slots(n, cpus_per_worker, gpus_per_worker) for n in nodes)
    fit = total_slots // workers
    fit = min(fit, math.floor(total_cpus / (driver_cpus + workers * cpus_per_worker) + 1e-9))
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(sum(n.gpus for n in nodes) / (workers * gpus_per_worker) + 1e-9))
    return max(int(fit), 0)


# --------------------------------------------------------------------------------------------- shared storage
# Trials keep their training data, checkpoints and adapters under storage.path, and Ray Train workers and the
# evaluation task read them on whichever node they run: a folder must be the same on every node, an object store
# reachable from every node. These checks stop a sweep before its first trial when it is not, instead of trials
# failing on other nodes.
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "overlay", "tmpfs", "ramfs", "vfat",
                     "ntfs", "apfs", "hfs"}
STORAGE_FIX = ("use an object store (storage.path=s3://bucket/prefix, credentials on every node) or a folder that "
               "every node mounts at the same path (NFS, EFS, Filestore, Lustre), e.g. "
               "storage.path=/mnt/shared/crl_runs: see docs/CLUSTER.md; on one machine any folder works")
URI_FIX = ("check the bucket exists and that every node has credentials for it (an instance role / IAM profile, "
           "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for an S3-compatible server): see "
           "docs/CLUSTER.md")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (longest mount point in /proc/mounts), or "" when unknown."""
    path = Path(path).resolve()
    best, kind = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


def _read_marker(location: str) -> str | None:
    from crl_ray.storage import Store

    try:
        return Store(location).read_text()
    except Exception as exc:  # noqa: BLE001 - any failure means this node cannot use the storage
        return f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _unreadable_on(location: str, nodes: list[dict], timeout_s: float) -> list[tuple[dict, str | None]]:
    """(node, what it read) for each of ``nodes`` that cannot read back a marker written to ``location`` (a folder
    or a URI) from here: a zero-CPU task pinned to each node reads it. Raises when this node cannot write it."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from crl_ray.storage import Store

    store = Store(location)
    name = f".storage-check-{secrets.token_hex(4)}"
    token = secrets.token_hex(16)
    store.write_text(token, name)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_read_marker)
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            store.uri(name)) for n in nodes]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        store.delete(name)
    return [(n, got) for n, got in zip(nodes, seen) if got != token]


def _node_name(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def nodes_missing_folder(folder: Path, timeout_s: float = 120.0) -> tuple[int, list[str]]:
    """Alive nodes other than this one that do not see ``folder``. Returns (nodes checked, "<ip> (<node id>)" of
    each that cannot read a marker written there from here)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return 0, []
    return len(others), [_node_name(n) for n, _ in _unreadable_on(str(folder), others, timeout_s)]


def nodes_missing_store(location: str, timeout_s: float = 120.0) -> tuple[int, list[str]]:
    """Alive nodes (this one included) that cannot read an object written to ``location`` (a URI) from here.
    Returns (nodes checked, "<ip> (<node id>): <why>" for each that cannot). Raises when this node cannot write."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return len(nodes), [f"{_node_name(n)}: {got or 'nothing read'}"
                        for n, got in _unreadable_on(location, nodes, timeout_s)]


def storage_problem(storage_path: str, folder: Path | str, *, can_grow: bool) -> str | None:
    """Why a sweep on a cluster cannot keep its trials' files at ``folder`` (None when it can): an object store
    that this node cannot write or some node cannot read; a folder some node cannot see; a local disk on a cluster
    that will add nodes."""
    from crl_ray.storage import is_uri

    if is_uri(storage_path):
        try:
            _, missing = nodes_missing_store(str(folder))
        except Exception as exc:  # noqa: BLE001 - the head itself cannot use it
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return f"storage.path {storage_path!r}: cannot write there from the head ({type(exc).__name__}: " \
                   f"{first}): {URI_FIX}"
        if missing:
            return f"storage.path {storage_path!r} cannot be read on node(s) {'; '.join(missing)}: {URI_FIX}"
        return None
    folder = Path(folder)
    checked, missing = nodes_missing_folder(folder)
    if missing:
        return (f"storage.path {storage_path!r} ({folder}) is not visible on node(s) {', '.join(missing)}; "
                f"trials there would fail: {STORAGE_FIX}")
    kind = filesystem_type(folder)
    if not checked and can_grow and kind in LOCAL_FILESYSTEMS:  # no other node up to ask: judge by the mount
        return (f"storage.path {storage_path!r} ({folder}) is on this node's local disk ({kind}) and the cluster "
                f"adds worker nodes that will not see it: {STORAGE_FIX}")
    return None


# ------------------------------------------------------------------------------- placement groups left by a dead run
@dataclass(frozen=True)
class PlacementGroupRecord:
    id: str
    state: str  # GCS state name: PENDING, CREATED, REMOVED, RESCHEDULING, ...
    detached: bool
    creator_actor: str | None  # hex id; None when a driver (not an actor) created it
    creator_job: str
    creator_job_dead: bool  # as GCS recorded it
    bundles: tuple[dict[str, float], ...]


def orphaned(groups: list[PlacementGroupRecord], actor_state: dict[str, str], dead_jobs: set[str]
             ) -> list[PlacementGroupRecord]:
    """Placement groups that hold (or wait for) resources while nothing can ever use them: not detached, not
    removed, and created by an actor that is DEAD (or gone from the actor table while its job is dead), or by a
    driver whose job is dead. GCS removes these itself when it sees the creator die; one created while its creator
    was being killed (a Ray Train controller stopped by Ctrl-C while it starts its worker group) can be missed, and
    Ray Train's own cleaner only notices through the State API, which a cluster without the dashboard does not
    serve. Such a group keeps a worker node's CPUs reserved for good: the next sweep's tasks then wait forever."""
    found = []
    for pg in groups:
        if pg.detached or pg.state == "REMOVED":
            continue
        job_dead = pg.creator_job_dead or pg.creator_job in dead_jobs
        if pg.creator_actor is not None:  # live actors are always in the table; dead ones may have been evicted
            state = actor_state.get(pg.creator_actor)
            dead = state == "DEAD" or (state is None and job_dead)
        else:
            dead = job_dead
        if dead:
            found.append(pg)
    return found


def placement_group_records() -> tuple[list[PlacementGroupRecord], dict[str, str], set[str]]:
    """The connected cluster's placement groups with their creators (GCS's table: the public
    ``ray.util.placement_group_table`` does not say who created a group), actor states, dead jobs."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    state.placement_group_table()  # connects the global state accessor
    names = gcs_pb2.PlacementGroupTableData.PlacementGroupState
    nil_actor = bytes(16)
    groups = []
    for raw in state._global_state_accessor.get_placement_group_table():
        d = gcs_pb2.PlacementGroupTableData.FromString(raw)
        actor = d.creator_actor_id
        groups.append(PlacementGroupRecord(
            id=d.placement_group_id.hex(), state=names.Name(d.state), detached=d.is_detached,
            creator_actor=None if not actor or actor == b"\xff" * len(actor) or actor == nil_actor else actor.hex(),
            creator_job=d.creator_job_id.hex(), creator_job_dead=d.creator_job_dead,
            bundles=tuple(dict(b.unit_resources) for b in d.bundles)))
    actors = {actor_id: info["State"] for actor_id, info in state.actor_table(None).items()}
    dead_jobs = {job["JobID"] for job in state.job_table() if job.get("IsDead")}
    return groups, actors, dead_jobs


def remove_orphaned_placement_groups() -> list[str]:
    """Remove the connected cluster's orphaned placement groups (:func:`orphaned`); returns a line for each
    removed. Best effort: a Ray whose internal tables look different gets a warning, never a failed sweep."""
    import logging

    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    log = logging.getLogger(__name__)
    try:
        groups, actors, dead_jobs = placement_group_records()
    except Exception as exc:  # noqa: BLE001 - internal tables of another Ray version
        log.warning("could not look for placement groups left by earlier runs (%s: %s)", type(exc).__name__, exc)
        return []
    removed = []
    for pg in orphaned(groups, actors, dead_jobs):
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg.id))))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove placement group %s (%s)", pg.id, exc)
            continue
        removed.append(f"{pg.id} ({pg.state}, {list(pg.bundles)}, creator "
                       f"{'actor ' + pg.creator_actor[:8] if pg.creator_actor else 'job ' + pg.creator_job})")
    return removed
