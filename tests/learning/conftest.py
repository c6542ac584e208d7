"""Shared settings of the learning tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def stop_early_overrides(every: int, margin_target: float) -> list[str]:
    """Evaluate every `every` env steps over 20 episodes; stop once one reaches `margin_target`.
    The score a test asserts is a separate evaluation on other episodes."""
    return [
        f"schedule.eval_every={every}",
        "schedule.eval_every_episodes=20",
        f"schedule.stop_at_return={margin_target}",
    ]


@pytest.fixture
def stop_early() -> Callable[[int, float], list[str]]:
    return stop_early_overrides
