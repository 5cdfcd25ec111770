"""Sweep-file validation: every shipped file plans; every malformed one exits 2 naming the key, no traceback."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crl_ray.config import (
    LayerSpec,
    deep_merge,
    dump_config,
    parse_config,
    read_sweep_file,
)
from crl_ray.errors import ConfigError, Problem
from crl_ray.sweep import cli as sweep_cli
from crl_ray.sweep import run as sweep
from crl_ray.validate import load_config, model_info

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SMOKE = ROOT / "sweeps" / "smoke.yaml"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = sweep_cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, data, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def smoke_raw() -> dict:
    data, problems = read_sweep_file(SMOKE)
    assert not problems
    return data


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_dry_runs(path: Path, capsys) -> None:
    code, out, err = run_cli([str(path), "--dry-run"], capsys)
    assert code == 0, err
    assert "# Resource plan" in out and "# Search:" in out
    # the printed config is complete and reads back to the same config
    resolved = yaml.safe_load(out.split("\n# Model:")[0])
    cfg, _ = load_config(path)
    assert parse_config(resolved) == cfg


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_starts_with_its_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first == f"# python -m crl_ray.sweep sweeps/{path.name}"


def test_dry_run_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([str(SMOKE), "--dry-run", f"storage.path={tmp_path / 'store'}"], capsys)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []


def test_overrides_apply_and_are_validated(capsys) -> None:
    code, out, _ = run_cli([str(SMOKE), "--dry-run", "train.steps=3", "loss.target_layers=[5, 6]"], capsys)
    assert code == 0
    assert "steps: 3" in out and "target layers (hidden_states): [5, 6]" in out
    code, _, err = run_cli([str(SMOKE), "--dry-run", "train.stepz=3", "nonsense"], capsys)
    assert code == 2
    assert "train.stepz" in err and "did you mean 'steps'" in err and "nonsense" in err


def test_tilde_override_removes_a_key_so_a_feature_can_be_switched_off(capsys) -> None:
    """``eval.attacks=[direct,prefill]`` alone is refused (the file's eval.embedding settings would be ignored);
    with ``~eval.embedding`` it runs. ``~loss`` then ``loss.kind=...`` swaps the loss kind of a CRL file."""
    code, _, err = run_cli([str(SMOKE), "--dry-run", "eval.attacks=[direct,prefill]"], capsys)
    assert code == 2 and "eval.embedding" in err
    code, out, err = run_cli([str(SMOKE), "--dry-run", "eval.attacks=[direct,prefill]", "~eval.embedding"], capsys)
    assert code == 0, err
    assert "- direct\n  - prefill\n" in out
    code, out, err = run_cli([str(SMOKE), "--dry-run", "~loss", "loss.kind=circuit_breakers",
                              "~search.space", "search.algorithm=none", "search.num_trials=1"], capsys)
    assert code == 0, err
    assert "kind: circuit_breakers" in out
    code, _, err = run_cli([str(SMOKE), "--dry-run", "~eval.nosuchkey", "~", "~train.steps.x"], capsys)
    assert code == 2
    assert "eval.nosuchkey: nothing to remove" in err and "expected ~key.path" in err and "train.steps" in err


# Each mutation: (description, function changing the raw smoke mapping, key path the error must name)
def _set(path: str, value):
    def mutate(d: dict) -> None:
        node = d
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if not part.isdigit() else node[int(part)]
        node[parts[-1]] = value
    return mutate


MUTATIONS = [
    ("typo top level", _set("lorra", {"r": 4}), "lorra"),
    ("typo nested", _set("loss.margn_benign", 3.0), "loss.margn_benign"),
    ("typo in list item", lambda d: d["data"]["benign"][0].update(sourc="x"), "data.benign[0].sourc"),
    ("typo deep", _set("eval.embedding.stepz", 3), "eval.embedding.stepz"),
    ("wrong type int", _set("train.steps", "ten"), "train.steps"),
    ("wrong type float", _set("loss.margin_benign", [1, 2]), "loss.margin_benign"),
    ("wrong type section", _set("lora", 5), "lora"),
    ("wrong literal", _set("loss.dist_benign_pos", "euclid"), "loss.dist_benign_pos"),
    ("negative margin", _set("loss.margin_harmful", -1.0), "loss.margin_harmful"),
    ("empty layer set", _set("loss.target_layers", []), "loss.target_layers"),
    ("layer beyond depth", _set("loss.target_layers", [5, 31]), "loss.target_layers"),
    ("range beyond depth", _set("loss.target_layers", {"range": [20, 40]}), "loss.target_layers"),
    ("bad range order", _set("loss.target_layers", {"range": [9, 3]}), "loss.target_layers"),
    ("lora block beyond depth", _set("lora.blocks", [0, 30]), "lora.blocks"),
    ("low > high", lambda d: d["search"]["space"].update({"loss.margin_benign": {"type": "float", "low": 9,
                                                                                 "high": 1}}),
     "search.space[loss.margin_benign].low"),
    ("log with low 0", lambda d: d["search"]["space"].update({"loss.margin_benign": {"type": "float", "low": 0,
                                                                                     "high": 1, "log": True}}),
     "search.space[loss.margin_benign].low"),
    ("space key unknown", lambda d: d["search"]["space"].update({"loss.margin_x": {"type": "float", "low": 1,
                                                                                   "high": 2}}),
     "search.space[loss.margin_x]"),
    ("space value invalid", lambda d: d["search"]["space"].update({"train.steps": {"type": "int", "low": -3,
                                                                                   "high": 2}}),
     "search.space[train.steps].low"),
    ("space type unknown", lambda d: d["search"]["space"].update({"train.lr": {"type": "uniform"}}),
     "search.space[train.lr]"),
    ("window beyond depth", lambda d: d["search"]["space"].update(
        {"loss.target_layers": {"type": "layer_window", "start": [20, 28], "size": [2, 5]}}),
     "search.space[loss.target_layers].size"),
    ("unsearchable key", lambda d: d["search"]["space"].update({"storage.path": {"type": "categorical",
                                                                                 "choices": ["a"]}}),
     "search.space[storage.path]"),
    ("zero trials", _set("search.num_trials", 0), "search.num_trials"),
    ("unknown checkpointing mode", _set("train.activation_checkpointing", "partial"),
     "train.activation_checkpointing"),
    ("checkpoint every 0", _set("train.activation_checkpointing_every", 0), "train.activation_checkpointing_every"),
    ("unpad not a bool", _set("train.unpad", "sometimes"), "train.unpad"),
    ("zero workers negative", _set("resources.num_workers", -1), "resources.num_workers"),
    ("unknown model", _set("model.name", "embedded:smollm3"), "model.name"),
    ("missing model folder", _set("model.name", "./no/such/model"), "model.name"),
    ("unknown dataset", lambda d: d["data"]["harmful"][0].update(source="advbnch"), "data.harmful[0].source"),
    ("missing data file", lambda d: d["data"]["retain"][0].update(source="./nope.jsonl"), "data.retain[0].source"),
    ("unknown column", lambda d: d["eval"]["behaviors"].update(where={"Category": "x"}),
     "eval.behaviors.where.Category"),
    ("train on eval set", lambda d: d["data"]["harmful"][0].update(source="harmbench_val"),
     "data.harmful[0].source"),
    ("missing section", lambda d: d.pop("data"), "data"),
    ("bad name", _set("name", "my sweep"), "name"),
    ("ignored mining field", _set("mining.period", 10), "mining.period"),
    ("ignored scheduler field", _set("scheduler.grace_period", 3), "scheduler.grace_period"),
    ("nsga2 with scalar", _set("search.algorithm", "nsga2"), "search.algorithm"),
    ("unknown attack", _set("eval.attacks", ["direct", "pair"]), "eval.attacks[1]"),
    ("empty judge question", _set("eval.judge_question", ""), "eval.judge_question"),
    ("blank judge question", _set("eval.judge_question", "  \n"), "eval.judge_question"),
    ("mining block too deep", lambda d: d.update(mining={"enabled": True, "block_high": 40}), "mining.block_high"),
    ("soft-prompt mining on request positions",
     lambda d: (d.update(mining={"enabled": True, "kind": "embedding"}), d["loss"].update(harmful_mask="request_all")),
     "loss.harmful_mask"),
]


@pytest.mark.parametrize("name,mutate,key", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_malformed_sweep_exits_2_naming_the_key(tmp_path, capsys, name, mutate, key) -> None:
    data = smoke_raw()
    mutate(data)
    code, out, err = run_cli([str(write(tmp_path, data)), "--dry-run"], capsys)
    assert code == 2, out
    assert key in err, err
    assert "fix:" in err
    assert "Traceback" not in err
    assert out == ""


def test_all_problems_reported_together(tmp_path, capsys) -> None:
    data = smoke_raw()
    data["train"]["steps"] = "x"
    data["loss"]["margn"] = 1
    data["lora"]["r"] = 0
    data["data"]["harmful"][0]["source"] = "advbnch"
    code, _, err = run_cli([str(write(tmp_path, data)), "--dry-run"], capsys)
    assert code == 2
    for key in ("train.steps", "loss.margn", "lora.r"):
        assert key in err
    assert "3 problem(s)" in err  # schema problems stop before the data checks, which need a valid schema


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("name: [unclosed\n", "invalid YAML at line"),
    ("- a\n- b\n", "must be a mapping"),
    ("name: x\n\tdata: 1\n", "invalid YAML"),
])
def test_unreadable_files(tmp_path, capsys, text, needle) -> None:
    code, _, err = run_cli([str(write(tmp_path, text)), "--dry-run"], capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_missing_file(capsys, tmp_path) -> None:
    code, _, err = run_cli([str(tmp_path / "nope.yaml"), "--dry-run"], capsys)
    assert code == 2 and "file not found" in err


def test_cli_subprocess_no_traceback(tmp_path) -> None:
    bad = write(tmp_path, {"name": "x", "data": {"benign": [], "harmful": [], "retain": []}, "loss": {"kind": 3}})
    proc = subprocess.run([sys.executable, "-m", "crl_ray.sweep", str(bad), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "data.benign" in proc.stderr and "loss.kind" in proc.stderr
    help_proc = subprocess.run([sys.executable, "-m", "crl_ray.sweep", "--help"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120)
    assert help_proc.returncode == 0 and "--dry-run" in help_proc.stdout and "--resume" in help_proc.stdout


def test_extends_merges_and_reports_bad_parent(tmp_path, capsys) -> None:
    parent = write(tmp_path, smoke_raw(), "parent.yaml")
    child = write(tmp_path, {"extends": parent.name, "name": "child", "train": {"steps": 2}}, "child.yaml")
    cfg, _ = load_config(child)
    assert cfg.name == "child" and cfg.train.steps == 2 and cfg.train.micro_batch_size == 4
    assert cfg.search.space.keys() == {"train.lr", "loss.margin_harmful"}
    orphan = write(tmp_path, {"extends": "missing.yaml", "name": "o"}, "orphan.yaml")
    code, _, err = run_cli([str(orphan), "--dry-run"], capsys)
    assert code == 2 and "extends" in err and "file not found" in err
    assert deep_merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_layer_spec_forms() -> None:
    assert LayerSpec.model_validate([3, 1]).resolve(30) == [1, 3]
    assert LayerSpec.model_validate({"range": [20, 22]}).resolve(32) == [20, 21, 22]
    # the paper's 20..30 of 32 blocks, as fractions, on 32 and 30 blocks
    frac = LayerSpec.model_validate({"fraction": [0.625, 0.9375]})
    assert frac.resolve(32) == list(range(20, 31))
    assert frac.resolve(30) == list(range(19, 29))
    with pytest.raises(ValueError):
        LayerSpec.model_validate({"range": [1, 2], "fraction": [0.1, 0.2]})


def test_dump_round_trip_for_every_sweep() -> None:
    for path in SWEEPS:
        cfg, _ = load_config(path)
        assert parse_config(copy.deepcopy(dump_config(cfg))) == cfg


def test_config_error_pickles_with_message() -> None:
    err = ConfigError([Problem("loss.r", "bad", 3, "fix it")], "x.yaml")
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.problems == err.problems


def test_model_depth_from_local_config_without_weights(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 7, "hidden_size": 64}')
    info = model_info(str(tmp_path))
    assert (info.num_blocks, info.hidden_size) == (7, 64)
    assert model_info("embedded:smollm2-135m-instruct").num_blocks == 30
    with pytest.raises(ValueError):
        model_info(str(tmp_path / "missing"))


def test_resource_plan_concurrency() -> None:
    cfg, _ = load_config(SMOKE, ["resources.max_concurrent_trials=auto", "resources.num_workers=1",
                                 "resources.ray_address=null"])
    plan = sweep.resource_plan(cfg)
    assert plan.workers_per_trial == 1
    import os

    assert plan.concurrency == max(1, min(cfg.search.num_trials, int((os.cpu_count() or 1) // plan.cpus_per_trial)))
    cfg, _ = load_config(ROOT / "sweeps" / "margin.yaml")
    plan = sweep.resource_plan(cfg)
    # a cluster whose size is only known at run time (no autoscaling YAML on this machine): decided then
    assert plan.gpus_per_trial == 4 and plan.cluster_cpus is None and plan.concurrency is None


def test_config_reference_doc_is_in_sync() -> None:
    from crl_ray.config import config_reference

    doc = (ROOT / "docs" / "CONFIG.md").read_text()
    assert doc == config_reference(), "regenerate: python -m crl_ray.config reference > docs/CONFIG.md"
    # every section and key of the schema appears
    for key in ("margin_benign", "target_layers", "init_iterations", "max_concurrent_trials", "layer_window"):
        assert f"`{key}`" in doc or key in doc


def test_storage_modes_new_resume_restart_and_refusals(tmp_path, monkeypatch) -> None:
    """A second run of the same sweep resumes it; a sweep stopped before Tune saved state starts again; another
    config under the same name, or --resume on nothing, is refused with the fix."""
    from ray.tune import Tuner

    from crl_ray.errors import UserError

    cfg, _ = load_config(SMOKE, [f"storage.path={tmp_path}"])
    folder = sweep.sweep_dir(cfg)
    assert sweep.check_storage(cfg, folder, resume=False) == "new"
    with pytest.raises(UserError, match="nothing to resume.*run without --resume"):
        sweep.check_storage(cfg, folder, resume=True)
    folder.mkdir(parents=True)
    (folder / sweep.CONFIG_FILE).write_text(yaml.safe_dump(sweep.dump_config(cfg), sort_keys=False))
    # stopped before Tune created its state: both a plain run and --resume start it again
    assert sweep.check_storage(cfg, folder, resume=False) == "restart"
    assert sweep.check_storage(cfg, folder, resume=True) == "restart"
    # with Tune state: both resume
    (folder / "tune").mkdir()
    monkeypatch.setattr(Tuner, "can_restore", staticmethod(lambda path: True))
    assert sweep.check_storage(cfg, folder, resume=False) == "resume"
    assert sweep.check_storage(cfg, folder, resume=True) == "resume"
    other, _ = load_config(SMOKE, [f"storage.path={tmp_path}", "train.steps=7"])
    with pytest.raises(UserError, match=r"another config: set name=<new name>(.|\n)*train.steps"):
        sweep.check_storage(other, folder, resume=False)


def test_restart_refuses_when_optuna_holds_finished_trials_without_tune_state(tmp_path) -> None:
    import optuna

    from crl_ray.errors import UserError

    cfg, _ = load_config(SMOKE, [f"storage.path={tmp_path}"])
    folder = sweep.sweep_dir(cfg)
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name=cfg.name, storage=sweep.study_storage_url(folder))
    assert sweep.check_storage(cfg, folder, resume=False) == "restart"  # an empty study is nothing lost
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    with pytest.raises(UserError, match="finished Optuna trials but no Tune state"):
        sweep.check_storage(cfg, folder, resume=False)


def test_resources_derive_each_value_in_one_place(monkeypatch) -> None:
    """ResourcesConfig owns the Ray address and the per-trial / per-task resources (sweep, trial and training
    read them from here)."""
    from crl_ray.config import ResourcesConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpu = ResourcesConfig(num_workers=2, cpus_per_worker=3)
    assert cpu.address() is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cpu.address() == "10.0.0.1:6379"
    assert ResourcesConfig(ray_address="auto").address() == "auto"  # the file wins over the environment
    assert cpu.per_trial() == (6.0, 0.0)
    assert cpu.worker_task() == {"num_cpus": 3.0}
    assert cpu.evaluation_task() == {"num_cpus": 6.0}  # on CPU the evaluation gets every worker's cores
    gpu = ResourcesConfig(num_workers=4, cpus_per_worker=2, use_gpu=True, gpus_per_worker=0.5)
    assert gpu.per_trial() == (8.0, 2.0)
    assert gpu.worker_task() == gpu.evaluation_task() == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert ResourcesConfig(num_workers=0, cpus_per_worker=2).per_trial() == (2.0, 0.0)  # in-process: one worker


def test_a_bare_yaml_off_means_off() -> None:
    """YAML 1.1 reads `off` as false: `train.activation_checkpointing: off` (file or override) must still work."""
    cfg, _ = load_config(SMOKE, ["train.activation_checkpointing=off"])
    assert cfg.train.activation_checkpointing == "off"
    assert yaml.safe_load("activation_checkpointing: off") == {"activation_checkpointing": False}
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config(SMOKE, ["train.activation_checkpointing=true"])


def test_judge_question_reaches_the_probe_judge() -> None:
    """eval.judge_question (default null = none; FOLLOW_UP_QUESTION or any text) is the probe's follow-up question;
    unset, the judge's settings (and so its cache key and summary) are v5's, with no question key."""
    from crl_ray.config import FOLLOW_UP_QUESTION
    from crl_ray.evaluate.run import make_judge

    for overrides, want in (([], None), ([f"eval.judge_question={FOLLOW_UP_QUESTION}"], FOLLOW_UP_QUESTION),
                            (["eval.judge_question=Was that answer useful?"], "Was that answer useful?")):
        cfg, _ = load_config(SMOKE, overrides)
        assert cfg.eval.judge_question == want
        judge = make_judge(cfg, None, device="cpu")
        assert judge.question == want and judge.describe().get("question") == want
        assert ("question" in judge.settings()) == (want is not None)
