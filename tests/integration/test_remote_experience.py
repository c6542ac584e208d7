"""The remote-experience path, before any transport exists: a DQN learner that never touches an env
learns CartPole from transitions a separate process collects and sends over a pipe.

The actor process is a stand-in for a device: it knows nothing of Tether's learners. It receives
policy weights as a plain `.npz` payload (no pickle), runs the MLP forward pass in numpy with
ε-greedy exploration, and sends back `.npz` batches of transitions with `terminated` and
`truncated` kept apart. The learner side only calls `observe()` / `ready()` / `update()`.
Training stops early once the device's greedy episodes all reach 500 (checked every 5,000 steps);
the score asserted comes from other episodes.
"""

from __future__ import annotations

import io
import multiprocessing as mp
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from tether.algos.base import Transitions
from tether.algos.dqn import build
from tether.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.learning, pytest.mark.slow]

CHUNK = 200  # env steps per message from the actor


def _pack(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _actor_process(conn: Any, seed: int) -> None:
    """The 'device': CartPole + a numpy MLP. Commands arrive as npz with a `cmd` field."""
    env = gym.make("CartPole-v1")
    eval_env = gym.make("CartPole-v1")  # its own copy, so an evaluation leaves collection's episode alone
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    while True:
        msg = _unpack(conn.recv_bytes())
        cmd = str(msg.pop("cmd"))
        if cmd == "stop":
            break
        eps = float(msg.pop("epsilon"))
        first_seed = int(msg.pop("seed"))
        layers = [(msg[f"w{i}"], msg[f"b{i}"]) for i in range(len(msg) // 2)]

        def greedy(x: np.ndarray, layers: list = layers) -> int:
            h = x.astype(np.float32)
            for j, (w, b) in enumerate(layers):
                h = h @ w.T + b
                if j < len(layers) - 1:
                    h = np.maximum(h, 0.0)
            return int(np.argmax(h))

        if cmd == "eval":
            returns = []
            for ep in range(int(eps)):  # for eval, `epsilon` carries the number of episodes
                o, _ = eval_env.reset(seed=first_seed + ep)
                total, done = 0.0, False
                while not done:
                    o, r, term, trunc, _ = eval_env.step(greedy(o))
                    total += float(r)
                    done = term or trunc
                returns.append(total)
            conn.send_bytes(_pack(returns=np.array(returns)))
            continue
        rows: dict[str, list] = {
            k: [] for k in ("obs", "action", "reward", "next_obs", "terminated", "truncated")
        }
        for _ in range(CHUNK):
            a = int(rng.integers(2)) if rng.random() < eps else greedy(obs)
            nxt, r, term, trunc, _ = env.step(a)
            for k, v in zip(rows, (obs, a, r, nxt, term, trunc), strict=True):
                rows[k].append(v)
            obs = nxt
            if term or trunc:
                obs, _ = env.reset()
        conn.send_bytes(_pack(**{k: np.array(v) for k, v in rows.items()}))
    conn.close()


def _weights_message(learner: Any, cmd: str, epsilon: float, seed: int = 0) -> bytes:
    linears = [m for m in learner.policy().modules() if isinstance(m, torch.nn.Linear)]
    arrays: dict[str, Any] = {"cmd": cmd, "epsilon": epsilon, "seed": seed}
    for i, lin in enumerate(linears):
        arrays[f"w{i}"] = lin.weight.detach().numpy()
        arrays[f"b{i}"] = lin.bias.detach().numpy()
    return _pack(**arrays)


EVAL_SEED = 20_000  # first episode seed of the evaluations during training


def _evaluate(parent: Any, learner: Any, first_seed: int) -> np.ndarray:
    """The device's returns over 20 greedy episodes of the learner's current policy."""
    parent.send_bytes(_weights_message(learner, "eval", 20, first_seed))
    assert parent.poll(300), "the actor process stopped answering"
    return _unpack(parent.recv_bytes())["returns"]


def test_dqn_learns_cartpole_from_another_process_experience() -> None:
    torch.set_num_threads(1)
    config, _ = load_config("cartpole-dqn")
    assert not config.training.dueling  # the device's numpy forward pass is a plain MLP

    learner = build(
        config.training,
        gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        gym.spaces.Discrete(2),
        "cpu",
        seed=0,
        total_steps=config.schedule.total_steps,
    )
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_actor_process, args=(child, 1), daemon=True)
    proc.start()
    try:
        while learner.steps < config.schedule.total_steps:
            parent.send_bytes(_weights_message(learner, "collect", learner.epsilon))
            if not parent.poll(120):
                pytest.fail("the actor process stopped answering")
            data = _unpack(parent.recv_bytes())
            batch = Transitions(
                data["obs"].astype(np.float32),
                data["action"],
                data["reward"].astype(np.float32),
                data["next_obs"].astype(np.float32),
                data["terminated"],
                data["truncated"],
                # consecutive steps of one device: one n-step stream (see tether.buffers.replay)
                extras={"stream": np.zeros(CHUNK, np.int64)},
            )
            assert len(batch) == CHUNK
            learner.observe(batch)
            if learner.ready():
                learner.update()
            # Every 5,000 steps the device plays 20 greedy episodes; 500 on all of them ends training
            # early. The score asserted below comes from other episodes.
            if learner.steps % 5_000 == 0 and np.mean(_evaluate(parent, learner, EVAL_SEED)) == 500:
                break
        returns = _evaluate(parent, learner, 10_000)
        parent.send_bytes(_pack(cmd="stop"))
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert learner.grad_steps > 0 and len(learner.buffer) > 0
    assert float(np.mean(returns)) >= 475, returns
