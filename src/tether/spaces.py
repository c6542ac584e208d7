"""JSON-able descriptions of Gymnasium spaces, so checkpoints and exports can rebuild them."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from tether.errors import TetherError


def space_to_dict(space: gym.Space[Any]) -> dict[str, Any]:
    if isinstance(space, gym.spaces.Box):
        return {
            "type": "Box",
            "shape": list(space.shape),
            "dtype": str(space.dtype),
            "low": space.low.tolist(),
            "high": space.high.tolist(),
        }
    if isinstance(space, gym.spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, gym.spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_dict(s) for k, s in space.spaces.items()}}
    raise TetherError(
        f"cannot describe a {type(space).__name__} space; Tether supports Box, Discrete and Dict."
    )


def space_from_dict(data: dict[str, Any]) -> gym.Space[Any]:
    kind = data.get("type")
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        return gym.spaces.Box(
            low=np.asarray(data["low"], dtype=dtype), high=np.asarray(data["high"], dtype=dtype), dtype=dtype
        )
    if kind == "Discrete":
        return gym.spaces.Discrete(int(data["n"]), start=int(data.get("start", 0)))
    if kind == "Dict":
        return gym.spaces.Dict({k: space_from_dict(v) for k, v in data["spaces"].items()})
    raise TetherError(f"unknown space description {kind!r} in a checkpoint; it was not written by Tether.")
