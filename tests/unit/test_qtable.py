"""Tabular Q-learning: the update rule, growth with unseen states/actions, JSON round trips."""

from __future__ import annotations

import io
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.algos.qtable import Config, QTableError, QTableLearner, build
from tether.config import ConfigError


def test_learn_matches_the_q_learning_rule() -> None:
    q = QTableLearner(Config(learning_rate=0.5, discount_factor=0.9))
    q.add_actions("home", ["a", "b"])
    q.add_actions("menu", ["x", "y"])
    q.table["menu"]["y"] = 2.0
    td = q.learn("home", "a", 1.0, "menu", done=False)
    assert td == pytest.approx(1.0 + 0.9 * 2.0 - 0.0)
    assert q.q_values("home")["a"] == pytest.approx(0.5 * 2.8)
    # A terminal transition does not bootstrap.
    td = q.learn("menu", "y", -1.0, "gone", done=True)
    assert td == pytest.approx(-1.0 - 2.0)
    assert q.q_values("menu")["y"] == pytest.approx(2.0 + 0.5 * -3.0)
    assert "gone" not in q.table


def test_grows_with_unseen_states_and_actions() -> None:
    q = QTableLearner(Config(initial_q=0.25))
    assert q.num_states == 0 and q.num_entries == 0
    q.learn("s1", "tap_ok", 0.0, "s2", done=False, next_actions=["back"])
    assert q.num_states == 2 and q.num_entries == 2
    assert q.q_values("s2") == {"back": 0.25}
    # The same screen later reveals a new button: it joins at initial_q, old values stay.
    q.add_actions("s2", ["back", "settings"])
    assert set(q.q_values("s2")) == {"back", "settings"}
    assert q.num_entries == 3
    # Selecting among available actions includes ones never seen before.
    q.table["s1"]["tap_ok"] = -5.0
    assert q.greedy("s1", available=["tap_ok", "new"]) == "new"
    assert q.q_values("unknown") == {}
    with pytest.raises(QTableError):
        q.greedy("unknown")
    with pytest.raises(QTableError):
        q.select("s1", available=[])


def test_greedy_and_epsilon_schedule() -> None:
    q = QTableLearner(Config(epsilon_start=1.0, epsilon_end=0.0, epsilon_decay_steps=10))
    q.add_actions(0, [0, 1, 2])
    q.table[0][2] = 1.0
    assert q.epsilon == 1.0
    picks = {q.select(0, explore=True) for _ in range(200)}
    assert picks == {0, 1, 2}  # fully random at ε = 1
    for _ in range(10):
        q.learn(5, 0, 0.0, 6, done=True)
    assert q.epsilon == 0.0
    assert {q.select(0) for _ in range(50)} == {2}
    assert q.greedy(0) == 2


def test_rejects_bad_keys_and_rewards() -> None:
    q = QTableLearner()
    with pytest.raises(QTableError):
        q.learn(1.5, 0, 0.0, 2, done=False)
    with pytest.raises(QTableError):
        q.learn(("a", 1), 0, 0.0, 2, done=False)
    with pytest.raises(QTableError):
        q.learn(1, 0, float("nan"), 2, done=False)
    assert q.num_states == 0
    # numpy scalars are normal keys
    q.learn(np.int64(3), np.int32(1), 1.0, np.int64(4), done=True)
    assert 3 in q.table and 1 in q.table[3]


