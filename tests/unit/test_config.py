"""Config and graph validation: every mistake fails before work starts, naming the key."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipelines.config import ConfigError, load_config
from pipelines.graph import GraphError, Pipeline, build_dag, select
from pipelines.stage import Stage, StageConfig
from tests.integration.engine.toy_stages import Letters, Numbers, Report, Scale, toy_pipeline


def _load(*overrides, stages=None):
    return load_config(stages or toy_pipeline().stages, overrides=list(overrides))


def test_defaults_and_override_types():
    cfg = _load("stages.numbers.n=7", "seed=3")
    assert cfg.stage("numbers").n == 7 and isinstance(cfg.stage("numbers").n, int)
    assert cfg.typed.seed == 3
    assert cfg.plain["stages"]["scale"]["factor"] == 2


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"stages\.numbers\.nn"):
        _load("stages.numbers.nn=3")


def test_wrong_type_names_it():
    with pytest.raises(ConfigError, match=r"stages\.numbers\.n"):
        _load("stages.numbers.n=many")


def test_unknown_stage_name():
    with pytest.raises(ConfigError, match=r"stages\.nosuchstage"):
        _load("stages.nosuchstage.x=1")


def test_post_init_error_names_stage():
    with pytest.raises(ConfigError, match=r"stages\.numbers.*n must be >= 1"):
        _load("stages.numbers.n=0")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(toy_pipeline().stages, preset="nope")


def test_top_level_typo():
    with pytest.raises(ConfigError, match="run_rooot"):
        _load("run_rooot=/tmp/x")


def test_yaml_file_error_names_file(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("stages:\n  scale:\n    factr: 3\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*stages\.scale\.factr"):
        load_config(toy_pipeline().stages, experiment_file=bad)


class _A(Stage):
    name = "a"
    inputs = ("y",)
    outputs = ("x",)


class _B(Stage):
    name = "b"
    inputs = ("x",)
    outputs = ("y",)


def _cfgs(stages):
    return {s.name: s.config_cls() for s in stages}


def test_cycle_is_rejected():
    p = Pipeline("cyc", [_A(), _B()], targets=("a",))
    with pytest.raises(GraphError, match="cycle"):
        build_dag(p, _cfgs(p.stages))


def test_duplicate_producer_and_missing_input():
    class Dup(Stage):
        name = "dup"
        outputs = ("numbers",)

    p = Pipeline("d", [Numbers(), Dup()])
    with pytest.raises(GraphError, match="produced by both"):
        build_dag(p, _cfgs(p.stages))
    p = Pipeline("m", [Scale()])
    with pytest.raises(GraphError, match="no stage produces it"):
        build_dag(p, _cfgs(p.stages))


def test_selection_semantics():
    p = toy_pipeline()
    dag = build_dag(p, _cfgs(p.stages))
    assert dag.order.index("numbers") < dag.order.index("scale") < dag.order.index("report")
    assert select(dag) == {"numbers", "scale", "letters", "report"}
    assert select(dag, from_="scale") == {"scale", "report"}
    assert select(dag, until="scale") == {"numbers", "scale"}
    assert select(dag, only=["letters"]) == {"letters"}
    assert select(dag, from_="numbers", until="scale") == {"numbers", "scale"}
    with pytest.raises(GraphError, match="unknown stage"):
        select(dag, only=["nope"])


def test_every_shipped_yaml_validates():
    """Every preset and experiment file in conf/ loads against the real pipeline's schema."""
    from pipelines.config import CONF_DIR
    from pipelines.definitions import get_pipeline

    stages = get_pipeline("vpit").stages
    load_config(stages)  # base alone
    for preset in sorted((CONF_DIR / "presets").glob("*.yaml")):
        load_config(stages, preset=preset.stem)
    for exp in sorted((CONF_DIR / "experiments").glob("*.yaml")):
        load_config(stages, preset="tiny", experiment_file=exp)
