"""The search space as Optuna sees it, the samplers, the constrained searcher fed as Tune feeds it, and the ASHA
segmentation (no Ray started)."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from test_objective import COLLAPSED, UNTOUCHED, USEFUL

from crl_ray.config import LayerSpec
from crl_ray.evaluate.objective import (
    constraint_values,
    scalar_objective,
    vector_objective,
)
from crl_ray.sweep import cli as sweep_cli
from crl_ray.sweep import run as sweep
from crl_ray.sweep import search
from crl_ray.sweep.trial import report_metrics, resolve_trial_config
from crl_ray.validate import load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"

SPACE = [
    "search.space={"
    "loss.margin_benign: {type: float, low: 0.5, high: 8.0, log: true},"
    "loss.margin_harmful: {type: float, low: 1.0, high: 3.0, step: 0.5},"
    "lora.r: {type: int, low: 2, high: 16, log: true},"
    "train.steps: {type: int, low: 2, high: 10, step: 2},"
    "loss.dist_benign_pos: {type: categorical, choices: [l2, cosine]},"
    "loss.benign_layers: {type: categorical, choices: [target, [3, 4], {range: [5, 7]}]},"
    "loss.target_layers: {type: layer_window, start: [10, 20], size: [2, 6]}}",
]


def smoke(*overrides: str):
    cfg, _ = load_config(SMOKE, list(overrides))
    return cfg


def sample(cfg, n: int, seed: int = 0) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampler = search.SpaceSampler(cfg.search.space)
    for _ in range(n):
        trial = study.ask()
        sampler(trial)
        study.tell(trial, 0.0)
    return study


def test_every_param_type_becomes_the_right_distribution() -> None:
    cfg = smoke(*SPACE)
    study = sample(cfg, 40)
    dists = study.trials[0].distributions
    D = optuna.distributions
    assert dists["loss.margin_benign"] == D.FloatDistribution(0.5, 8.0, log=True)
    assert dists["loss.margin_harmful"] == D.FloatDistribution(1.0, 3.0, step=0.5)
    assert dists["lora.r"] == D.IntDistribution(2, 16, log=True)
    assert dists["train.steps"] == D.IntDistribution(2, 10, step=2)
    assert dists["loss.dist_benign_pos"] == D.CategoricalDistribution(["l2", "cosine"])
    assert dists["loss.target_layers:start"] == D.IntDistribution(10, 20)
    assert dists["loss.target_layers:size"] == D.IntDistribution(2, 6)
    seen_layers = set()
    for t in study.trials:
        values = search.param_values(cfg.search.space, t.params)
        assert set(values) == set(cfg.search.space)  # one config value per space entry
        start, size = t.params["loss.target_layers:start"], t.params["loss.target_layers:size"]
        assert values["loss.target_layers"] == {"range": [start, start + size - 1]}
        assert values["loss.margin_harmful"] in (1.0, 1.5, 2.0, 2.5, 3.0)
        assert values["train.steps"] in (2, 4, 6, 8, 10)
        seen_layers.add(repr(values["loss.benign_layers"]))
        # the resolved config takes every value and validates
        resolved = resolve_trial_config(sweep.dump_config(cfg), t.params)
        assert resolved.loss.target_layers.resolve(30) == list(range(start, start + size))
        assert resolved.lora.r == t.params["lora.r"] and resolved.train.steps == t.params["train.steps"]
    # categorical lists and mappings survive Optuna (stored as text) and come back as YAML values
    assert seen_layers == {"'target'", "[3, 4]", "{'range': [5, 7]}"}
    resolved = resolve_trial_config(sweep.dump_config(cfg), {**study.trials[0].params,
                                                               "loss.benign_layers": "yaml:{range: [5, 7]}"})
    assert resolved.loss.benign_layers == LayerSpec(range=(5, 7))


def test_same_seed_same_trials_other_seed_other_trials() -> None:
    cfg = smoke()
    first = [t.params for t in sample(cfg, 3, seed=1).trials]
    assert first == [t.params for t in sample(cfg, 3, seed=1).trials]
    assert first != [t.params for t in sample(cfg, 3, seed=2).trials]
    s1, s2 = search.make_sampler(cfg), search.make_sampler(smoke("search.seed=5"))
    asked = []
    for sampler in (s1, s2, search.make_sampler(cfg)):
        study = optuna.create_study(sampler=sampler, direction="maximize")
        trial = study.ask()
        search.SpaceSampler(cfg.search.space)(trial)
        asked.append(trial.params)
    assert asked[0] == asked[2] != asked[1]


def test_sampler_per_algorithm_and_nsga2_population() -> None:
    assert isinstance(search.make_sampler(smoke()), optuna.samplers.TPESampler)
    assert isinstance(search.make_sampler(smoke("search.algorithm=random")), optuna.samplers.RandomSampler)
    pareto = ["objective.kind=pareto", "search.algorithm=nsga2", "search.num_trials=12"]
    assert search.population_size(smoke(*pareto)) == 3  # num_trials // 4
    cfg = smoke(*pareto, "search.population_size=2")
    assert search.population_size(cfg) == 2
    # behaviour: with 2 per generation, trials 0-1 are generation 0, 2-3 generation 1, ...
    sampler = search.make_sampler(cfg)
    study = optuna.create_study(sampler=sampler, directions=["minimize", "maximize"])
    for i in range(6):
        trial = study.ask()
        search.SpaceSampler(cfg.search.space)(trial)
        study.tell(trial, [float(i % 3), float(i % 2)])
    generations = [t.system_attrs.get("NSGAIISampler:generation") for t in study.trials]
    assert generations == [0, 0, 1, 1, 2, 2]


def test_searcher_metrics_and_persisted_study(tmp_path) -> None:
    from ray.tune.search.optuna import OptunaSearch

    cfg = smoke()
    searcher = search.make_searcher(cfg, tmp_path)
    assert searcher.metric == "objective" and searcher.mode == "max"
    assert isinstance(searcher, OptunaSearch) and type(searcher) is search.ConstrainedOptunaSearch
    assert searcher.objective == cfg.objective
    assert (tmp_path / "optuna.db").is_file()
    assert search.load_study(cfg, tmp_path).study_name == "smoke"
    pareto = search.make_searcher(smoke("objective.kind=pareto", "search.algorithm=nsga2", "name=p"), tmp_path)
    assert pareto.metric == ["objectives/asr", "objectives/capability"] and pareto.mode == ["min", "max"]
    assert search.make_searcher(smoke("search.algorithm=none", "search.space={}", "search.num_trials=1"),
                                tmp_path) is None


def test_orphan_trials_are_closed(tmp_path) -> None:
    cfg = smoke()
    study = optuna.create_study(study_name=cfg.name, storage=search.study_storage_url(tmp_path),
                                direction="maximize")
    done = study.ask()
    study.tell(done, 1.0)
    study.ask()  # asked, never told: what an interruption can leave
    assert search.close_orphan_trials(cfg, tmp_path) == 1
    states = [t.state for t in search.load_study(cfg, tmp_path).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def asha_decisions(overrides: list[str], results: list[tuple[str, int, float]]) -> list[str]:
    """ASHA's decision for each (trial, evaluation number, objective), fed as Tune would."""
    asha = search.make_scheduler(smoke(*overrides))
    asha.set_search_properties("objective", "max")
    trials: dict[str, SimpleNamespace] = {}
    out = []
    for trial_id, iteration, objective in results:
        if trial_id not in trials:
            trials[trial_id] = SimpleNamespace(trial_id=trial_id, config={})
            asha.on_trial_add(None, trials[trial_id])
        out.append(asha.on_trial_result(None, trials[trial_id],
                                        {"training_iteration": iteration, "objective": objective}))
    return out