@pytest.mark.parametrize("states", [["home", "menu/1", "ü"], [0, 7, 12]])
def test_json_round_trip_keeps_keys_and_values(states: list) -> None:
    q = QTableLearner(Config(learning_rate=1.0, discount_factor=0.5))
    rng = np.random.default_rng(0)
    for _ in range(50):
        s, s2 = rng.choice(len(states), 2)
        q.learn(
            states[s], int(rng.integers(3)), float(rng.normal()), states[s2], done=bool(rng.random() < 0.2)
        )
    doc = json.loads(json.dumps(q.to_json()))
    other = QTableLearner()
    other.from_json(doc)
    assert other.table == q.table
    assert other.num_entries == q.num_entries
    assert all(type(k) is type(states[0]) for k in other.table)


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [],
        "qtable",
        {"format": "other", "version": 1, "state_type": "str", "action_type": "str", "q": {}},
        {"format": "tether-qtable", "version": 99, "state_type": "str", "action_type": "str", "q": {}},
        {"format": "tether-qtable", "version": 1, "state_type": "float", "action_type": "str", "q": {}},
        {"format": "tether-qtable", "version": 1, "state_type": "str", "action_type": "str", "q": []},
        {"format": "tether-qtable", "version": 1, "state_type": "str", "action_type": "str", "q": {"s": 1}},
        {
            "format": "tether-qtable",
            "version": 1,
            "state_type": "str",
            "action_type": "str",
            "q": {"s": {"a": "1"}},
        },
        {
            "format": "tether-qtable",
            "version": 1,
            "state_type": "str",
            "action_type": "str",
            "q": {"s": {"a": 1e999}},
        },
        {
            "format": "tether-qtable",
            "version": 1,
            "state_type": "str",
            "action_type": "str",
            "q": {"s": {"a": True}},
        },
        {
            "format": "tether-qtable",
            "version": 1,
            "state_type": "int",
            "action_type": "str",
            "q": {"x": {"a": 1}},
        },
    ],
)
def test_from_json_rejects_hostile_documents_and_keeps_the_table(doc: object) -> None:
    q = QTableLearner()
    q.learn("s", "a", 1.0, "t", done=True)
    before = {s: dict(r) for s, r in q.table.items()}
    with pytest.raises(QTableError):
        q.from_json(doc)
    assert q.table == before


def _discrete_learner(n_step: int = 1) -> QTableLearner:
    cfg = Config(
        learning_rate=1.0, discount_factor=0.5, n_step=n_step, epsilon_decay_steps=0, epsilon_end=0.0
    )
    return build(cfg, gym.spaces.Discrete(5), gym.spaces.Discrete(2), "cpu", 0)


def _chain_batch(s: int, a: int, r: float, s2: int, term: bool, trunc: bool = False) -> Transitions:
    return Transitions(
        np.array([s]),
        np.array([a]),
        np.array([r], np.float32),
        np.array([s2]),
        np.array([term]),
        np.array([trunc]),
    )


def test_observe_update_n_step_matches_hand_computed_returns() -> None:
    q = _discrete_learner(n_step=3)
    # chain 0 -> 1 -> 2 -> 3 (terminal) with rewards 1, 2, 4 and γ = 0.5
    for s, r, term in [(0, 1.0, False), (1, 2.0, False), (2, 4.0, True)]:
        q.observe(_chain_batch(s, 0, r, s + 1, term))
        assert q.ready()
        q.update()
    assert q.table[0][0] == pytest.approx(1 + 0.5 * 2 + 0.25 * 4)
    assert q.table[1][0] == pytest.approx(2 + 0.5 * 4)
    assert q.table[2][0] == pytest.approx(4)


def test_truncation_bootstraps_but_termination_does_not() -> None:
    q = _discrete_learner()
    q.table[4] = {0: 10.0, 1: 0.0}
    q.observe(_chain_batch(3, 1, 1.0, 4, term=False, trunc=True))
    q.update()
    assert q.table[3][1] == pytest.approx(1 + 0.5 * 10)
    q.observe(_chain_batch(2, 1, 1.0, 4, term=True))
    q.update()
    assert q.table[2][1] == pytest.approx(1.0)


def test_act_policy_and_state_dict_round_trip() -> None:
    q = _discrete_learner()
    q.table[0] = {0: 0.0, 1: 1.0}
    q.table[3] = {0: 2.0, 1: -1.0}
    obs = np.array([0, 3, 4])
    assert q.act(obs, explore=False).action.tolist() == [1, 0, 0]
    values = q.policy()(torch.as_tensor(obs))
    assert values.shape == (3, 2)
    assert values.argmax(1).tolist() == [1, 0, 0]
    state = q.state_dict()
    json.dumps(state["table"])  # the table part is plain JSON
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = _discrete_learner()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.act(obs, explore=False).action.tolist() == [1, 0, 0]
    assert other.table == q.table


def test_build_refuses_continuous_spaces() -> None:
    with pytest.raises(ConfigError):
        build(Config(), gym.spaces.Box(-1, 1, (3,)), gym.spaces.Discrete(2), "cpu", 0)
