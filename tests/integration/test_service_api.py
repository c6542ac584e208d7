"""The REST API against a real uvicorn server on a real socket, with a real Trainer behind it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tether.metrics import CONFIG_UPDATED, METRICS_UPDATE, TRAINING_STATUS
from tether.service.app import create_app
from tether.service.jobs import JobManager, tail_lines
from tether.service.server import ServiceError, check_bind, start_in_thread

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token_for-tests"
SMALL = [
    "torch_threads=1",
    "environment.num_envs=2",
    "training.rollout_steps=16",
    "training.num_epochs=1",
    "training.batch_size=32",
    "schedule.checkpoint_every=1000",
]


@contextmanager
def serve(runs: Path, token: str | None = None) -> Iterator[tuple[httpx.Client, JobManager]]:
    torch.set_num_threads(1)
    manager = JobManager(runs, default_preset="cartpole")
    handle = start_in_thread(create_app(manager, token=token), port=0)
    try:
        with httpx.Client(base_url=handle.url, timeout=60) as client:
            yield client, manager
    finally:
        manager.shutdown(timeout=60)
        handle.stop()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[httpx.Client, JobManager]]:
    with serve(tmp_path / "runs") as pair:
        yield pair


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def detail(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"], body
    return str(body["detail"])


# --- read-only endpoints -----------------------------------------------------------------------


def test_health_openapi_and_dashboard(api: tuple[httpx.Client, JobManager]) -> None:
    client, _ = api
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["auth_required"] is False
    assert health["job"] == {**health["job"], "status": "idle", "active": False, "run_id": None}

    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/health",
        "/metrics",
        "/control/start",
        "/control/stop",
        "/control/save",
        "/runs",
        "/runs/{run_id}",
    ):
        assert path in paths
    assert {"get", "patch"} <= set(paths["/config"])

    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    # Everything the page loads is served here (no CDN): every local asset it names exists.
    for asset in (
        "/static/app.js",
        "/static/style.css",
        "/static/vendor/uPlot.iife.min.js",
        "/static/vendor/uPlot.min.css",
    ):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")
    assert "MIT License" in client.get("/static/vendor/uPlot.LICENSE").text


def test_metrics_limit_and_non_finite_values(api: tuple[httpx.Client, JobManager]) -> None:
    client, manager = api
    for i in range(5):
        manager.bus.emit(
            METRICS_UPDATE, {"step": i, "train/value_loss": float("nan"), "perf/sps": float("inf")}
        )
    body = client.get("/metrics", params={"limit": 3}).json()
    assert [e["data"]["step"] for e in body["recent"]] == [2, 3, 4]
    # NaN/inf are not JSON: they arrive as null instead of turning the response into a 500.
    assert body["latest"]["train/value_loss"] is None and body["latest"]["perf/sps"] is None
    assert client.get("/metrics", params={"limit": 0}).json()["recent"] == []
    for bad in ("-1", "2001", "ten", "1e3", ""):
        response = client.get("/metrics", params={"limit": bad})
        assert response.status_code == 422, bad
        assert "limit" in detail(response)


def test_unknown_routes_and_methods(api: tuple[httpx.Client, JobManager]) -> None:
    client, _ = api
    assert client.get("/nope").status_code == 404
    assert client.delete("/config").status_code == 405
    assert client.get("/control/stop").status_code == 405
    assert client.get("/static/../jobs.py").status_code == 404


# --- control without a job ---------------------------------------------------------------------


def test_control_without_a_job_is_409(api: tuple[httpx.Client, JobManager]) -> None:
    client, _ = api
    for response in (
        client.post("/control/stop"),
        client.post("/control/save"),
        client.patch("/config", json={"training.learning_rate": 0.001}),
    ):
        assert response.status_code == 409
        assert "no job is running" in detail(response)
    config = client.get("/config").json()
    assert config == {"run_id": None, "active": False, "config": None, "live_keys": []}


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", {"content-type": "application/json"}, 422, "not valid JSON"),
        (b'{"preset": "cartpole"', {"content-type": "application/json"}, 422, "not valid JSON"),
        (b"[1, 2]", {"content-type": "application/json"}, 422, "JSON object"),
        (b'"cartpole"', {"content-type": "application/json"}, 422, "JSON object"),
        (b'{"preset": 5}', {"content-type": "application/json"}, 422, "preset"),
        (b'{"preset": "../../etc/passwd"}', {"content-type": "application/json"}, 422, "preset"),
        (b'{"preset": "cartpole", "steps": -5}', {"content-type": "application/json"}, 422, "steps"),
        (b'{"preset": "cartpole", "steps": 1e40}', {"content-type": "application/json"}, 422, "steps"),
        (b'{"preset": "cartpole", "evil": 1}', {"content-type": "application/json"}, 422, "evil"),
        (
            b'{"overrides": "training.learning_rate=1"}',
            {"content-type": "application/json"},
            422,
            "overrides",
        ),
        (
            json.dumps({"overrides": ["a=1"] * 65}).encode(),
            {"content-type": "application/json"},
            422,
            "overrides",
        ),
        (
            json.dumps({"overrides": ["x" * 501]}).encode(),
            {"content-type": "application/json"},
            422,
            "overrides",
        ),
        (b'{"preset": "nope"}', {"content-type": "application/json"}, 400, "cartpole"),
        (
            b'{"preset": "cartpole", "overrides": ["training.bogus=1"]}',
            {"content-type": "application/json"},
            400,
            "training.bogus",
        ),
        (
            b'{"preset": "cartpole", "overrides": ["no-equals-sign"]}',
            {"content-type": "application/json"},
            400,
            "section.key=value",
        ),
        (
            b'{"preset": "cartpole", "overrides": ["environment.id=Nope-v0"]}',
            {"content-type": "application/json"},
            400,
            "Nope-v0",
        ),
    ],
)
def test_start_refuses_bad_input_with_4xx(
    api: tuple[httpx.Client, JobManager], body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    client, manager = api
    response = client.post("/control/start", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert needle in detail(response)
    assert not manager.is_active()


def test_oversized_and_truncated_bodies(api: tuple[httpx.Client, JobManager]) -> None:
    client, manager = api
    big = json.dumps({"preset": "cartpole", "overrides": ["a=" + "x" * 200_000]}).encode()
    response = client.post("/control/start", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in detail(response)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold for chunked bodies too
        for _ in range(100):
            yield b"x" * 1024

    response = client.patch("/config", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    response = client.patch(
        "/config", content=b'{"training.learning_rate": 0.1', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and "not valid JSON" in detail(response)
    assert not manager.is_active()


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({}, "at least 1"),
        ([], "JSON object"),
        ({"training.learning_rate": {"nested": 1}}, "training.learning_rate"),
        ({"training.learning_rate": [1, 2]}, "training.learning_rate"),
        ({"": 1}, "at least 1 character"),
        ({"bad key!": 1}, "pattern"),
        ({f"k{i}": 1 for i in range(40)}, "at most 32"),
    ],
)
def test_patch_config_refuses_malformed_bodies(
    api: tuple[httpx.Client, JobManager], payload: Any, needle: str
) -> None:
    client, _ = api
    response = client.patch("/config", json=payload)
    assert response.status_code == 422, response.text
    assert needle in detail(response)


def test_patch_config_refuses_non_finite_numbers(api: tuple[httpx.Client, JobManager]) -> None:
    client, _ = api
    for raw in (b'{"training.learning_rate": NaN}', b'{"training.learning_rate": Infinity}'):
        response = client.patch("/config", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text


# --- runs ----------------------------------------------------------------------------------------


def test_runs_unknown_ids_and_path_traversal(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    outside = tmp_path / "secret"
    outside.mkdir(parents=True)
    (outside / "config.yaml").write_text("name: secret\npassword: hunter2\n")
    runs.mkdir()
    (runs / "evil").symlink_to(outside, target_is_directory=True)
    with serve(runs) as (client, _):
        assert client.get("/runs").json() == {"runs": []}
        for run_id in ("nope", "evil", "...", ".hidden", "a" * 201):
            response = client.get(f"/runs/{run_id}")
            assert response.status_code in (404, 422), run_id
            assert "hunter2" not in response.text
        # Raw request targets: an HTTP client library would normalise the dot segments away.
        for target in (
            "/runs/..",
            "/runs/../secret",
            "/runs/..%2Fsecret",
            "/runs/%2e%2e",
            "/runs/%2e%2e%2fsecret",
            "/runs/..%5Csecret",
            "/runs/%00",
            "/runs/a%2F..%2F..%2Fsecret",
            "/runs/evil/../../secret",
        ):
            status, text = raw_get(client, target)
            assert status in (404, 422), (target, status)
            assert "hunter2" not in text


def raw_get(client: httpx.Client, target: str) -> tuple[int, str]:
    """GET a request target byte for byte over a plain socket."""
    import socket

    url = client.base_url
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def test_runs_survive_corrupt_files(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    good, broken = runs / "cartpole-20240101-000000", runs / "broken-20240101-000000"
    good.mkdir(parents=True)
    broken.mkdir()
    (good / "config.yaml").write_text(
        "name: cartpole\ntraining: {algorithm: ppo}\nenvironment: {id: CartPole-v1}\n"
    )
    events = [
        {"type": TRAINING_STATUS, "seq": 1, "time": 1.0, "data": {"status": "started"}},
        *(
            {"type": METRICS_UPDATE, "seq": 2 + i, "time": 2.0, "data": {"step": 64 * (i + 1)}}
            for i in range(700)
        ),
        {"type": TRAINING_STATUS, "seq": 800, "time": 3.0, "data": {"status": "finished"}},
    ]
    lines = [json.dumps(e) for e in events] + [
        "not json at all",
        "[1, 2]",
        '{"type": "metrics_update", "data": 5}',
    ]
    (good / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "metrics_upd')  # torn last line
    (good / "checkpoints").mkdir()
    (good / "checkpoints" / "ckpt_5.pt").write_bytes(b"x" * 10)
    (good / "final.pt").write_bytes(b"y" * 20)
    (broken / "config.yaml").write_bytes(b"\xff\xfe: [unclosed")
    (broken / "metrics.jsonl").write_bytes(b"\x00\x01\x02garbage\n")
    with serve(runs) as (client, _):
        listed = {r["id"]: r for r in client.get("/runs").json()["runs"]}
        assert set(listed) == {good.name, broken.name}
        assert listed[good.name]["status"] == "finished"
        assert listed[good.name]["last_metrics"]["step"] == 64 * 700
        assert [c["path"] for c in listed[good.name]["checkpoints"]] == ["checkpoints/ckpt_5.pt", "final.pt"]
        assert listed[broken.name]["status"] == "unknown"

        one = client.get(f"/runs/{good.name}", params={"limit": 50}).json()
        assert one["config"]["name"] == "cartpole" and one["algorithm"] == "ppo"
        assert [e["data"]["step"] for e in one["metrics"]] == [64 * i for i in range(651, 701)]
        bad = client.get(f"/runs/{broken.name}").json()
        assert bad["config"] is None and "could not be read" in bad["config_error"]
        assert client.get(f"/runs/{good.name}", params={"limit": 99999}).status_code == 422


def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(path, 3) == ["line 99997", "line 99998", "line 99999"]
    assert tail_lines(path, 0) == []
    assert len(tail_lines(path, 10**9, byte_cap=1024)) < 200  # bounded by bytes, not by the ask


# --- a real job ------------------------------------------------------------------------------------


def test_job_lifecycle_with_a_real_trainer(api: tuple[httpx.Client, JobManager]) -> None:
    client, manager = api
    started = client.post(
        "/control/start", json={"preset": "cartpole", "steps": 10_000_000, "overrides": SMALL}
    )
    assert started.status_code == 201, started.text
    run_id = started.json()["run_id"]
    assert run_id.startswith("cartpole-") and started.json()["job"]["active"] is True

    again = client.post("/control/start", json={"preset": "cartpole"})
    assert again.status_code == 409 and run_id in detail(again)

    config = client.get("/config").json()
    assert config["run_id"] == run_id and config["active"] is True
    assert config["config"]["environment"]["num_envs"] == 2
    assert "training.learning_rate" in config["live_keys"] and "training.ent_coef" in config["live_keys"]

    applied = client.patch("/config", json={"training.learning_rate": 0.0005, "training.ent_coef": 0.01})
    assert applied.status_code == 200, applied.text
    assert applied.json()["applied"] == {"training.learning_rate": 0.0005, "training.ent_coef": 0.01}
    for payload, needle in (
        ({"training.batch_size": 64}, "training.learning_rate"),  # not live: names the allowed keys
        ({"environment.num_envs": 4}, "training.ent_coef"),
        ({"training.learning_rate": -1.0}, "learning_rate"),
        ({"training.learning_rate": "fast"}, "learning_rate"),
    ):
        refused = client.patch("/config", json=payload)
        assert refused.status_code == 400, (payload, refused.text)
        assert needle in detail(refused)

    wait_for(lambda: len(manager.bus.history(METRICS_UPDATE)) >= 2)  # stepping and learning
    saved = client.post("/control/save")
    assert saved.status_code == 200, saved.text
    assert Path(saved.json()["path"]).is_file() and saved.json()["run_id"] == run_id

    metrics = client.get("/metrics").json()
    assert metrics["job"]["run_id"] == run_id and metrics["job"]["status"] == "started"

    stopped = client.post("/control/stop")
    assert stopped.status_code == 200 and stopped.json()["run_id"] == run_id
    assert manager.wait(60)
    assert client.post("/control/stop").status_code == 409

    statuses = [e["data"]["status"] for e in manager.bus.history(TRAINING_STATUS)]
    assert statuses == ["started", "stopped"]
    changes = [e["data"] for e in manager.bus.history(CONFIG_UPDATED)]
    assert {"training.learning_rate": 0.0005, "training.ent_coef": 0.01} in changes

    runs = client.get("/runs").json()["runs"]
    assert [r["id"] for r in runs] == [run_id] and runs[0]["status"] == "stopped"
    one = client.get(f"/runs/{run_id}").json()
    assert one["config"]["training"]["algorithm"] == "ppo" and one["config"]["environment"]["num_envs"] == 2
    live = client.get("/config").json()["config"]["training"]  # the job's config after the live change
    assert live["learning_rate"] == 0.0005 and live["ent_coef"] == 0.01
    assert any(c["path"] == "final.pt" for c in one["checkpoints"])
    assert one["metrics"] and all(e["type"] == METRICS_UPDATE for e in one["metrics"])
    assert client.get("/health").json()["job"]["status"] == "stopped"


def test_train_serve_helper_hosts_a_foreground_trainer(tmp_path: Path) -> None:
    """What `tether train --serve` does: the trainer runs in the caller's thread, the service beside it."""
    from tether.commands.serve import start_service_for_trainer
    from tether.config import load_config
    from tether.trainer import Trainer

    torch.set_num_threads(1)
    config, _ = load_config("cartpole", [*SMALL, "schedule.total_steps=10000000"])
    trainer = Trainer(config, tmp_path / "runs" / "attached-1")
    handle = start_service_for_trainer(trainer, host="127.0.0.1", port=0, token=None)
    outcome: dict[str, Any] = {}
    foreground = threading.Thread(target=lambda: outcome.update(result=trainer.run()))
    try:
        assert handle.url == f"http://127.0.0.1:{handle.port}/"
        with httpx.Client(base_url=handle.url, timeout=60) as client:
            job = client.get("/health").json()["job"]
            assert job["mode"] == "attached" and job["active"] is True and job["status"] == "starting"
            assert job["run_id"] == "attached-1"
            assert client.post("/control/save").status_code == 409  # not stepping yet: nothing to save
            refused = client.post("/control/start", json={"preset": "cartpole"})
            assert refused.status_code == 409

            foreground.start()
            wait_for(lambda: client.get("/health").json()["job"]["status"] == "started")
            saved = client.post("/control/save")
            assert saved.status_code == 200 and Path(saved.json()["path"]).is_file()
            assert client.post("/control/stop").status_code == 200
            foreground.join(120)
            assert outcome["result"].status == "stopped"
            assert client.get("/health").json()["job"] == {
                **client.get("/health").json()["job"],
                "status": "stopped",
                "active": False,
            }
            assert [r["id"] for r in client.get("/runs").json()["runs"]] == ["attached-1"]
    finally:
        trainer.request_stop()
        if foreground.is_alive():
            foreground.join(120)
        handle.stop()
    assert not handle.thread.is_alive()
    assert (tmp_path / "runs" / "attached-1" / "final.pt").is_file()  # the service left the trainer alone


