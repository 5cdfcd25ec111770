"""Semantic checks of a sweep config: everything the schema alone cannot see.

Model depth comes from the model's config (never its weights), data sources are checked without loading,
the search space is checked by substituting its bounds into the config and validating the result.
``load_config`` is the one entry point: file + overrides -> a valid SweepConfig, or ConfigError with all problems.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel

from crl_ray.config import (
    CategoricalParam,
    EvalConfig,
    FloatParam,
    IntParam,
    LayerSpec,
    LayerWindowParam,
    ObjectiveConfig,
    SweepConfig,
    apply_overrides,
    parse_config,
    read_sweep_file,
    schema_problems,
)
from crl_ray.config.problems import _section_type
from crl_ray.data import EMBEDDED_SOURCES, check_source
from crl_ray.errors import ConfigError, Problem

log = logging.getLogger(__name__)

# Depths of well-known hub models, used only when their config cannot be fetched (offline dry runs of the
# cluster sweep files). Facts from the models' config.json files.
KNOWN_MODELS: dict[str, dict[str, int]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": {"num_hidden_layers": 32, "hidden_size": 4096},
    "meta-llama/Llama-3.1-8B-Instruct": {"num_hidden_layers": 32, "hidden_size": 4096},
    "mistralai/Mistral-7B-Instruct-v0.2": {"num_hidden_layers": 32, "hidden_size": 4096},
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"num_hidden_layers": 30, "hidden_size": 576},
    "HuggingFaceTB/SmolLM2-360M-Instruct": {"num_hidden_layers": 32, "hidden_size": 960},
}

# Keys that describe the sweep itself and cannot be searched.
UNSEARCHABLE = ("name", "description", "search", "storage", "mlflow", "resources", "scheduler", "objective")


@dataclass(frozen=True)
class ModelInfo:
    num_blocks: int
    hidden_size: int
    source: str  # where the facts came from


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection (fast; no retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_info(name: str, revision: str | None = None) -> ModelInfo:
    """Depth and width of a model from its config (embedded facts, local config.json, HF cache or hub).

    Raises ``ValueError`` with a user-facing reason when the model cannot be identified.
    """
    from crl_ray.data import assets

    if name.startswith("embedded:"):
        key = name.split(":", 1)[1]
        info = assets.EMBEDDED_MODEL_INFO.get(key)
        if info is None:
            raise ValueError(f"unknown embedded model; known: "
                             f"{', '.join('embedded:' + k for k in assets.EMBEDDED_MODEL_INFO)}")
        return ModelInfo(info["num_hidden_layers"], info["hidden_size"], "embedded asset facts")
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"no config.json in {path}; a local model must be a transformers folder")
        return _from_config_dict(json.loads(cfg_file.read_text()), str(cfg_file))
    # config.json through huggingface_hub (importing transformers alone takes seconds)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return _from_config_dict(json.loads(Path(cached).read_text()), "HF cache")
    if hub_reachable():
        try:
            file = hf_hub_download(name, "config.json", revision=revision)
        except Exception as exc:  # the hub raises many types; the first line says what happened
            raise ValueError(f"cannot read its config from the hub: {str(exc).splitlines()[0]}") from None
        return _from_config_dict(json.loads(Path(file).read_text()), "HF hub")
    if name in KNOWN_MODELS:
        log.warning("hub unreachable: using the known depth of %s (%d blocks) without its config",
                    name, KNOWN_MODELS[name]["num_hidden_layers"])
        info = KNOWN_MODELS[name]
        return ModelInfo(info["num_hidden_layers"], info["hidden_size"], "known-model table (offline)")
    raise ValueError("not a local folder, not in the HF cache, and the hub is unreachable")


def _from_config_dict(cfg: dict, source: str) -> ModelInfo:
    text = cfg.get("text_config") or cfg
    depth = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")
    hidden = text.get("hidden_size") or text.get("n_embd") or 0
    if not depth:
        raise ValueError(f"its config ({source}) has no num_hidden_layers")
    return ModelInfo(int(depth), int(hidden), source)


# --------------------------------------------------------------------------------------------- semantic
def semantic_problems(cfg: SweepConfig, info: ModelInfo | None, prefix: str = "") -> list[Problem]:
    """Cross-field problems of a schema-valid config (``info`` None when the model is unknown)."""
    p: list[Problem] = []
    loss, mining = cfg.loss, cfg.mining
    if info is not None:
        n = info.num_blocks
        fix = f"the model has {n} blocks: hidden_states indices go from 0 to {n}"
        layer_specs: list[tuple[str, LayerSpec]] = [("loss.target_layers", loss.target_layers)]
        if isinstance(loss.benign_layers, LayerSpec):
            layer_specs.append(("loss.benign_layers", loss.benign_layers))
        layer_specs += [("loss.circuit_breakers.layers", loss.circuit_breakers.layers),
                        ("loss.repbend.unsafe_layers", loss.repbend.unsafe_layers)]
        for path, spec in layer_specs:
            bad = [i for i in spec.resolve(n) if i > n]
            if bad:
                p.append(Problem(prefix + path, f"layer indices {bad} exceed the model's depth", spec.to_yaml(), fix))
        if isinstance(cfg.lora.blocks, list):
            bad = [b for b in cfg.lora.blocks if b < 0 or b >= n]
            if bad:
                p.append(Problem(prefix + "lora.blocks", f"blocks {bad} do not exist", cfg.lora.blocks,
                                 f"decoder blocks go from 0 to {n - 1}"))
            elif not cfg.lora.blocks:
                p.append(Problem(prefix + "lora.blocks", "empty block list", [], "use auto, all or a list"))
        if mining.enabled and mining.block_high >= n:
            p.append(Problem(prefix + "mining.block_high", "block does not exist", mining.block_high,
                             f"decoder blocks go from 0 to {n - 1}"))
    # fields that would be silently ignored
    crl_only = ("alpha", "beta", "gamma", "margin_benign", "margin_harmful", "dist_benign_pos", "dist_benign_neg",
                "dist_harmful_pos", "dist_harmful_neg", "benign_layers", "benign_mask", "first_k")
    if loss.kind != "crl":
        for key in sorted(set(crl_only) & loss.model_fields_set):
            p.append(Problem(prefix + f"loss.{key}", f"only used by loss.kind crl, but kind is {loss.kind}",
                             getattr(loss, key), "remove it or set loss.kind: crl"))
        if mining.enabled:
            p.append(Problem(prefix + "mining.enabled", f"mining is part of the CRL method, not {loss.kind}",
                             True, "set mining.enabled: false or loss.kind: crl"))
        if cfg.train.frozen_cache is True:
            p.append(Problem(prefix + "train.frozen_cache", f"implemented for loss.kind crl, not {loss.kind}",
                             True, "set train.frozen_cache: auto (on for crl only) or false, or loss.kind: crl"))
    for kind in ("circuit_breakers", "repbend"):
        if kind in loss.model_fields_set and loss.kind != kind:
            p.append(Problem(prefix + f"loss.{kind}", f"settings for loss.kind {kind}, but kind is {loss.kind}",
                             has_value=False, fix=f"remove loss.{kind} or set loss.kind: {kind}"))
    if mining.enabled and mining.kind == "embedding" and not loss.harmful_mask.startswith("response"):
        # the soft prompt shifts the request's tokens; only response columns line up with the frozen pass
        p.append(Problem(prefix + "loss.harmful_mask", "mining.kind embedding inserts a soft prompt into the "
                         "request, so request positions no longer match the original pass", loss.harmful_mask,
                         "use a response_* mask (e.g. response_all) or mining.kind: latent"))
    if not mining.enabled:
        for key in sorted(mining.model_fields_set - {"enabled"}):
            p.append(Problem(prefix + f"mining.{key}", "set while mining.enabled is false (it would be ignored)",
                             getattr(mining, key), "set mining.enabled: true or remove it"))
    p += eval_problems(cfg.eval, cfg.objective, prefix)
    obj, search, sched, res = cfg.objective, cfg.search, cfg.scheduler, cfg.resources
    if obj.kind == "pareto" and search.algorithm not in ("nsga2", "random"):
        p.append(Problem(prefix + "objective.kind", f"a Pareto objective needs search.algorithm nsga2 or random "
                         f"(got {search.algorithm})", obj.kind, "set search.algorithm: nsga2"))
    if search.algorithm == "nsga2" and obj.kind != "pareto":
        p.append(Problem(prefix + "search.algorithm", "nsga2 optimises the Pareto objective", "nsga2",
                         "set objective.kind: pareto, or use search.algorithm: tpe"))
    if search.algorithm == "none":
        if search.space:
            p.append(Problem(prefix + "search.space", "algorithm none runs the config as written, no search",
                             list(search.space), "remove search.space or pick an algorithm (tpe)"))
        if search.num_trials != 1:
            p.append(Problem(prefix + "search.num_trials", "algorithm none runs exactly one trial",
                             search.num_trials, "set search.num_trials: 1"))
    elif not search.space:
        p.append(Problem(prefix + "search.space", f"algorithm {search.algorithm} has nothing to search", {},
                         "add parameters to search.space, or set search.algorithm: none"))
    if sched.kind == "none":
        for key in sorted(sched.model_fields_set - {"kind"}):
            p.append(Problem(prefix + f"scheduler.{key}", "set while scheduler.kind is none (it would be ignored)",
                             getattr(sched, key), "set scheduler.kind: asha or remove it"))
    if sched.kind == "asha" and sched.eval_every is None:
        p.append(Problem(prefix + "scheduler.eval_every", "asha needs intermediate evaluations", None,
                         "set scheduler.eval_every to a number of optimizer steps"))
    if sched.kind == "asha" and sched.eval_every and sched.eval_every >= cfg.train.steps:
        p.append(Problem(prefix + "scheduler.eval_every", f"no intermediate evaluation before the last step "
                         f"({cfg.train.steps})", sched.eval_every, "use a smaller value than train.steps"))
    if not res.use_gpu and "gpus_per_worker" in res.model_fields_set:
        p.append(Problem(prefix + "resources.gpus_per_worker", "set while use_gpu is false (it would be ignored)",
                         res.gpus_per_worker, "set resources.use_gpu: true or remove it"))
    if res.use_gpu and res.gpus_per_worker <= 0:
        p.append(Problem(prefix + "resources.gpus_per_worker", "use_gpu needs GPUs per worker",
                         res.gpus_per_worker, "set a value > 0"))
    if cfg.train.warmup_steps >= cfg.train.steps and cfg.train.warmup_steps:
        p.append(Problem(prefix + "train.warmup_steps", "warm-up as long as the whole run",
                         cfg.train.warmup_steps, f"use fewer than train.steps ({cfg.train.steps})"))
    from crl_ray.storage import is_uri, uri_problem

    bad_uri = uri_problem(cfg.storage.path) if is_uri(cfg.storage.path) else None
    if bad_uri:
        p.append(Problem(prefix + "storage.path", bad_uri, cfg.storage.path,
                         "use s3://bucket/prefix (or gs://, abfs://, hdfs://) or a folder"))
    if is_uri(cfg.storage.path) and res.num_workers == 0:
        p.append(Problem(prefix + "storage.path", "resources.num_workers: 0 (in-process training) keeps its "
                         "checkpoints in a folder", cfg.storage.path, "use a folder, or num_workers >= 1"))
    if cfg.storage.head_path is not None and is_uri(cfg.storage.head_path):
        p.append(Problem(prefix + "storage.head_path", "must be a folder on the head (the Optuna study and MLflow "
                         "database are sqlite files)", cfg.storage.head_path, "use a folder, e.g. crl_runs"))
    return p


def eval_problems(ev: EvalConfig, obj: ObjectiveConfig, prefix: str = "") -> list[Problem]:
    """Problems within the eval and objective sections (also checked by ``python -m crl_ray.evaluate`` alone)."""
    p: list[Problem] = []
    if ev.judge == "classifier" and not ev.judge_model:
        p.append(Problem(prefix + "eval.judge_model", "judge classifier needs a judge model", None,
                         "name an HF model id, e.g. cais/HarmBench-Llama-2-13b-cls"))
    if ev.judge == "keyword" and ev.judge_model:
        p.append(Problem(prefix + "eval.judge_model", "the keyword judge uses no model", ev.judge_model,
                         "remove it, or set eval.judge: probe or classifier"))
    for section, used in (("embedding", "embedding"), ("gcg", "gcg")):
        if section in ev.model_fields_set and used not in ev.attacks:
            p.append(Problem(prefix + f"eval.{section}", f"settings for the {used} attack, which is not in "
                             "eval.attacks", has_value=False,
                             fix=f"add {used} to eval.attacks, or remove the section (on the command line: "
                                 f"~eval.{section})"))
    mmlu = ev.mmlu
    if mmlu.backend == "lm_eval":
        if importlib.util.find_spec("lm_eval") is None:
            p.append(Problem(prefix + "eval.mmlu.backend", "lm_eval (lm-evaluation-harness) is not installed",
                             mmlu.backend, "pip install lm-eval, or set eval.mmlu.backend: subset"))
        if "subset_size" in mmlu.model_fields_set:
            p.append(Problem(prefix + "eval.mmlu.subset_size", "ignored by backend lm_eval (it runs all of MMLU)",
                             mmlu.subset_size, "remove it or set eval.mmlu.backend: subset"))
    p += check_source(ev.kl_prompts, prefix + "eval.kl_prompts", needs_answers=False)
    if obj.asr_attack not in ("max", *ev.attacks):
        p.append(Problem(prefix + "objective.asr_attack", "that attack is not run", obj.asr_attack,
                         f"use max or one of {', '.join(ev.attacks)}"))
    return p


def data_problems(cfg: SweepConfig) -> list[Problem]:
    """Problems of every data source, plus train/evaluation overlap of sources."""
    p: list[Problem] = []
    ev = (cfg.eval.behaviors.source, cfg.eval.behaviors.split)
    for group in ("benign", "harmful", "retain"):
        for i, src in enumerate(getattr(cfg.data, group)):
            where = f"data.{group}[{i}].source"
            p += check_source(src, f"data.{group}[{i}]")
            if group != "retain" and (src.source, src.split) == ev:
                p.append(Problem(where, "the same source and split as eval.behaviors: "
                                 "training and evaluation behaviours must be disjoint", src.source,
                                 "train on another source (e.g. advbench) or evaluate on harmbench_test"))
            if group != "harmful" and src.source == cfg.eval.over_refusal.source:
                p.append(Problem(where, "also the over-refusal evaluation set", src.source,
                                 "keep over-refusal prompts out of training (use benign_prompts)"))
            if group == "harmful" and src.source in EMBEDDED_SOURCES and not EMBEDDED_SOURCES[src.source].harmful:
                p.append(Problem(where, "not a harmful-behaviour dataset", src.source,
                                 "use advbench, a harmful HF dataset or a file of harmful prompts"))
    p += check_source(cfg.eval.behaviors, "eval.behaviors", needs_answers=False)
    p += check_source(cfg.eval.over_refusal, "eval.over_refusal", needs_answers=False)
    return p


# --------------------------------------------------------------------------------------------- search space
def field_at(path: str) -> tuple[Any, str | None]:
    """The pydantic FieldInfo at a dotted path of SweepConfig, or (None, reason)."""
    model: Any = SweepConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None, f"'{'.'.join(parts[:i])}' is not a section"
        field = model.model_fields.get(part)
        if field is None:
            return None, f"no key '{part}' in {'.'.join(parts[:i]) or 'the sweep file'}"
        if i == len(parts) - 1:
            return field, None
        model = _section_type(field.annotation)
    return None, "empty path"


def set_path(data: dict, path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def space_samples(param: Any) -> list[tuple[str, Any]]:
    """The extreme values of a search parameter, each labelled by the key it comes from."""
    if isinstance(param, (FloatParam, IntParam)):
        return [("low", param.low), ("high", param.high)]
    if isinstance(param, CategoricalParam):
        return [(f"choices[{i}]", c) for i, c in enumerate(param.choices)]
    if isinstance(param, LayerWindowParam):
        lo = param.start[0]
        hi = param.start[1] + param.size[1] - 1
        return [("start", {"range": [param.start[0], param.start[0] + param.size[0] - 1]}),
                ("size", {"range": [param.start[1], hi]})] if lo <= hi else []
    return []


def space_problems(raw: dict, cfg: SweepConfig, info: ModelInfo | None) -> list[Problem]:
    """Problems of search.space: unknown or unsearchable keys, bad bounds, values the config would reject."""
    p: list[Problem] = []
    for key, param in cfg.search.space.items():
        where = f"search.space[{key}]"
        field, reason = field_at(key)
        if field is None:
            p.append(Problem(where, f"not a config key: {reason}", key, "use a dotted path such as loss.margin_benign"))
            continue
        if key.split(".")[0] in UNSEARCHABLE:
            p.append(Problem(where, "this key describes the sweep and cannot be searched", key,
                             "search model, lora, loss, mining, data, train or eval keys"))
            continue
        if isinstance(param, (FloatParam, IntParam)):
            if param.low > param.high:
                p.append(Problem(where + ".low", f"low > high ({param.low} > {param.high})", param.low,
                                 "swap low and high"))
                continue
            if param.log and param.low <= 0:
                p.append(Problem(where + ".low", "a log scale needs low > 0", param.low,
                                 "use a positive low or log: false"))
                continue
        if isinstance(param, LayerWindowParam):
            if field.annotation is not LayerSpec and "LayerSpec" not in str(field.annotation):
                p.append(Problem(where + ".type", "layer_window only applies to layer-set keys", key,
                                 "use it on loss.target_layers (or another layer set)"))
                continue
            bad = [(k, v) for k, v in (("start", param.start), ("size", param.size)) if v[0] > v[1] or v[0] < 0]
            for k, v in bad:
                p.append(Problem(f"{where}.{k}", "needs 0 <= min <= max", list(v), "write [min, max]"))
            if param.size[0] < 1:
                p.append(Problem(f"{where}.size", "a window holds at least one layer", list(param.size),
                                 "use a size >= 1"))
            if bad or param.size[0] < 1:
                continue
        for label, value in space_samples(param):
            trial = copy.deepcopy(raw)
            set_path(trial, key, value)
            try:
                sample = SweepConfig.model_validate(trial)
            except Exception as exc:  # ValidationError
                for sub in schema_problems(exc) if hasattr(exc, "errors") else []:
                    if sub.path.startswith(key) or sub.path == "":
                        p.append(Problem(f"{where}.{label}", f"value rejected for {key}: {sub.message}", value,
                                         sub.fix or "use a value the key accepts"))
                continue
            for sub in semantic_problems(sample, info):
                if sub.path.startswith(key):
                    p.append(Problem(f"{where}.{label}", f"value rejected for {key}: {sub.message}", value, sub.fix))
    return p


# --------------------------------------------------------------------------------------------- warnings
# Largest value of each bounded distance (crl_ray.training.losses.distance): 1 - cos <= 2; 0.3 * ||x^ - y^||^2 <= 0.3 * 4.
# l2 and mix grow without bound.
DISTANCE_MAX: dict[str, float] = {"cosine": 2.0, "l2_normalized_sq": 1.2}

# (margin key, key of its subtracted distance d_neg, weight key of the term, hinge, symbols of m and d_neg, the hinge)
_HINGES = (("margin_benign", "dist_benign_neg", "alpha", "benign", "m_b", "d_bn", "ReLU(d_bp - d_bn + m_b)"),
           ("margin_harmful", "dist_harmful_neg", "beta", "harmful", "m_h", "d_hn", "ReLU(d_hp - d_hn + m_h)"))


def margin_warnings(cfg: SweepConfig) -> list[str]:
    """Warnings for triplet margins (fixed or searched) that cannot change the gradient; [] when all can.

    A hinge ReLU(d_pos - d_neg + m) with d_pos >= 0 is positive for every input once m >= max(d_neg). With a bounded
    d_neg (cosine <= 2, l2_normalized_sq <= 1.2) a margin at or above that bound keeps every hinge active: the margin
    is then an additive constant with zero gradient, and all such margins train the same model. l2 and mix are
    unbounded, so no margin is ruled out for them. Distances searched as categorical choices are checked per choice.
    """
    loss, space = cfg.loss, cfg.search.space
    if loss.kind != "crl" and "loss.kind" not in space:
        return []
    out: list[str] = []
    for margin_key, dist_key, weight_key, hinge, m, d_neg, formula in _HINGES:
        if getattr(loss, weight_key) == 0 and f"loss.{weight_key}" not in space:
            continue  # the term is off
        dist_param = space.get(f"loss.{dist_key}")
        dists = ([c for c in dist_param.choices if isinstance(c, str)] if isinstance(dist_param, CategoricalParam)
                 else [getattr(loss, dist_key)])
        for dist in dict.fromkeys(dists):
            if dist not in DISTANCE_MAX:
                continue
            bound = DISTANCE_MAX[dist]
            when = f" (when loss.{dist_key} is {dist})" if dist_param is not None else ""
            why = (f"with {m} >= {bound:g} the {hinge} hinge {formula} is active at every token ({d_neg} = {dist} "
                   f"is at most {bound:g}), so the margin is an additive constant with zero gradient{when}")
            fix_dist = f"or use an unbounded distance (l2 or mix) for loss.{dist_key}"
            param = space.get(f"loss.{margin_key}")
            if param is None:
                margin = getattr(loss, margin_key)
                if margin >= bound:
                    out.append(f"loss.{margin_key} = {margin:g} >= {bound:g}: {why}. Fix: set loss.{margin_key} "
                               f"below {bound:g}, {fix_dist}.")
            elif isinstance(param, (FloatParam, IntParam)):
                where = f"search.space[loss.{margin_key}]"
                if param.low >= bound:
                    out.append(f"{where} searches {param.low:g}..{param.high:g}, all >= {bound:g}, and no value in "
                               f"it changes training: {why}. Fix: search below {bound:g} (e.g. high: {bound:g}), "
                               f"{fix_dist}.")
                elif param.high > bound:
                    out.append(f"{where} searches {param.low:g}..{param.high:g}, but every value from {bound:g} to "
                               f"{param.high:g} trains the same model: {why}. Fix: set high: {bound:g}, {fix_dist}.")
            elif isinstance(param, CategoricalParam):
                dead = [c for c in param.choices if isinstance(c, (int, float)) and c >= bound]
                if dead:
                    out.append(f"search.space[loss.{margin_key}] choices {dead} are >= {bound:g} and all train the "
                               f"same model: {why}. Fix: choose margins below {bound:g}, {fix_dist}.")
    return out


# --------------------------------------------------------------------------------------------- entry
def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, ModelInfo]:
    """Read, override and validate a sweep file; raise ConfigError listing every problem found."""
    source = str(path)
    raw, problems = read_sweep_file(path)
    if raw is None:
        raise ConfigError(problems, source)
    problems += apply_overrides(raw, list(overrides or []))
    try:
        cfg = parse_config(copy.deepcopy(raw), source)
        if problems:
            raise ConfigError([], source)
    except ConfigError as exc:
        # still report model problems alongside schema ones when the model key itself is fine
        extra: list[Problem] = []
        model_name = (raw.get("model") or {}).get("name") if isinstance(raw.get("model"), dict) else None
        if isinstance(model_name, str) and not any(pr.path.startswith("model") for pr in exc.problems):
            try:
                model_info(model_name)
            except ValueError as why:
                extra.append(Problem("model.name", f"cannot identify the model: {why}", model_name,
                                     "use embedded:smollm2-135m-instruct, a local folder or a reachable HF id"))
        raise ConfigError(problems + exc.problems + extra, source) from None
    info: ModelInfo | None
    try:
        info = model_info(cfg.model.name, cfg.model.revision)
    except ValueError as why:
        info = None
        problems.append(Problem("model.name", f"cannot identify the model: {why}", cfg.model.name,
                                "use embedded:smollm2-135m-instruct, a local folder or a reachable HF id"))
    problems += semantic_problems(cfg, info)
    problems += data_problems(cfg)
    problems += space_problems(raw, cfg, info)
    problems += search_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    assert info is not None
    return cfg, info


def search_problems(cfg: SweepConfig) -> list[Problem]:
    """What Optuna would reject only once the sweep runs: log scales with steps, settings another algorithm ignores."""
    p: list[Problem] = []
    for key, param in cfg.search.space.items():
        if isinstance(param, FloatParam) and param.log and param.step is not None:
            p.append(Problem(f"search.space[{key}].step", "Optuna cannot combine a log scale with a step",
                             param.step, "remove step or set log: false"))
        if isinstance(param, IntParam) and param.log and param.step != 1:
            p.append(Problem(f"search.space[{key}].step", "Optuna cannot combine a log scale with a step",
                             param.step, "remove step or set log: false"))
    if cfg.search.startup_trials is not None and cfg.search.algorithm != "tpe":
        p.append(Problem("search.startup_trials", f"only used by search.algorithm tpe "
                         f"(algorithm is {cfg.search.algorithm})", cfg.search.startup_trials,
                         "remove it or set search.algorithm: tpe"))
    if cfg.search.population_size is not None and cfg.search.algorithm != "nsga2":
        p.append(Problem("search.population_size", f"only used by search.algorithm nsga2 "
                         f"(algorithm is {cfg.search.algorithm})", cfg.search.population_size,
                         "remove it or set search.algorithm: nsga2"))
    return p
