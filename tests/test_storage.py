"""crl_ray.storage: the same operations on a folder and on an S3-compatible object store (moto on 127.0.0.1)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from crl_ray import storage
from crl_ray.storage import Store, fetch, is_uri, join, local_copy, parent, uri_problem
from tests.s3server import s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server("crl-store") as env:
        yield env


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "s3":
        request.getfixturevalue("bucket")
        return Store(f"s3://crl-store/{tmp_path.name}/runs")
    return Store(tmp_path / "runs")


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "inner" / "b.bin").write_bytes(b"\x00\x01beta")
    return src


def test_names_and_uri_checks() -> None:
    assert is_uri("s3://b/p") and not is_uri("/tmp/x") and not is_uri(Path("crl_runs"))
    assert join("s3://b/p/", "smoke", "train") == "s3://b/p/smoke/train"
    assert join("/x/y", "z") == "/x/y/z"
    assert parent("s3://b/p/data/provenance.json") == "s3://b/p/data"
    assert parent(Path("/x/y/z")) == Path("/x/y")
    assert uri_problem("s3://bucket/prefix") is None
    assert "unknown scheme 'ftp'" in uri_problem("ftp://host/x")
    assert "no bucket" in uri_problem("s3://")


def test_store_round_trip(store: Store, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    assert not store.exists("run") and store.list("run") == []
    location = store.upload(src, "run", "data")
    assert location == store.uri("run", "data") and store.exists("run", "data")
    assert store.list("run", "data") == ["a.txt", "inner"]
    store.write_text("ok", "run", "marker")
    assert store.is_file("run", "marker") and store.read_text("run", "marker") == "ok"
    assert not store.is_file("run", "data")
    back = store.download(tmp_path / "back", "run", "data")
    assert (back / "a.txt").read_text() == "alpha" and (back / "inner" / "b.bin").read_bytes() == b"\x00\x01beta"
    # upload replaces what was there
    (src / "a.txt").unlink()
    store.upload(src, "run", "data")
    assert store.list("run", "data") == ["inner"]
    store.delete("run", "marker")
    store.delete("run", "nothing-here")  # no error
    assert store.list("run") == ["data"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.download(tmp_path / "none", "run", "missing")
    # a Store travels to Ray tasks by its location
    again = pickle.loads(pickle.dumps(store))
    assert again.location == store.location and again.read_text("run", "data", "inner", "b.bin") == "\x00\x01beta"


def test_local_copies_only_for_object_stores(store: Store, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    location = store.upload(src, "adapter")
    if store.remote:  # keys written one by one (as Ray Train uploads checkpoints): no folder marker objects
        for name in ("a.txt", "inner/b.bin"):
            store.fs.delete_file(store.path("adapter", name))
            with store.fs.open_output_stream(store.path("plain", name)) as f:
                f.write((src / name).read_bytes())
        location = store.uri("plain")
    with local_copy(location) as local:
        assert (local / "a.txt").read_text() == "alpha"
        if store.remote:
            assert local != Path(store.path("adapter")) and str(local).startswith("/")
        else:
            assert local == Path(location)  # a folder is used in place
    if store.remote:
        assert not local.exists()  # the temporary copy is gone
    copied = fetch(location, tmp_path / "mirror")
    assert (copied / "inner" / "b.bin").exists()
    assert (copied == tmp_path / "mirror") == store.remote
    with local_copy(None) as nothing:
        assert nothing is None


def test_a_missing_bucket_is_reported_by_the_storage_check(bucket) -> None:
    """The sweep's pre-flight check on an object store: the head cannot write -> a message naming storage.path
    and the fix (credentials, bucket, endpoint)."""
    import ray

    from crl_ray.sweep import cluster

    ray.init(num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        assert cluster.storage_problem("s3://crl-store/x", "s3://crl-store/x/smoke", can_grow=False) is None
        problem = cluster.storage_problem("s3://no-such-bucket/x", "s3://no-such-bucket/x/smoke", can_grow=False)
    finally:
        ray.shutdown()
    assert problem.startswith("storage.path 's3://no-such-bucket/x': cannot write there from the head")
    assert "credentials" in problem and "docs/CLUSTER.md" in problem
    assert storage.Store("s3://crl-store/x/smoke").list() == []  # the marker is removed
