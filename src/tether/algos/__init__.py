"""Learners. Each module exposes `Config` (its typed `training` section) and `build()`."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from tether.algos.base import ActOut, Learner, Transitions

__all__ = ["ALGORITHMS", "ActOut", "Learner", "Transitions", "algorithm_config_class", "algorithm_module"]

# name -> module; a module provides `Config` and
# `build(config, observation_space, action_space, device, seed) -> Learner`.
ALGORITHMS: dict[str, str] = {
    "ppo": "tether.algos.ppo",
    "dqn": "tether.algos.dqn",
    "sac": "tether.algos.sac",
    "qtable": "tether.algos.qtable",
}


def algorithm_module(name: str) -> ModuleType:
    from tether.config import ConfigError

    if name not in ALGORITHMS:
        raise ConfigError(f"unknown training.algorithm '{name}'; choose one of: {', '.join(ALGORITHMS)}.")
    return importlib.import_module(ALGORITHMS[name])


def algorithm_config_class(name: str) -> type[BaseModel]:
    cls: Any = algorithm_module(name).Config
    return cls
