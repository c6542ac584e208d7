"""Request and response models of the REST API (they are also its OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictInt, StrictStr

PRESET_PATTERN = r"^[A-Za-z0-9_.-]+$"

ConfigKey = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.]+$")]
ConfigValue = (
    StrictBool
    | StrictInt
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[StrictStr, Field(max_length=200)]
)


class ErrorOut(BaseModel):
    detail: str


class ValidationErrorOut(BaseModel):
    detail: str
    errors: list[dict[str, Any]] = []


class StartRequest(BaseModel):
    """Start a job from a preset, with optional `section.key=value` overrides."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"preset": "cartpole", "overrides": ["training.learning_rate=0.001"], "steps": 20000}
            ]
        },
    )

    preset: Annotated[str, Field(min_length=1, max_length=64, pattern=PRESET_PATTERN)] | None = Field(
        None, description="a preset name (GET /presets); the server's default preset when omitted"
    )
    overrides: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        max_length=64,
        description="config overrides such as 'schedule.total_steps=20000'",
    )
    steps: int | None = Field(None, ge=1, le=10**12, description="shorthand for schedule.total_steps")


class ConfigPatch(RootModel[dict[ConfigKey, ConfigValue]]):
    """Live-safe changes as flat dotted keys, e.g. `{"training.learning_rate": 0.0001}`."""

    root: dict[ConfigKey, ConfigValue] = Field(min_length=1, max_length=32)

    model_config = ConfigDict(json_schema_extra={"examples": [{"training.learning_rate": 0.0001}]})


class JobStatus(BaseModel):
    status: str = Field(description="idle, starting, started, stopped, finished or error")
    active: bool
    mode: str | None = Field(
        None, description="'attached' (tether train --serve) or 'background' (started here)"
    )
    run_id: str | None = None
    algorithm: str | None = None
    started_at: float | None = None
    step: int | float | None = None
    error: str | None = None


class EventOut(BaseModel):
    type: str
    seq: int
    time: float
    data: dict[str, Any]


class HealthOut(BaseModel):
    status: str
    version: str
    auth_required: bool
    uptime_s: float
    job: JobStatus


class MetricsOut(BaseModel):
    job: JobStatus
    latest: dict[str, Any]
    recent: list[EventOut]


class StartOut(BaseModel):
    run_id: str
    job: JobStatus


class StopOut(BaseModel):
    run_id: str
    job: JobStatus


class SaveOut(BaseModel):
    run_id: str
    path: str


class Checkpoint(BaseModel):
    path: str
    bytes: int
    modified: float


class RunSummary(BaseModel):
    id: str
    name: str | None = None
    algorithm: str | None = None
    environment: str | None = None
    created: float
    status: str
    active: bool
    last_metrics: dict[str, Any]
    checkpoints: list[Checkpoint]


class RunsOut(BaseModel):
    runs: list[RunSummary]


class RunDetail(RunSummary):
    config: dict[str, Any] | None = None
    config_error: str | None = None
    metrics: list[EventOut]


class ConfigOut(BaseModel):
    run_id: str | None
    active: bool
    config: dict[str, Any] | None
    live_keys: list[str]


class ConfigPatchOut(BaseModel):
    run_id: str | None
    applied: dict[str, Any]


class PresetsOut(BaseModel):
    presets: list[str]
    default: str
