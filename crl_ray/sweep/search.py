"""The search: a sweep file's ``search.space`` as an Optuna define-by-run function, and the Tune searcher.

Optuna names each sampled value by its config path (``loss.margin_benign``); a layer window samples two
values, ``<path>:start`` and ``<path>:size``, that :func:`param_values` turns into an inclusive hidden_states
range. The study lives in an sqlite file next to the sweep's storage (study name = sweep name), so a resumed
sweep continues the same study.

The limits of ``objective.constraints`` reach Optuna as trial constraints (``Trial.set_constraint``), set by
:class:`ConstrainedOptunaSearch` from each finished trial's ``eval/*`` metrics before it tells the study: TPE and
NSGA-II then rank infeasible trials below feasible ones, and ``study.best_trial`` / ``best_trials`` skip them.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crl_ray.config import (
    CategoricalParam,
    FloatParam,
    IntParam,
    LayerWindowParam,
    ObjectiveConfig,
    SearchParam,
    SweepConfig,
)
from crl_ray.evaluate.objective import constraint_values, unchecked_constraints

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

METRIC = "objective"  # Tune's metric (maximised): the scalar objective, also reported in Pareto sweeps
PARETO_METRICS = ("objectives/asr", "objectives/capability")  # NSGA-II / random in Pareto mode
PARETO_MODES = ("min", "max")
WINDOW_START, WINDOW_SIZE = ":start", ":size"


class SpaceSampler:
    """Define-by-run function for Optuna: suggests every entry of ``search.space`` (picklable, for Tune)."""

    def __init__(self, space: dict[str, SearchParam]) -> None:
        self.space = dict(space)

    def __call__(self, trial: optuna.Trial) -> None:
        for key, param in self.space.items():
            if isinstance(param, FloatParam):
                trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
            elif isinstance(param, IntParam):
                trial.suggest_int(key, param.low, param.high, log=param.log, step=param.step)
            elif isinstance(param, CategoricalParam):
                trial.suggest_categorical(key, _categorical_choices(param))
            elif isinstance(param, LayerWindowParam):
                trial.suggest_int(key + WINDOW_START, param.start[0], param.start[1])
                trial.suggest_int(key + WINDOW_SIZE, param.size[0], param.size[1])
            else:  # the schema admits no other kind
                raise TypeError(f"unsupported search parameter for {key}: {param!r}")


def _categorical_choices(param: CategoricalParam) -> list[Any]:
    """Optuna stores only None/bool/int/float/str choices; lists and mappings go in as their YAML text."""
    return [c if c is None or isinstance(c, (bool, int, float, str)) else _Encoded.encode(c) for c in param.choices]


class _Encoded:
    PREFIX = "yaml:"

    @staticmethod
    def encode(value: Any) -> str:
        import yaml

        return _Encoded.PREFIX + yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()

    @staticmethod
    def decode(value: Any) -> Any:
        import yaml

        if isinstance(value, str) and value.startswith(_Encoded.PREFIX):
            return yaml.safe_load(value[len(_Encoded.PREFIX):])
        return value


def param_values(space: dict[str, SearchParam], sampled: dict[str, Any]) -> dict[str, Any]:
    """Config values (path -> value) for one trial's sampled values; a layer window becomes {range: [a, b]}."""
    values: dict[str, Any] = {}
    for key, param in space.items():
        if isinstance(param, LayerWindowParam):
            start, size = int(sampled[key + WINDOW_START]), int(sampled[key + WINDOW_SIZE])
            values[key] = {"range": [start, start + size - 1]}
        elif isinstance(param, CategoricalParam):
            values[key] = _Encoded.decode(sampled[key])
        else:
            values[key] = sampled[key]
    return values


