"""The Visual Mapper MQTT protocol parser, de-duplication window, journal and CLI settings."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.commands.mqtt import MQTTOptionsError, read_addon_options, resolve_settings
from tether.ingest.android_sim import make_apps
from tether.ingest.mqtt_protocol import (
    MAX_BATCH,
    MAX_PAYLOAD_BYTES,
    ProtocolError,
    Reason,
    Topics,
    parse_command,
    parse_device_status,
    parse_log_message,
    qtable_message,
)
from tether.ingest.mqtt_server import DedupWindow, Journal, state_bucket

GOOD = {
    "v": 1,
    "device_id": "pixel-7",
    "app": "com.example.shop",
    "episode": 3,
    "step": 7,
    "seq": 42,
    "state": "MainActivity#a1b2",
    "action": "tap:Cart",
    "reward": -0.01,
    "next_state": "CartActivity#c3d4",
    "done": False,
    "available_actions": ["tap:Checkout", "tap:Back"],
    "features": [0.5, 1.0],
    "next_features": [0.25, 0.0],
    "timestamp": 1.7e9,
}


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def reason_of(payload: bytes) -> Reason:
    with pytest.raises(ProtocolError) as err:
        parse_log_message(payload)
    return err.value.reason


def test_a_valid_single_and_batch_message_parse():
    (t,) = parse_log_message(enc(GOOD))
    assert (t.device_id, t.seq, t.reward, t.done, t.truncated) == ("pixel-7", 42, -0.01, False, False)
    items = [{k: v for k, v in GOOD.items() if k != "v"} | {"seq": i} for i in range(1, 4)]
    batch = parse_log_message(enc({"v": 1, "batch": items}))
    assert [t.seq for t in batch] == [1, 2, 3]
    minimal = {
        k: GOOD[k] for k in GOOD if k not in ("available_actions", "features", "next_features", "timestamp")
    }
    assert parse_log_message(enc(minimal))[0].available_actions == []


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda g: b"", Reason.BAD_JSON),
        (lambda g: enc(g)[:-3], Reason.BAD_JSON),
        (lambda g: b"\xff\xfe{}", Reason.BAD_ENCODING),
        (lambda g: b"[" * 100_000, Reason.BAD_JSON),
        (lambda g: b'{"v": 1, "seq": ' + b"7" * 10_000 + b"}", Reason.BAD_JSON),
        (lambda g: enc([g]), Reason.NOT_OBJECT),
        (lambda g: enc({k: v for k, v in g.items() if k != "v"}), Reason.MISSING_VERSION),
        (lambda g: enc(g | {"v": 2}), Reason.UNKNOWN_VERSION),
        (lambda g: enc(g | {"v": True}), Reason.UNKNOWN_VERSION),
        (lambda g: enc(g | {"v": 1.0}), Reason.UNKNOWN_VERSION),
        (lambda g: enc(g | {"v": "1"}), Reason.UNKNOWN_VERSION),
        (lambda g: enc(g | {"reward": "1"}), Reason.BAD_TYPE),
        (lambda g: enc(g | {"done": 0}), Reason.BAD_TYPE),
        (lambda g: enc(g | {"seq": 4.0}), Reason.BAD_TYPE),
        (lambda g: enc(g | {"seq": -1}), Reason.OUT_OF_RANGE),
        (lambda g: enc(g | {"seq": 2**60}), Reason.OUT_OF_RANGE),
        (lambda g: enc(g | {"reward": 1e9}), Reason.OUT_OF_RANGE),
        (lambda g: enc(g).replace(b'"reward": -0.01', b'"reward": NaN'), Reason.NON_FINITE),
        (lambda g: enc(g).replace(b'"reward": -0.01', b'"reward": -Infinity'), Reason.NON_FINITE),
        (lambda g: enc(g | {"features": [1.0, math.inf]}), Reason.NON_FINITE),
        (lambda g: enc(g | {"state": "s" * 513}), Reason.TOO_LONG),
        (lambda g: enc(g | {"available_actions": ["a"] * 257}), Reason.TOO_LONG),
        (lambda g: enc(g | {"device_id": "a/b"}), Reason.BAD_ID),
        (lambda g: enc(g | {"app": "com.x#"}), Reason.BAD_ID),
        (lambda g: enc(g | {"extra": 1}), Reason.UNKNOWN_FIELD),
        (lambda g: enc({k: v for k, v in g.items() if k != "action"}), Reason.MISSING_FIELD),
        (lambda g: enc({"v": 1, "batch": []}), Reason.EMPTY_BATCH),
        (lambda g: enc({"v": 1, "batch": [g] * (MAX_BATCH + 1)}), Reason.TOO_LONG),
        (lambda g: enc({"v": 1, "batch": [g, g | {"done": "no"}]}), Reason.BAD_TYPE),
        (lambda g: b" " * (MAX_PAYLOAD_BYTES + 1), Reason.TOO_LARGE),
    ],
)
def test_each_kind_of_bad_payload_gets_its_reason(mutate, reason):
    assert reason_of(mutate(dict(GOOD))) == reason


def test_rejections_name_the_device_when_they_can():
    with pytest.raises(ProtocolError) as err:
        parse_log_message(enc(GOOD | {"reward": "high"}))
    assert err.value.device_id == "pixel-7"
    assert "high" not in err.value.detail  # the payload is never echoed back


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_a_protocol_error(data):
    # Anything other than a ProtocolError escaping here would take down paho's network thread.
    with contextlib.suppress(ProtocolError):
        parse_log_message(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(GOOD), "batch", "x"]), json_values, max_size=12))
def test_arbitrary_json_objects_are_parsed_or_rejected_cleanly(obj):
    try:
        out = parse_log_message(json.dumps(obj).encode())
    except ProtocolError as exc:
        assert isinstance(exc.reason, Reason)
        return
    assert all(math.isfinite(t.reward) for t in out)


def test_commands_and_device_status():
    cmd = parse_command(enc({"v": 1, "command": "train", "epochs": 3, "id": "r1"}))
    assert (cmd.command, cmd.epochs, cmd.id) == ("train", 3, "r1")
    for bad, reason in [
        ({"v": 1, "command": "explode"}, Reason.BAD_COMMAND),
        ({"v": 1, "command": "train", "epochs": 0}, Reason.OUT_OF_RANGE),
        ({"v": 3, "command": "reset"}, Reason.UNKNOWN_VERSION),
    ]:
        with pytest.raises(ProtocolError) as err:
            parse_command(enc(bad))
        assert err.value.reason == reason
    with pytest.raises(ProtocolError):
        parse_command(b"reset")
    assert parse_device_status(enc({"v": 1, "state": "exploring", "battery": 80})).state == "exploring"
    with pytest.raises(ProtocolError):
        parse_device_status(b"x" * 20_000)


def test_topics_and_prefix_validation():
    t = Topics("home/visualmapper")
    assert t.logs == "home/visualmapper/exploration/logs"
    assert t.qtable("com.x") == "home/visualmapper/exploration/qtable/com.x"
    assert t.app_of_qtable_topic(t.qtable("com.x")) == "com.x"
    for bad in ["", "a/#", "a/+/b", "/a", "a//b", "a b"]:
        with pytest.raises(ValueError):
            Topics(bad)


def test_qtable_message_is_strict_json():
    payload = qtable_message("com.x", 3, {"s": {"a": 0.5, "b": float("nan")}}, 1.0)
    msg = json.loads(payload)
    assert msg["v"] == 1 and msg["version"] == 3 and msg["q"] == {"s": {"a": 0.5, "b": 0.0}}


# ----------------------------------------------------------------------------- de-duplication
def test_dedup_window_handles_repeats_reordering_and_gaps():
    d = DedupWindow(window=100, max_devices=10)
    assert [d.seen("a", s) for s in (1, 2, 3)] == [False, False, False]
    assert d.seen("a", 2) is True
    assert d.seen("a", 10) is False  # a gap: 4..9 may still come
    assert [d.seen("a", s) for s in (5, 4, 5)] == [False, False, True]
    assert d.seen("b", 2) is False  # devices are independent
    d.seen("a", 500)
    assert d.seen("a", 300) is True  # older than the window: treated as already seen
    assert d.seen("a", 450) is False  # within the window, never seen
    state = d.state_dict()
    e = DedupWindow(window=100, max_devices=10)
    e.load_state_dict(state)
    assert e.seen("a", 450) is True and e.seen("a", 451) is False and e.seen("b", 2) is True


def test_dedup_memory_is_bounded():
    d = DedupWindow(window=50, max_devices=5)
    for dev in range(20):
        d.seen(f"d{dev}", 10**9)  # a first seq far from 0 opens a window, not a billion-entry set
        d.seen(f"d{dev}", 10**9 + 10**6)
    assert len(d) == 5
    assert all(len(missing) <= 50 for _, missing in d._devices.values())


# -------------------------------------------------------------------------------------- journal
def test_journal_replays_after_a_position_and_stops_at_a_torn_tail(tmp_path: Path):
    j = Journal(tmp_path, segment_bytes=64)
    positions = [j.append(f"msg{i}".encode() * 3) for i in range(10)]
    j.close()
    assert len(j.segments()) > 1  # rotated
    # Tear the last record of the last segment, as a crash mid-write would.
    last = tmp_path / f"seg-{positions[-1][0]:08d}.log"
    last.write_bytes(last.read_bytes()[:-2])
    j2 = Journal(tmp_path, segment_bytes=64)
    replayed = [p for p, _ in j2.replay(positions[3])]
    assert replayed == [f"msg{i}".encode() * 3 for i in range(4, 9)]
    # A corrupt checksum also ends the replay of its segment.
    seg = tmp_path / f"seg-{positions[0][0]:08d}.log"
    data = bytearray(seg.read_bytes())
    (length,) = struct.unpack_from("<I", data, 0)
    assert length == len(b"msg0" * 3)
    data[8] ^= 0xFF  # first payload byte
    seg.write_bytes(bytes(data))
    first_of_next_segment = positions.index(next(p for p in positions if p[0] > positions[0][0]))
    replayed = [p for p, _ in j2.replay((positions[0][0], 0))]
    assert replayed[0] == f"msg{first_of_next_segment}".encode() * 3  # the rest of that segment is skipped
    j2.drop_before(positions[-1][0])
    assert min(j2.segments()) == positions[-1][0]
    j2.close()


# ---------------------------------------------------------------------------------- simulator
def test_simulated_apps_always_reach_a_goal_and_shortest_paths_are_optimal():
    for app in make_apps(5, seed=9):
        dist = app.distances()
        assert set(app.starts()) == set(app.edges) - app.goals  # every screen reaches a goal
        perfect = {s: {a: -dist[n] for a, n in app.edges[s].items()} for s in app.starts()}
        assert app.evaluate(perfect, tolerance=1.0) == 1.0
        assert app.evaluate({}, tolerance=1.0) < 1.0 or all(dist[s] == 1 for s in app.starts())


def test_state_bucket_is_the_documented_hash():
    import hashlib

    digest = hashlib.sha256(b"com.x\nMain").digest()
    assert state_bucket("com.x", "Main", 4096) == int.from_bytes(digest[:8], "big") % 4096


# ------------------------------------------------------------------------------------ settings
def test_flags_beat_environment_beat_addon_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    opts = tmp_path / "options.json"
    opts.write_text(
        json.dumps({"ml_training_mode": "local", "ml_use_dqn": True, "ml_batch_size": 32, "other": 1})
    )
    for name in ("ML_TRAINING", "ML_ENABLED", "MQTT_BROKER", "MQTT_PORT", "ML_DATA_DIR", "USE_DQN"):
        monkeypatch.delenv(name, raising=False)
    s, reason = resolve_settings({}, opts)
    assert reason is None and s["use_dqn"] is True and s["batch_size"] == 32 and s["broker"] == "localhost"
    assert s["data_dir"] == tmp_path / "ml"
    monkeypatch.setenv("MQTT_BROKER", "10.0.0.5")
    monkeypatch.setenv("MQTT_PORT", "1884")
    monkeypatch.setenv("USE_DQN", "false")
    monkeypatch.setenv("ML_DATA_DIR", str(tmp_path / "env"))
    s, _ = resolve_settings({}, opts)
    assert (s["broker"], s["port"], s["use_dqn"], s["data_dir"]) == (
        "10.0.0.5",
        1884,
        False,
        tmp_path / "env",
    )
    s, _ = resolve_settings({"broker": "flag-host", "port": 1999, "dqn": True, "batch_size": 8}, opts)
    assert (s["broker"], s["port"], s["use_dqn"], s["batch_size"]) == ("flag-host", 1999, True, 8)
    monkeypatch.setenv("ML_TRAINING", "false")
    assert resolve_settings({}, opts)[1] is not None
    monkeypatch.setenv("ML_TRAINING", "maybe")
    with pytest.raises(MQTTOptionsError, match="ML_TRAINING"):
        resolve_settings({}, opts)


def test_addon_modes_and_bad_option_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("ML_TRAINING", raising=False)
    monkeypatch.delenv("ML_ENABLED", raising=False)
    opts = tmp_path / "options.json"
    opts.write_text(json.dumps({"ml_training_mode": "disabled"}))
    assert "disabled" in resolve_settings({}, opts)[1]
    opts.write_text(
        json.dumps({"ml_training_mode": "remote", "ml_remote_host": "10.1.1.1", "ml_remote_port": 8099})
    )
    assert "10.1.1.1:8099" in resolve_settings({}, opts)[1]
    assert read_addon_options(tmp_path / "absent.json") == {}
    for bad in ["{", "[1]", json.dumps({"ml_batch_size": "64"}), json.dumps({"ml_training_mode": "cloud"})]:
        opts.write_text(bad)
        with pytest.raises(MQTTOptionsError):
            read_addon_options(opts)
    opts.write_text(json.dumps({"ml_use_dqn": 1}))
    with pytest.raises(MQTTOptionsError, match="ml_use_dqn"):
        read_addon_options(opts)


def test_server_qtable_update_matches_the_qtable_learner():
    """The server inlines QTableLearner.learn for speed; both must give the same table."""
    import random

    from tether.algos.qtable import Config, QTableLearner
    from tether.ingest.mqtt_protocol import Transition
    from tether.ingest.mqtt_server import QTableModel, ServerConfig

    rng = random.Random(0)
    cfg = ServerConfig(learning_rate=0.3, discount=0.8)
    model = QTableModel(cfg)
    ref = QTableLearner(Config(learning_rate=0.3, discount_factor=0.8))
    states, actions = [f"s{i}" for i in range(6)], [f"a{i}" for i in range(4)]
    for seq in range(2000):
        t = Transition(
            device_id="d",
            app="com.x",
            episode=0,
            step=0,
            seq=seq,
            state=rng.choice(states),
            action=rng.choice(actions),
            reward=rng.uniform(-1, 1),
            next_state=rng.choice(states),
            done=rng.random() < 0.2,
            available_actions=rng.sample(actions, rng.randint(0, 3)),
        )
        model.learn(t)
        ref.learn(t.state, t.action, t.reward, t.next_state, t.done, t.available_actions or None)
    assert model.table("com.x") == {s: dict(row) for s, row in ref.table.items()}
    assert model.entries == ref.num_entries


def test_server_qtable_limits_refuse_growth_without_touching_the_table():
    from tether.ingest.mqtt_protocol import Transition
    from tether.ingest.mqtt_server import QTableModel, ServerConfig

    model = QTableModel(ServerConfig(max_entries=10, max_actions_per_state=3))

    def t(state: str, action: str, avail: list[str]) -> Transition:
        return Transition(
            device_id="d", app="com.x", episode=0, step=0, seq=0, state=state, action=action,
            reward=0.0, next_state="n", done=False, available_actions=avail,
        )  # fmt: skip

    model.learn(t("s", "a", ["x", "y"]))
    with pytest.raises(ProtocolError) as err:
        model.learn(t("s2", "a", ["x", "y", "z", "w"]))  # next state would hold 4 actions
    assert err.value.reason == Reason.TABLE_FULL
    for i in range(7):
        model.learn(t(f"s{i}", "a", []))
    with pytest.raises(ProtocolError):
        model.learn(t("one-too-many", "a", []))
    assert model.entries == 10 and "one-too-many" not in model.table("com.x")