def test_segments_and_asha() -> None:
    assert search.segments(smoke("train.steps=6")) == [6]
    assert search.make_scheduler(smoke()) is None
    assert search.segments(smoke("train.steps=7", "scheduler={kind: asha, eval_every: 3}")) == [3, 6, 7]
    asha = ["train.steps=4", "scheduler={kind: asha, eval_every: 1}"]
    # a worse second trial stops at the first evaluation; with grace_period 2 only at the second
    assert asha_decisions(asha, [("a", 1, 1.0), ("b", 1, 0.0)]) == ["CONTINUE", "STOP"]
    graced = ["train.steps=4", "scheduler={kind: asha, eval_every: 1, grace_period: 2}"]
    assert asha_decisions(graced, [("a", 1, 1.0), ("b", 1, 0.0), ("a", 2, 1.0), ("b", 2, 0.0)]) == [
        "CONTINUE", "CONTINUE", "CONTINUE", "STOP"]
    # reduction_factor sets the cut: top half (2) or top third (3) of the rung continues
    results = [("a", 1, 0.0), ("b", 1, 1.0), ("c", 1, 0.6)]
    assert asha_decisions(asha, results)[-1] == "CONTINUE"
    assert asha_decisions(["train.steps=4", "scheduler={kind: asha, eval_every: 1, reduction_factor: 3}"],
                          results)[-1] == "STOP"
    # max_t = number of segments: the last evaluation ends the trial
    assert asha_decisions(["train.steps=2", "scheduler={kind: asha, eval_every: 1}"],
                          [("a", 1, 1.0), ("a", 2, 1.0)]) == ["CONTINUE", "STOP"]


