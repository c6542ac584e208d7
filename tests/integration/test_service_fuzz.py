"""Property-based run of the served OpenAPI document (schemathesis): no request gives a 5xx.

Two passes over a real server on a real socket: one idle, one while a real (small) training job
runs, so the control and config endpoints are fuzzed against both states. The second pass leaves
out `POST /control/stop`, which would end the job it needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tether.service.app import create_app
from tether.service.jobs import JobManager
from tether.service.server import start_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
# A real but tiny job that keeps running while the second pass fuzzes it.
LONG_JOB: dict[str, Any] = {
    "preset": "cartpole",
    "steps": 10_000_000,
    "overrides": [
        "torch_threads=1",
        "environment.num_envs=2",
        "training.rollout_steps=16",
        "training.num_epochs=1",
        "training.batch_size=32",
        "schedule.checkpoint_every=1000",
    ],
}


@pytest.fixture(scope="module")
def idle_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    manager = JobManager(tmp_path_factory.mktemp("idle") / "runs", default_preset="cartpole")
    handle = start_in_thread(create_app(manager), port=0)
    try:
        yield handle.url
    finally:
        manager.shutdown()
        handle.stop()


@pytest.fixture(scope="module")
def busy_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, JobManager]]:
    torch.set_num_threads(1)
    manager = JobManager(tmp_path_factory.mktemp("busy") / "runs", default_preset="cartpole")
    handle = start_in_thread(create_app(manager), port=0)
    try:
        response = httpx.post(f"{handle.url}control/start", json=LONG_JOB, timeout=60)
        assert response.status_code == 201, response.text
        yield handle.url, manager
    finally:
        manager.shutdown(timeout=60)
        handle.stop()


def fuzz(base_url: str, skip: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Fuzz every operation of the served schema with valid and invalid data; returns failures.

    (Schemathesis's lazy pytest loader does not run on pytest 9 yet, so its Hypothesis strategies
    are driven directly.)"""
    schema = schemathesis.openapi.from_url(f"{base_url}openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, "the OpenAPI document lost operations"
    for operation in operations:
        if (operation.method.upper(), operation.path) in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @FUZZ
            def run(case: Any) -> None:
                case.call_and_validate(base_url=base_url.rstrip("/"), checks=CHECKS, timeout=60)

            try:
                run()
            except Unsatisfiable:  # no parameters or body to make invalid
                assert mode is GenerationMode.NEGATIVE
            except Exception as exc:  # collect all operations' failures, not just the first
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    return failures


def test_idle_service_never_answers_5xx(idle_service: str) -> None:
    failures = fuzz(idle_service)
    assert not failures, "\n\n".join(failures)


def test_busy_service_never_answers_5xx(busy_service: tuple[str, JobManager]) -> None:
    url, manager = busy_service
    assert manager.is_active()
    failures = fuzz(url, skip={("POST", "/control/stop")})
    assert not failures, "\n\n".join(failures)


LIVE_VALUES = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.lists(st.floats(allow_nan=False), max_size=3),
)


def test_busy_live_config_keys_never_answer_5xx(busy_service: tuple[str, JobManager]) -> None:
    """Random schema cases rarely hit a real live key; this drives the live keys themselves."""
    url, manager = busy_service
    with httpx.Client(base_url=url, timeout=60) as client:
        live = client.get("/config").json()["live_keys"]
        assert "training.learning_rate" in live

        @given(key=st.sampled_from(live), value=LIVE_VALUES)
        @settings(max_examples=40, deadline=None, derandomize=True, database=None)
        def run(key: str, value: Any) -> None:
            response = client.patch("/config", json={key: value})
            assert response.status_code in (200, 400, 422), response.text
            assert isinstance(
                response.json()["detail" if response.status_code != 200 else "applied"], (str, dict)
            )

        run()
    assert manager.is_active(), manager.status()


def test_busy_job_survived_the_fuzzing(busy_service: tuple[str, JobManager]) -> None:
    """The fuzzed job is still a real, controllable job afterwards: stop ends it cleanly."""
    url, manager = busy_service
    assert manager.is_active(), manager.status()
    response = httpx.post(f"{url}control/stop", timeout=30)
    assert response.status_code == 200, response.text
    assert manager.wait(60)
    assert manager.status()["status"] == "stopped"