def population_size(cfg: SweepConfig) -> int:
    """NSGA-II generation size: the configured one, else a quarter of the trials (at least 2)."""
    return cfg.search.population_size or max(2, cfg.search.num_trials // 4)


def make_sampler(cfg: SweepConfig, concurrency: int = 1) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler of ``search.algorithm`` (TPE uses the constant liar when trials overlap)."""
    import optuna

    seed = cfg.search.seed
    algorithm = cfg.search.algorithm
    if algorithm == "tpe":
        startup = {} if cfg.search.startup_trials is None else {"n_startup_trials": cfg.search.startup_trials}
        return optuna.samplers.TPESampler(seed=seed, constant_liar=concurrency > 1, **startup)
    if algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size(cfg))
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"search.algorithm {algorithm} uses no sampler")


def study_storage_url(sweep_dir: Path) -> str:
    """sqlite URL of the sweep's Optuna study (next to the Tune experiment, survives restarts)."""
    return f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


@functools.cache
def _constrained_search_class() -> type:
    """Builds :class:`ConstrainedOptunaSearch` on first use: it subclasses Ray's OptunaSearch, and importing Ray
    takes over a second that a dry run should not pay. The module's ``__getattr__`` hands out this one class, so
    pickle (Tune checkpoints its searcher) finds it by name like any other."""
    from ray.tune.search.optuna import OptunaSearch

    class ConstrainedOptunaSearch(OptunaSearch):
        """OptunaSearch that sets ``objective.constraints`` on each Optuna trial before telling the study.

        The values come from the trial's last result (its ``eval/*`` metrics) through
        :func:`crl_ray.evaluate.objective.constraint_values`. A limit whose metrics the result lacks is not applied, and a
        warning names it once.
        """

        def __init__(self, *args: Any, objective: ObjectiveConfig, **kwargs: Any) -> None:
            self.objective = objective
            self._unchecked_warned: set[str] = set()
            super().__init__(*args, **kwargs)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            if result and ot_trial is not None and trial_id not in self._completed_trials:
                self._set_constraints(ot_trial, result)
            super().on_trial_complete(trial_id, result=result, error=error)

        def _set_constraints(self, ot_trial: optuna.Trial, result: dict) -> None:
            for key, value in constraint_values(result, self.objective).items():
                ot_trial.set_constraint(key, value)
            reported = all(m in result for m in (self.metric if isinstance(self.metric, list) else [self.metric]))
            if reported:  # a trial that failed before its first evaluation is no news about the evaluation
                for name, missing in unchecked_constraints(result, self.objective).items():
                    if name not in self._unchecked_warned:
                        self._unchecked_warned.add(name)
                        log.warning("objective.constraints: the %s limit is not applied: the evaluation does not "
                                    "report %s", name, ", ".join(missing))

    ConstrainedOptunaSearch.__qualname__ = "ConstrainedOptunaSearch"
    return ConstrainedOptunaSearch


def __getattr__(name: str) -> Any:
    if name == "ConstrainedOptunaSearch":
        return _constrained_search_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_searcher(cfg: SweepConfig, sweep_dir: Path, concurrency: int = 1):
    """A :class:`ConstrainedOptunaSearch` for the sweep, or None for ``search.algorithm: none`` (the file's values,
    once)."""
    if cfg.search.algorithm == "none":
        return None
    import optuna

    storage = optuna.storages.RDBStorage(study_storage_url(sweep_dir))
    if cfg.objective.kind == "pareto":
        metric, mode = list(PARETO_METRICS), list(PARETO_MODES)
    else:
        metric, mode = METRIC, "max"
    return _constrained_search_class()(SpaceSampler(cfg.search.space), metric=metric, mode=mode,
                                       sampler=make_sampler(cfg, concurrency), study_name=cfg.name,
                                       storage=storage, objective=cfg.objective)


def load_study(cfg: SweepConfig, sweep_dir: Path) -> optuna.Study | None:
    """The sweep's persisted study, or None when there is none (yet)."""
    import optuna

    url = study_storage_url(sweep_dir)
    if not (Path(sweep_dir) / "optuna.db").exists():
        return None
    try:
        return optuna.load_study(study_name=cfg.name, storage=url)
    except KeyError:  # no study of that name in the file
        return None


def close_orphan_trials(cfg: SweepConfig, sweep_dir: Path) -> int:
    """Mark study trials still RUNNING after the sweep ended as FAIL (asked, never run); returns how many.

    Tune asks Optuna for a trial before it checkpoints the experiment; an interruption in between leaves a
    trial that no Tune trial will ever tell. Only call this when no trial is running.
    """
    import optuna

    study = load_study(cfg, sweep_dir)
    if study is None:
        return 0
    orphans = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in orphans:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if orphans:
        log.warning("marked %d Optuna trial(s) that never ran as FAIL: %s", len(orphans),
                    [t.number for t in orphans])
    return len(orphans)


def segments(cfg: SweepConfig) -> list[int]:
    """Optimizer steps after which a trial is evaluated and reported: every eval_every with ASHA, else the end.

    Training runs in these segments so that Tune can stop a trial only between them (see crl_ray.sweep.trial).
    """
    steps = cfg.train.steps
    every = cfg.scheduler.eval_every if cfg.scheduler.kind == "asha" else None
    if not every:
        return [steps]
    return list(range(every, steps, every)) + [steps]


def make_scheduler(cfg: SweepConfig):
    """ASHA on the objective, one rung per evaluation (training_iteration counts segments); None without."""
    if cfg.scheduler.kind == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=len(segments(cfg)),
                         grace_period=cfg.scheduler.grace_period, reduction_factor=cfg.scheduler.reduction_factor)
