"""Typed job configuration: YAML presets, files and `section.key=value` overrides.

A job config has the sections `environment`, `training`, `rewards` and `schedule`. The
`training` section is validated by the chosen algorithm's own `Config` model, and the extra
keys of `environment` and the `rewards` terms by the chosen environment, so a typo anywhere is
caught when the config is loaded, not an hour into the run.
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.errors import TetherError


class ConfigError(TetherError):
    """A user mistake in a config: the message is one sentence that names the fix."""


class EnvironmentConfig(BaseModel):
    """Which environment to run and how many copies. Keys not listed here are passed to the
    environment itself (for `tether/Lunabotics-v0` its physics options; for a Gymnasium id the
    keyword arguments of `gymnasium.make`) and checked by it."""

    model_config = ConfigDict(extra="allow")

    id: str = "tether/Lunabotics-v0"
    num_envs: int = Field(16, ge=1, le=65536)
    max_steps_per_episode: int | None = Field(None, ge=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScheduleConfig(BaseModel):
    """When things happen during a job."""

    model_config = ConfigDict(extra="forbid")

    total_steps: int = Field(1_000_000, ge=1)
    checkpoint_every: int = Field(10, ge=1, description="updates between checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(1, ge=1, description="updates between metric rows")
    eval_episodes: int = Field(100, ge=1, description="episodes for the final evaluation")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="env steps between greedy evaluations during training (none: no such evaluations)",
    )
    eval_every_episodes: int = Field(10, ge=1, description="episodes of each evaluation during training")
    stop_at_return: float | None = Field(
        None,
        description="stop once an evaluation during training reaches this mean return (needs eval_every)",
    )


class JobConfig(BaseModel):
    """One training job: what to learn from, how, and when to save."""

    model_config = ConfigDict(extra="forbid")

    name: str = "job"
    seed: int = 0
    device: str = "auto"
    torch_threads: int | None = Field(None, ge=1)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    training: BaseModel = Field(default=None, validate_default=False)  # type: ignore[assignment]
    rewards: dict[str, float] = Field(default_factory=dict)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith(("cuda", "mps")):
            raise ValueError("device must be auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def algorithm(self) -> str:
        return str(self.training.algorithm)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"training", "environment"})
        data["environment"] = self.environment.model_dump(mode="json")
        data["training"] = self.training.model_dump(mode="json")
        return data


PRESETS_PACKAGE = "tether.presets"


def preset_names() -> list[str]:
    files = importlib.resources.files(PRESETS_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML ({exc.__class__.__name__}); fix its syntax.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must be a mapping of sections, not a {type(data).__name__}.")
    return data


def read_source(preset_or_path: str) -> tuple[dict[str, Any], str]:
    """Return the raw mapping of a preset name or a YAML file, and the preset name to use."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(
                f"config file {preset_or_path} does not exist; pass a preset name or a YAML path."
            )
        return _read_yaml(path.read_text(encoding="utf-8"), str(path)), path.stem
    if preset_or_path not in preset_names():
        raise ConfigError(
            f"unknown preset '{preset_or_path}'; choose one of: {', '.join(preset_names())} "
            "(or pass a YAML file)."
        )
    text = importlib.resources.files(PRESETS_PACKAGE).joinpath(f"{preset_or_path}.yaml").read_text("utf-8")
    return _read_yaml(text, f"preset {preset_or_path}"), preset_or_path


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value.")
    dotted, _, raw = override.partition("=")
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override '{override}' has no key before '='.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{key}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def _format_validation_error(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    loc = f"{where}.{loc}" if where and loc else (where or loc)
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'; check its spelling (see `tether config show`)."
    return f"config key '{loc}': {err['msg']} (got {err.get('input')!r})."


def build_config(data: dict[str, Any]) -> JobConfig:
    """Validate a raw mapping into a `JobConfig`, with one clear sentence on the first error."""
    from tether.algos import algorithm_config_class
    from tether.envs import validate_environment

    data = copy.deepcopy(data)
    training_raw = data.pop("training", None) or {}
    if not isinstance(training_raw, dict):
        raise ConfigError("the 'training' section must be a mapping.")
    try:
        job = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "")) from None
    algorithm = str(training_raw.get("algorithm", "ppo"))
    config_class = algorithm_config_class(algorithm)
    try:
        job.training = config_class.model_validate(training_raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "training")) from None
    validate_environment(job.environment, job.rewards)
    if job.schedule.stop_at_return is not None and job.schedule.eval_every is None:
        raise ConfigError(
            "schedule.stop_at_return needs schedule.eval_every, the env steps between the evaluations "
            "that check it."
        )
    return job


def load_config(preset_or_path: str, overrides: list[str] | None = None) -> tuple[JobConfig, str]:
    """Load a preset or YAML file, apply overrides, validate. Returns the config and preset name."""
    data, name = read_source(preset_or_path)
    for override in overrides or []:
        apply_override(data, override)
    data.setdefault("name", name)
    return build_config(data), name


def dump_config(job: JobConfig) -> str:
    return yaml.safe_dump(job.to_dict(), sort_keys=False)
