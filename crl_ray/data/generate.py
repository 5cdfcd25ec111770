"""Answers to prompts from a chat model: batched generation and a provenance-recording on-disk cache.

Data sources with ``answer: generate`` or ``answer: refusal`` need the generator model's answers. They are
produced once and cached under a key that covers everything that changes them (model id and revision, system
prompt, the prompts, every :class:`~crl_ray.config.GenerationConfig` field, and :data:`GENERATE_VERSION`), so a
sweep's trials and reruns reuse them without loading the model. Pure torch/transformers: no Ray, no MLflow.

Cache layout (``cache_dir``)::

    <key>.jsonl      one {"index", "prompt", "answer"} object per line, in prompt order
    <key>.meta.json  provenance (model, revision, settings, system prompt, count, sha256 of the .jsonl,
                     versions, creation time); written last, so its presence marks a complete entry
    <key>.lock       filelock: one process generates a key while others wait and then read it
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from crl_ray.config import GenerationConfig
from crl_ray.data.encoding import build_request, pad_id, stop_ids
from crl_ray.storage import atomic_write

__all__ = ["GENERATE_VERSION", "cache_key", "cached_answers", "generate_answers"]

logger = logging.getLogger(__name__)

# Bump when a change here changes the answers for the same inputs; old cache entries then miss.
GENERATE_VERSION = "1"


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s parameters (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def generate_answers(
    prompts: Sequence[str],
    *,
    model: Any,
    tokenizer: Any,
    cfg: GenerationConfig,
    system: str | None = None,
    desc: str = "generating",
) -> list[str]:
    """The model's answer to each chat-templated prompt, in prompt order.

    Batches of ``cfg.batch_size`` prompts, left padded; greedy when ``cfg.temperature == 0``, else plain
    temperature sampling (no top-k/top-p) seeded by ``cfg.seed``; at most ``cfg.max_new_tokens`` new tokens;
    ``cfg.repetition_penalty`` on the answer's own tokens (as :func:`crl_ray.evaluate.attacks.greedy_generate`).
    The answer stops before the end-of-turn token and has no special tokens. The global torch RNG and the
    model's train/eval mode are restored afterwards.
    """
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    prompts = list(prompts)
    if not prompts:
        return []
    stop = stop_ids(tokenizer)
    pad = pad_id(tokenizer)
    sample = cfg.temperature > 0
    # Every decoding knob is set explicitly: generate() fills unset (None) fields from the model's own
    # generation_config.json (e.g. SmolLM2's top_p/temperature, or a repetition_penalty), which would make the
    # answers depend on more than the cache key. Greedy keeps the neutral global defaults (no warnings).
    sampling = {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    greedy = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0}
    hf_cfg = HFGenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0,
        do_sample=sample,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=stop,
        pad_token_id=pad,
        bos_token_id=None,
        **(sampling if sample else greedy),
    )
    device = model_device(model)
    requests = [build_request(tokenizer, p, system) for p in prompts]
    # longest first: batches of similar length waste less compute on padding; answers go back to prompt order
    order = sorted(range(len(prompts)), key=lambda i: -len(requests[i]))
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode():
            torch.manual_seed(cfg.seed)
            with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None) as bar:
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    width = max(len(requests[i]) for i in idx)
                    input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
                    attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):
                        n = len(requests[i])
                        input_ids[row, width - n:] = torch.tensor(requests[i], dtype=torch.long)
                        attention_mask[row, width - n:] = 1
                    # generate()'s own repetition_penalty would also penalise the prompt's tokens
                    extra = {}
                    if cfg.repetition_penalty != 1.0:
                        extra["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
                            cfg.repetition_penalty, prompt_ignore_length=width)])
                    out = model.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        generation_config=hf_cfg,
                        **extra,
                    )
                    for row, i in enumerate(idx):
                        answers[i] = _decode_answer(out[row, width:].tolist(), tokenizer, stop)
                    bar.update(len(idx))
    finally:
        model.train(was_training)
    return answers


def _decode_answer(new_ids: list[int], tokenizer: Any, stop: list[int]) -> str:
    for j, t in enumerate(new_ids):
        if t in stop:
            new_ids = new_ids[:j]
            break
    return tokenizer.decode(new_ids, skip_special_tokens=True)


# ============================================================================================ cache
def cache_key(
    prompts: Sequence[str], *, model_id: str, revision: str | None, cfg: GenerationConfig, system: str | None,
    dtype: str | None = None,
) -> str:
    """sha256 over everything that determines the answers. ``dtype``: the generator's weights; float32 (or None)
    adds nothing to the key, so entries made before the dtype was part of it (all float32) stay valid, while a
    bfloat16 GPU run and a float32 CPU run of the same model never share answers. Likewise a repetition penalty of
    1 (none) is left out of the settings, so entries made before it existed stay valid."""
    settings = cfg.model_dump(mode="json")
    if settings.get("repetition_penalty") == 1.0:
        del settings["repetition_penalty"]
    payload = {
        "model_id": model_id,
        "revision": revision,
        "system": system,
        "settings": settings,
        "prompts": list(prompts),
        "generate_version": GENERATE_VERSION,
    }
    if dtype not in (None, "float32"):
        payload["dtype"] = dtype
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_cache(data_path: Path, meta_path: Path, prompts: list[str]) -> list[str] | None:
    """The cached answers if the entry is complete and consistent, else None (with the reason logged)."""
    if not meta_path.exists():
        if data_path.exists():
            logger.warning("generation cache %s has no metadata (interrupted write); regenerating", data_path.name)
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw = data_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta["answers_sha256"]:
            raise ValueError("the answers file does not match the sha256 in its metadata")
        rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        if meta["count"] != len(prompts) or len(rows) != len(prompts):
            raise ValueError(f"expected {len(prompts)} answers, found {len(rows)} (meta count {meta['count']})")
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            if row["index"] != i or row["prompt"] != prompt or not isinstance(row["answer"], str):
                raise ValueError(f"row {i} does not match its prompt")
        return [row["answer"] for row in rows]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("generation cache %s is corrupt (%s); regenerating", data_path.name, exc)
        return None


def cached_answers(
    prompts: Sequence[str],
    *,
    model_id: str,
    revision: str | None,
    cfg: GenerationConfig,
    system: str | None,
    cache_dir: Path,
    load_model: Callable[[], tuple[Any, Any]],
    dtype: str | None = None,
) -> list[str]:
    """:func:`generate_answers` through the on-disk cache; ``load_model() -> (model, tokenizer)`` runs only on a miss.

    A missing, partial or corrupt entry is regenerated. A file lock per key makes concurrent callers
    (e.g. several trials starting together) generate once; the others wait and read the result.
    """
    prompts = list(prompts)
    if not prompts:
        return []
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(prompts, model_id=model_id, revision=revision, cfg=cfg, system=system, dtype=dtype)
    data_path = cache_dir / f"{key}.jsonl"
    meta_path = cache_dir / f"{key}.meta.json"

    answers = _read_cache(data_path, meta_path, prompts)
    if answers is not None:
        logger.info("generation cache hit: %d answers from %s", len(answers), data_path)
        return answers
    with FileLock(str(cache_dir / f"{key}.lock")):
        answers = _read_cache(data_path, meta_path, prompts)  # another process may have finished meanwhile
        if answers is not None:
            logger.info("generation cache hit after waiting: %d answers from %s", len(answers), data_path)
            return answers
        logger.info("generation cache miss: generating %d answers with %s", len(prompts), model_id)
        meta_path.unlink(missing_ok=True)  # the old entry, if any, is invalid from here on
        model, tokenizer = load_model()
        started = time.perf_counter()
        answers = generate_answers(prompts, model=model, tokenizer=tokenizer, cfg=cfg, system=system,
                                   desc=f"generating ({model_id})")
        lines = "".join(
            json.dumps({"index": i, "prompt": p, "answer": a}, ensure_ascii=False) + "\n"
            for i, (p, a) in enumerate(zip(prompts, answers))
        ).encode("utf-8")
        atomic_write(data_path, lines)
        meta = {
            "key": key,
            "model_id": model_id,
            "revision": revision,
            "dtype": dtype or "float32",
            "settings": cfg.model_dump(mode="json"),
            "system": system,
            "count": len(prompts),
            "answers_sha256": hashlib.sha256(lines).hexdigest(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "generate_version": GENERATE_VERSION,
            "versions": library_versions(),
            "host": platform.node(),
            "generation_seconds": round(time.perf_counter() - started, 3),
        }
        atomic_write(meta_path, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return answers


def library_versions() -> dict[str, str]:
    """The versions that can change a model's outputs, recorded beside answers and evaluations."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}
