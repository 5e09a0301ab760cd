"""Config loading: stage dataclass defaults < conf/base.yaml < preset < experiment < key=value.

    metamorph plan --preset smoke stages.world.n_generation=10

The schema is built from the pipeline's stages (one typed section per stage under ``stages:``)
and enforced by OmegaConf structured configs, so an unknown key, a wrong type, or an unknown
stage name fails here, before any work starts, with a message naming the key and where it came
from. Values several stages must agree on live under ``shared:`` and are pulled in with
``${shared....}`` interpolation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # imported where a config is loaded: `metamorph --help` needs neither
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRESETS = ("smoke", "tiny", "cluster")


class ConfigError(ValueError):
    """A config mistake, raised before any stage runs. The message names the key."""


@dataclass(kw_only=True)
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite:///{run_root}/mlflow.db, the embedded store
    artifact_root: Optional[str] = None  # None: {run_root}/mlartifacts for the embedded store


@dataclass(kw_only=True)
class RayConfig:
    address: Optional[str] = None  # None: local Ray started on the fly; "auto"/host:port: a cluster
    num_cpus: Optional[int] = None  # local Ray only; None = every core
    object_store_memory_mb: int = 1024  # local Ray only; bounded so a laptop keeps its RAM

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1 or null, got {self.num_cpus}")
        if self.object_store_memory_mb < 80:
            raise ValueError("ray.object_store_memory_mb must be >= 80 (Ray's minimum is 75 MB)")


@dataclass(kw_only=True)
class EngineConfig:
    max_parallel_stages: int = 4  # independent stages run concurrently up to this many
    # A stage key's lock (pipelines/lock.py) is refreshed every lock_heartbeat_s; one not refreshed
    # for lock_timeout_s belongs to a dead holder on another host and is taken over (a dead pid on
    # this host is noticed at once). Keep the timeout >= 3 heartbeats plus the shared file system's
    # attribute-cache delay (NFS: up to 60 s with default actimeo).
    lock_timeout_s: float = 90.0
    lock_heartbeat_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_parallel_stages < 1:
            raise ValueError("engine.max_parallel_stages must be >= 1")
        if self.lock_heartbeat_s <= 0 or self.lock_timeout_s < 3 * self.lock_heartbeat_s:
            raise ValueError("engine.lock_timeout_s must be >= 3 x engine.lock_heartbeat_s (> 0): "
                             "a live holder would otherwise look dead between two heartbeats")


def build_schema(stages: list) -> type:
    """A dataclass type for the whole pipeline config, with one field per stage."""
    stage_fields = [
        (s.name, s.config_cls, field(default_factory=s.config_cls)) for s in stages
    ]
    StagesConfig = dataclasses.make_dataclass("StagesConfig", stage_fields, kw_only=True)
    return dataclasses.make_dataclass(
        "PipelineConfig",
        [
            ("run_root", str, field(default="./runs")),
            ("seed", int, field(default=0)),
            ("experiment", str, field(default="metamorph")),
            ("preset", Optional[str], field(default=None)),
            ("tracking", TrackingConfig, field(default_factory=TrackingConfig)),
            ("ray", RayConfig, field(default_factory=RayConfig)),
            ("engine", EngineConfig, field(default_factory=EngineConfig)),
            ("shared", dict[str, Any], field(default_factory=dict)),
            ("stages", StagesConfig, field(default_factory=StagesConfig)),
        ],
        kw_only=True,
    )


def _load_yaml(path: Path) -> DictConfig:
    import yaml
    from omegaconf import OmegaConf

    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:  # libyaml's parser when PyYAML has it: the same values, ~7x faster
        data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    # A preset may list stage sections that are all comments: `stages:` alone parses as None.
    if "stages" in data and data["stages"] is None:
        del data["stages"]
    for k, v in list(data.get("stages", {}).items()):
        if v is None:
            data["stages"][k] = {}
    return OmegaConf.create(data)


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, origin)) from None


def _explain(e: OmegaConfBaseException, origin: str) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).split("\n")[0]
    if "not in" in msg and key:
        return f"{origin}: unknown config key '{key}' ({msg})"
    if key:
        return f"{origin}: bad value for '{key}': {msg}"
    return f"{origin}: {msg}"


@dataclass
class LoadedConfig:
    """The resolved config: typed objects plus the plain dict (for hashing, logging, printing)."""

    typed: Any  # the PipelineConfig dataclass instance (stage configs are their dataclasses)
    plain: dict[str, Any]  # fully resolved, JSON-able
    sources: list[str]  # where values came from, in precedence order

    def stage(self, name: str) -> Any:
        return getattr(self.typed.stages, name)

    @property
    def run_root(self) -> Path:
        return Path(self.typed.run_root).expanduser().resolve()


def load_config(
    stages: list,
    preset: str | None = None,
    overrides: list[str] | None = None,
    experiment_file: str | Path | None = None,
    base_file: Path | None = None,
) -> LoadedConfig:
    """Merge and validate. Raises ConfigError naming the offending key before anything runs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(build_schema(stages))
    sources = ["defaults"]
    base_file = CONF_DIR / "base.yaml" if base_file is None else base_file
    cfg = _merge(schema, _load_yaml(base_file), str(base_file))
    sources.append(str(base_file))
    if preset:
        path = Path(preset)
        if not path.suffix:
            path = CONF_DIR / "presets" / f"{preset}.yaml"
            if not path.exists():
                known = sorted(p.stem for p in (CONF_DIR / "presets").glob("*.yaml"))
                raise ConfigError(f"unknown preset {preset!r}; known presets: {known}")
        cfg = _merge(cfg, _load_yaml(path), str(path))
        cfg.preset = path.stem
        sources.append(str(path))
    if experiment_file:
        path = Path(experiment_file)
        exp = _load_yaml(path)
        # Sweep files carry a `sweep:` block the pipeline config does not have.
        if "sweep" in exp:
            exp.pop("sweep")
        cfg = _merge(cfg, exp, str(path))
        sources.append(str(path))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
        try:
            dot = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, "command line")) from None
        cfg = _merge(cfg, dot, "command line")
        sources.append("command line")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, "resolving")) from None
    for stage in stages:  # build each stage section alone so a __post_init__ error names it
        try:
            OmegaConf.to_object(cfg.stages[stage.name])
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, "validating")) from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid config in stages.{stage.name}: {e}") from None
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, "validating")) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config: {e}") from None
    return LoadedConfig(typed=typed, plain=plain, sources=sources)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their JSON-ish string."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def to_plain(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if hasattr(obj, "value") and hasattr(obj, "name") and obj.__class__.__module__ != "builtins":
        return obj.value  # Enum
    return obj