# --- the token rule and browser guards -----------------------------------------------------------


def test_token_rule(tmp_path: Path) -> None:
    with serve(tmp_path / "runs", token=TOKEN) as (client, manager):
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/health").json()["auth_required"] is True
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/").status_code == 200
        guarded = [
            ("GET", "/metrics"),
            ("GET", "/runs"),
            ("GET", "/runs/x"),
            ("GET", "/config"),
            ("GET", "/presets"),
            ("POST", "/control/start"),
            ("POST", "/control/stop"),
            ("POST", "/control/save"),
            ("PATCH", "/config"),
        ]
        for method, path in guarded:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": TOKEN},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
            ):
                response = client.request(method, path, headers=headers, json={"training.learning_rate": 0.1})
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "Authorization: Bearer" in detail(response)
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.post("/control/stop", headers=good).status_code == 409
        assert client.patch("/config", headers=good, json={"training.learning_rate": 0.1}).status_code == 409
        # A token-protected service may be reached by any Host name (it is meant for the network).
        assert client.get("/metrics", headers={**good, "Host": "trainer.lan:8765"}).status_code == 200
        assert not manager.is_active()


def test_cross_origin_and_rebinding_guards(api: tuple[httpx.Client, JobManager]) -> None:
    client, _ = api
    evil = client.post("/control/stop", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in detail(evil)
    host = client.base_url.netloc.decode()
    same = client.post("/control/stop", headers={"Origin": f"http://{host}"})
    assert same.status_code == 409  # passed the guard, then: no job
    assert (
        client.get("/metrics", headers={"Origin": "http://evil.example"}).status_code == 200
    )  # reads: CORS applies
    rebound = client.get("/metrics", headers={"Host": "attacker.example:8765"})
    assert rebound.status_code == 421 and "loopback" in detail(rebound)
    assert client.get("/health", headers={"Host": "localhost:8765"}).status_code == 200


def test_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ServiceError, match="without a token") as info:
            check_bind(host, None)
        message = str(info.value)  # one sentence that names the host and the fix
        assert host in message and "--token" in message and "\n" not in message and message.endswith(".")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", TOKEN)
    app = create_app(JobManager(tmp_path / "runs"))
    with pytest.raises(ServiceError, match="without a token"):
        start_in_thread(app, host="0.0.0.0", port=0)

    from tether.commands.serve import start_service_for_trainer
    from tether.config import load_config
    from tether.trainer import Trainer

    trainer = Trainer(load_config("cartpole", SMALL)[0], tmp_path / "runs" / "never")
    with pytest.raises(ServiceError, match="without a token"):
        start_service_for_trainer(trainer, host="0.0.0.0", port=0, token=None)


def test_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs")
    first = start_in_thread(create_app(manager), port=0)
    try:
        with pytest.raises(ServiceError, match="pick another --port"):
            start_in_thread(create_app(manager), port=first.port)
    finally:
        first.stop()


def test_serve_command_refuses_public_bind_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TETHER_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "tether.cli", "serve", "--host", "0.0.0.0", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr
