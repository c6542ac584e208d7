"""The Visual Mapper MQTT wire protocol, version 1: topics, message schemas and strict validation.

Every message is a UTF-8 JSON object carrying `"v": 1`. Topics live under a configurable prefix
(default `visualmapper`):

=============================================  ==========  ==========================================
topic                                          direction   payload
=============================================  ==========  ==========================================
`<prefix>/exploration/logs`                    device→srv  one transition, or `{"v":1,"batch":[...]}`
`<prefix>/exploration/qtable/<app>`            srv→device  Q-values of one app (retained)
`<prefix>/exploration/model`                   srv→device  JSON envelope of the DQN (retained)
`<prefix>/exploration/model/onnx`              srv→device  the ONNX bytes the envelope describes (retained)
`<prefix>/exploration/status`                  srv→all     server status (retained, Last Will "offline"),
                                                           command replies and rejection notices
`<prefix>/exploration/status/<device_id>`      device→srv  a device's own status
`<prefix>/exploration/command`                 any→srv     `reset`, `export`, `train`, `status`
=============================================  ==========  ==========================================

Validation never trusts a payload: size is checked before parsing, JSON is parsed by the standard
library, then the object is checked by strict pydantic models (no type coercion, no unknown
fields, finite numbers only, bounded strings and lists). A rejected payload yields a
`ProtocolError` whose `reason` is one of the stable codes in `Reason`; the server counts them.
The human-readable description is in `docs/protocols.md`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
DEFAULT_PREFIX = "visualmapper"

MAX_PAYLOAD_BYTES = 1_000_000  # a log message (single or batch); larger ones are rejected unparsed
MAX_CONTROL_BYTES = 16_384  # commands and device status messages
MAX_BATCH = 2_000
MAX_ID_LEN = 128  # device_id and app: they appear in topic names
MAX_STATE_LEN = 512
MAX_ACTION_LEN = 256
MAX_AVAILABLE_ACTIONS = 256
MAX_FEATURES = 1_024
MAX_ABS_REWARD = 1e6
MAX_ABS_FEATURE = 1e6
MAX_INT = 2**53 - 1  # what a JSON number can carry exactly in every client language

# Device ids and app packages become topic levels, so no MQTT wildcards, separators or spaces.
ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
_ID_RE = re.compile(ID_PATTERN)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._:-]+(/[A-Za-z0-9._:-]+)*$")


class Reason(str, Enum):
    """Stable rejection codes (they appear in counters, status messages and logs)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    TOO_LARGE = "too_large"
    BAD_ENCODING = "bad_encoding"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    MISSING_VERSION = "missing_version"
    UNKNOWN_VERSION = "unknown_version"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_TYPE = "bad_type"
    NON_FINITE = "non_finite"
    OUT_OF_RANGE = "out_of_range"
    TOO_LONG = "too_long"
    BAD_ID = "bad_id"
    EMPTY_BATCH = "empty_batch"
    BAD_COMMAND = "bad_command"
    TABLE_FULL = "table_full"
    FEATURES_MISMATCH = "features_mismatch"
    ACTION_SPACE_FULL = "action_space_full"


class ProtocolError(ValueError):
    """A payload that breaks the protocol. `reason` is a `Reason`; `detail` is short and safe to
    echo back (it never contains the payload itself)."""

    def __init__(self, reason: Reason, detail: str, device_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id


# ------------------------------------------------------------------------------------------ topics
def validate_prefix(prefix: str) -> str:
    """A topic prefix: one or more levels of `[A-Za-z0-9._:-]`, no wildcards, no empty levels."""
    if not prefix or len(prefix) > 128 or not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"topic prefix {prefix[:40]!r} is invalid; use levels of letters, digits, '.', '_', ':' or '-' "
            "separated by '/', with no wildcards (for example 'visualmapper')."
        )
    return prefix


@dataclass(frozen=True)
class Topics:
    """Every topic name of the protocol under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/exploration"

    @property
    def logs(self) -> str:
        return f"{self.base}/logs"

    def qtable(self, app: str) -> str:
        return f"{self.base}/qtable/{app}"

    @property
    def qtable_filter(self) -> str:
        return f"{self.base}/qtable/+"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def model_onnx(self) -> str:
        return f"{self.base}/model/onnx"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    def device_status(self, device_id: str) -> str:
        return f"{self.base}/status/{device_id}"

    @property
    def device_status_filter(self) -> str:
        return f"{self.base}/status/+"

    @property
    def command(self) -> str:
        return f"{self.base}/command"

    def app_of_qtable_topic(self, topic: str) -> str | None:
        head = f"{self.base}/qtable/"
        return topic[len(head) :] if topic.startswith(head) else None


# ---------------------------------------------------------------------------------------- schemas
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)

Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN, pattern=ID_PATTERN)]
StateId = Annotated[str, Field(min_length=1, max_length=MAX_STATE_LEN)]
ActionId = Annotated[str, Field(min_length=1, max_length=MAX_ACTION_LEN)]
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
Feature = Annotated[float, Field(ge=-MAX_ABS_FEATURE, le=MAX_ABS_FEATURE)]


class Transition(BaseModel):
    """One step a device took: in `state` it did `action`, got `reward`, and saw `next_state`.

    `seq` is the device's own message counter: strictly increasing per `device_id` and kept
    across app restarts; the server drops a (device_id, seq) it has already learned from, which
    makes QoS 1 redelivery harmless. `done` means the episode reached a terminal screen (no
    bootstrap); `truncated` means the device stopped the episode for another reason (bootstrap).
    `available_actions` are the actions `next_state` offers. `features` is an optional fixed-size
    description of `state` used by the DQN mode; `next_features` describes `next_state`.
    """

    model_config = _STRICT

    # Optional inside a batch (the envelope's `v` governs). A plain strict int checked by the
    # parser, because `Literal[1]` would also let JSON `true` through.
    v: int | None = None
    device_id: Identifier
    app: Identifier
    episode: Count
    step: Count
    seq: Count
    state: StateId
    action: ActionId
    reward: Annotated[float, Field(ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)]
    next_state: StateId
    done: bool
    truncated: bool = False
    available_actions: Annotated[list[ActionId], Field(max_length=MAX_AVAILABLE_ACTIONS)] = Field(
        default_factory=list
    )
    features: Annotated[list[Feature], Field(min_length=1, max_length=MAX_FEATURES)] | None = None
    next_features: Annotated[list[Feature], Field(min_length=1, max_length=MAX_FEATURES)] | None = None
    timestamp: Annotated[float, Field(ge=0.0, le=1e11)] | None = None


class Batch(BaseModel):
    """Several transitions in one message (from one or several devices)."""

    model_config = _STRICT

    v: int
    batch: Annotated[list[Transition], Field(min_length=1, max_length=MAX_BATCH)]


class Command(BaseModel):
    """A request to the server; the reply is published on the status topic with the same `id`.

    `reset` clears the learned model (a backup is kept); `export` writes and publishes the
    Q-tables (and the ONNX model in DQN mode); `train` runs `epochs` extra passes over the recent
    experience kept in memory; `status` asks for a status reply now. `app` limits `reset` and
    `export` to one app."""

    model_config = _STRICT

    v: Literal[1]
    command: Literal["reset", "export", "train", "status"]
    id: Annotated[str, Field(max_length=64)] | None = None
    app: Identifier | None = None
    epochs: Annotated[int, Field(ge=1, le=100)] = 1


class DeviceStatus(BaseModel):
    """What a device may publish about itself on `status/<device_id>` (other fields are ignored)."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    v: Literal[1]
    device_id: Identifier | None = None
    state: Annotated[str, Field(max_length=32)] = "online"


# --------------------------------------------------------------------------------------- parsing
_TYPE_ERRORS = {
    "int_type",
    "float_type",
    "bool_type",
    "string_type",
    "list_type",
    "model_type",
    "dict_type",
    "literal_error",
    "none_required",
    "int_from_float",
    "union_tag_invalid",
    "is_instance_of",
}


def _reason_for(exc: ValidationError) -> tuple[Reason, str]:
    """Map the first pydantic error to a stable reason code and a short detail (no input echo)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    order = [Reason.NON_FINITE, Reason.UNKNOWN_FIELD, Reason.MISSING_FIELD, Reason.TOO_LONG, Reason.BAD_ID]
    found: dict[Reason, str] = {}
    for err in errors:
        loc = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        if kind == "finite_number":
            reason = Reason.NON_FINITE
        elif kind == "extra_forbidden":
            reason = Reason.UNKNOWN_FIELD
        elif kind == "missing":
            reason = Reason.MISSING_FIELD
        elif kind in ("string_too_long", "too_long"):
            reason = Reason.TOO_LONG
        elif kind == "string_pattern_mismatch":
            reason = Reason.BAD_ID
        elif kind in ("greater_than_equal", "less_than_equal", "string_too_short", "too_short"):
            reason = Reason.OUT_OF_RANGE
        else:
            reason = Reason.BAD_TYPE
        found.setdefault(reason, f"{loc}: {err['msg']}"[:200])
    for reason in order:
        if reason in found:
            return reason, found[reason]
    reason = next(iter(found))
    return reason, found[reason]


def _device_hint(obj: Any) -> str | None:
    """The device id of a rejected message, if it names a plausible one (for the error notice)."""
    if isinstance(obj, dict):
        dev = obj.get("device_id")
        if isinstance(dev, str) and len(dev) <= MAX_ID_LEN and _ID_RE.match(dev):
            return dev
    return None


def _load_object(payload: bytes, limit: int) -> dict[str, Any]:
    """Bytes → JSON object with an integer `v` equal to the protocol version, or ProtocolError."""
    if len(payload) > limit:
        raise ProtocolError(Reason.TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {limit}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(Reason.BAD_ENCODING, "payload is not UTF-8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, over-long integers, deep nesting
        raise ProtocolError(Reason.BAD_JSON, "payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Reason.NOT_OBJECT, f"payload is a JSON {type(obj).__name__}, not an object")
    if "v" not in obj:
        raise ProtocolError(
            Reason.MISSING_VERSION, "field 'v' (protocol version) is missing", _device_hint(obj)
        )
    v = obj["v"]
    if type(v) is not int or v != PROTOCOL_VERSION:  # `True == 1`, so check the type itself
        shown = repr(v)[:20]
        raise ProtocolError(
            Reason.UNKNOWN_VERSION,
            f"protocol version {shown} is not supported; this server speaks v{PROTOCOL_VERSION}",
            _device_hint(obj),
        )
    return obj


def parse_log_message(payload: bytes, limit: int = MAX_PAYLOAD_BYTES) -> list[Transition]:
    """Validate a `logs` payload and return its transitions (one for a single message).

    A batch is accepted or rejected as a whole, so a device can simply resend it. Valid payloads
    take one pass through pydantic's JSON parser; a payload that fails it is parsed again step by
    step to name the reason precisely (that path is only as fast as it needs to be)."""
    if len(payload) > limit:
        raise ProtocolError(Reason.TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {limit}")
    try:
        if b'"batch"' in payload:
            batch = Batch.model_validate_json(payload)
            if batch.v == PROTOCOL_VERSION and all(t.v in (None, PROTOCOL_VERSION) for t in batch.batch):
                return list(batch.batch)
        else:
            single = Transition.model_validate_json(payload)
            if single.v == PROTOCOL_VERSION:
                return [single]
    except ValueError:  # ValidationError, or a payload pydantic's parser cannot read at all
        pass
    return _parse_log_slowly(payload, limit)


def _parse_log_slowly(payload: bytes, limit: int) -> list[Transition]:
    obj = _load_object(payload, limit)
    try:
        if "batch" in obj:
            batch = obj["batch"]
            if isinstance(batch, list) and not batch:
                raise ProtocolError(Reason.EMPTY_BATCH, "batch is empty")
            if isinstance(batch, list) and len(batch) > MAX_BATCH:
                raise ProtocolError(
                    Reason.TOO_LONG, f"batch has {len(batch)} items; the limit is {MAX_BATCH}"
                )
            parsed = Batch.model_validate(obj).batch
            for i, t in enumerate(parsed):
                if t.v is not None and (type(obj["batch"][i].get("v")) is not int or t.v != PROTOCOL_VERSION):
                    raise ProtocolError(
                        Reason.UNKNOWN_VERSION, f"batch.{i}.v must be {PROTOCOL_VERSION} or absent"
                    )
            return list(parsed)
        return [Transition.model_validate(obj)]
    except ValidationError as exc:
        reason, detail = _reason_for(exc)
        hint = _device_hint(obj)
        if hint is None and isinstance(obj.get("batch"), list) and obj["batch"]:
            hint = _device_hint(obj["batch"][0])
        raise ProtocolError(reason, detail, hint) from None


def parse_command(payload: bytes) -> Command:
    obj = _load_object(payload, MAX_CONTROL_BYTES)
    try:
        return Command.model_validate(obj)
    except ValidationError as exc:
        reason, detail = _reason_for(exc)
        if any(e["loc"] == ("command",) for e in exc.errors()):
            reason = Reason.BAD_COMMAND
            detail = "command must be one of: reset, export, train, status"
        raise ProtocolError(reason, detail) from None


def parse_device_status(payload: bytes) -> DeviceStatus:
    obj = _load_object(payload, MAX_CONTROL_BYTES)
    try:
        return DeviceStatus.model_validate(obj)
    except ValidationError as exc:
        reason, detail = _reason_for(exc)
        raise ProtocolError(reason, detail) from None


# ------------------------------------------------------------------------------ outgoing messages
def dumps(obj: dict[str, Any]) -> bytes:
    """Compact JSON bytes; refuses NaN/inf so the server never sends what it would reject."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def transition_dict(t: Transition) -> dict[str, Any]:
    """A transition as the plain JSON object a device sends (without defaults left unset)."""
    return t.model_dump(exclude_none=True, exclude={"v"})


def qtable_message(app: str, version: int, table: dict[str, dict[str, float]], timestamp: float) -> bytes:
    """The retained per-app Q-table: `{"v":1,"app":..,"version":n,"timestamp":..,"num_states":..,
    "q":{state:{action:value}}}`. `version` increases with every publish for that app."""
    clean = {s: {a: (q if math.isfinite(q) else 0.0) for a, q in row.items()} for s, row in table.items()}
    return dumps(
        {
            "v": PROTOCOL_VERSION,
            "type": "qtable",
            "app": app,
            "version": version,
            "timestamp": timestamp,
            "num_states": len(clean),
            "q": clean,
        }
    )


def offline_status(client_id: str) -> bytes:
    """The Last Will: what a subscriber sees (retained) once the server is gone."""
    return dumps({"v": PROTOCOL_VERSION, "type": "status", "state": "offline", "server": client_id})