@pytest.mark.parametrize("override,key", [
    ("search.space={train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true, step: 1.0e-5}}",
     "search.space[train.lr].step"),
    ("search.space={lora.r: {type: int, low: 2, high: 16, log: true, step: 2}}", "search.space[lora.r].step"),
    ("search.population_size=4", "search.population_size"),
])
def test_cli_rejects_what_optuna_would(override: str, key: str, capsys) -> None:
    code = sweep_cli.main([str(SMOKE), override, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and key in err and "fix:" in err and out == ""


def test_malformed_sweep_is_rejected_before_anything_starts(tmp_path, capsys) -> None:
    """A real run (no --dry-run) of a broken file exits 2 without starting Ray or writing storage."""
    import ray

    bad = tmp_path / "bad.yaml"
    text, n = re.subn(r"(?m)^  steps: \d+.*$", "  steps: -1\n  stepz: 3", SMOKE.read_text())
    assert n == 1
    bad.write_text(text)
    runs = tmp_path / "runs"
    code = sweep_cli.main([str(bad), f"storage.path={runs}"])
    out, err = capsys.readouterr()
    assert code == 2 and "train.steps" in err and "train.stepz" in err and out == ""
    assert not runs.exists() and not ray.is_initialized()


# ------------------------------------------------------------------------------------------ constraints
def tune_result(cfg, metrics: dict) -> dict:
    """A trial's last result as Tune hands it to the searcher: what the driver reports (crl_ray.sweep.trial)."""
    evaluation = SimpleNamespace(metrics=metrics, objective=scalar_objective(metrics, cfg.objective),
                                 objectives=vector_objective(metrics, cfg.objective))
    return {**report_metrics({"train/loss": 1.0}, evaluation, step=4, final=True), "training_iteration": 1}


def feed(searcher, cfg, evaluations: list[dict]) -> None:
    """Run trials t0, t1, ... through the searcher as Tune does: suggest a config, then complete it with its result."""
    searcher.set_search_properties(None, None, {})
    for i, metrics in enumerate(evaluations):
        assert searcher.suggest(f"t{i}") is not None
        searcher.on_trial_complete(f"t{i}", tune_result(cfg, metrics))


def test_tpe_records_constraints_and_best_trial_is_feasible(tmp_path) -> None:
    # zero penalty weights: collapse has the highest scalar, so only the constraints keep it from winning
    cfg = smoke("objective.over_refusal_weight=0", "objective.degeneracy_weight=0", "objective.capability=mmlu")
    searcher = search.make_searcher(cfg, tmp_path)
    evaluations = [COLLAPSED, USEFUL, UNTOUCHED] * 4  # 12 trials: past TPE's 10 random startup trials
    feed(searcher, cfg, evaluations)
    study = search.load_study(cfg, tmp_path)
    trials = study.trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t, metrics in zip(trials, evaluations):
        assert t.constraints == pytest.approx(constraint_values(metrics, cfg.objective))
    assert trials[0].value == pytest.approx(0.2) and trials[0].value > trials[1].value > trials[2].value
    assert max(trials, key=lambda t: t.value).number == 0  # unconstrained, the collapsed trial would be best
    assert study.best_trial.number == 1 and study.best_trial.value == pytest.approx(0.01)
    assert searcher.suggest("t12") is not None  # TPE proposes from a constrained history


def test_nsga2_parents_and_pareto_set_are_feasible(tmp_path) -> None:
    cfg = smoke("objective.kind=pareto", "search.algorithm=nsga2", "search.population_size=2", "name=p")
    searcher = search.make_searcher(cfg, tmp_path)
    # generation 0: collapsed, useful; generation 1: collapsed, untouched. (ASR, capability): collapsed (0, 0.2),
    # useful (0.2, 0.21), untouched (0.93, 0.215): all three are on the unconstrained front.
    feed(searcher, cfg, [COLLAPSED, USEFUL, COLLAPSED, UNTOUCHED])
    study = search.load_study(cfg, tmp_path)
    assert [t.constraints["kl_benign"] > 0 for t in study.trials] == [True, False, True, False]
    assert {t.number for t in study.best_trials} == {1, 3}
    # the next generation's parents: constrained domination puts both feasible trials first (unconstrained,
    # crowding distance would keep a collapsed trial, the lowest ASR, as a parent)
    assert searcher.suggest("t4") is not None
    parents = search.make_sampler(cfg).get_parent_population(study, 2)
    assert {t.number for t in parents} == {1, 3}


def test_searcher_pickles_and_restores_with_its_limits(tmp_path) -> None:
    import ray.cloudpickle

    cfg = smoke("objective.constraints.max_kl_benign=0.05")  # useful (KL 0.1) is now over the limit too
    searcher = search.make_searcher(cfg, tmp_path)
    feed(searcher, cfg, [UNTOUCHED])
    assert searcher.suggest("t1") is not None  # asked before the checkpoint, told after the restore
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        copy = loads(dumps(searcher))
        assert type(copy) is search.ConstrainedOptunaSearch and copy.objective == cfg.objective
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune does at an experiment checkpoint
    restored = search.make_searcher(cfg, tmp_path)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.objective.constraints.max_kl_benign == 0.05
    restored.on_trial_complete("t1", tune_result(cfg, USEFUL))
    study = search.load_study(cfg, tmp_path)
    assert study.trials[1].state == optuna.trial.TrialState.COMPLETE
    assert study.trials[1].constraints["kl_benign"] == pytest.approx(0.1 - 0.05)
    assert study.best_trial.number == 0  # the untouched model: feasible, although it scores lower


def test_limit_without_its_metric_is_skipped_with_one_warning(tmp_path, caplog) -> None:
    cfg = smoke("objective.constraints.max_mmlu_drop=0.05")  # smoke.yaml turns this limit off (MMLU at chance)
    searcher = search.make_searcher(cfg, tmp_path)
    without_base = {k: v for k, v in USEFUL.items() if k != "eval/mmlu_base"}
    with caplog.at_level("WARNING", logger="crl_ray.sweep.search"):
        feed(searcher, cfg, [without_base, without_base])
        # a trial that failed before its first evaluation gets no constraints and no warning
        searcher.suggest("t9")
        searcher.on_trial_complete("t9", {"training_iteration": 0}, error=True)
    warnings = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(warnings) == 1 and "mmlu_drop" in warnings[0] and "eval/mmlu_base" in warnings[0]
    trials = search.load_study(cfg, tmp_path).trials
    assert set(trials[0].constraints) == set(trials[1].constraints) == {"over_refusal", "degeneracy_increase",
                                                                        "kl_benign", "helpfulness_drop"}
    assert trials[2].state == optuna.trial.TrialState.FAIL and trials[2].constraints == {}


def test_importing_the_search_module_does_not_import_ray() -> None:
    code = ("import sys, crl_ray.sweep, crl_ray.sweep.search; assert 'ray' not in sys.modules, 'ray imported'; "
            "print(crl_ray.sweep.search.ConstrainedOptunaSearch.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ConstrainedOptunaSearch"


def test_tpe_startup_trials_reach_the_sampler():
    from crl_ray.config import SweepConfig
    from crl_ray.sweep.search import make_sampler
    from crl_ray.validate import search_problems

    base = {"name": "s", "data": {"benign": [{"source": "benign_prompts"}], "harmful": [{"source": "advbench"}],
                                  "retain": [{"source": "benign_prompts"}]}}
    cfg = SweepConfig.model_validate({**base, "search": {"algorithm": "tpe", "startup_trials": 3}})
    assert make_sampler(cfg)._n_startup_trials == 3
    assert make_sampler(SweepConfig.model_validate(base))._n_startup_trials == 10  # Optuna's default
    wrong = SweepConfig.model_validate({**base, "search": {"algorithm": "random", "startup_trials": 3}})
    assert [p.path for p in search_problems(wrong)] == ["search.startup_trials"]
