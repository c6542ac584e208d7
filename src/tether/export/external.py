"""Converters that live in their own Python environment (litert-torch, rknn-toolkit2 pin versions
that cannot share ours): finding that Python, and running a worker script there that answers with
one `TETHER-RESULT {json}` line on stdout."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tether.export.runtime import ExportError

log = logging.getLogger(__name__)

RESULT_PREFIX = "TETHER-RESULT "


def find_python(env_var: str, default: Path, module: str, missing: str, setup_hint: str) -> str:
    """`$env_var` if set (it must exist), else this Python when `module` imports here, else
    `default` if present; otherwise an ExportError `missing; setup_hint.`"""
    configured = os.environ.get(env_var)
    if configured:
        if not Path(configured).is_file():
            raise ExportError(f"{env_var}={configured} does not exist; {setup_hint}.")
        return configured
    if importlib.util.find_spec(module) is not None:
        return sys.executable
    if default.expanduser().is_file():
        return str(default.expanduser())
    raise ExportError(f"{missing}; {setup_hint}.")


def run_worker(
    label: str,
    python: str,
    work: Path,
    timeout: float,
    setup_hint: str,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `work/worker.py work/args.json` under `python`; its reply, or an ExportError naming `label`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for key, value in (extra_env or {}).items():
        env.setdefault(key, value)
    try:
        proc = subprocess.run(
            [python, str(work / "worker.py"), str(work / "args.json")],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=work,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ExportError(f"the {label} conversion took more than {timeout:.0f} s and was stopped.") from None
    except OSError as exc:
        raise ExportError(
            f"cannot start the {label} environment's Python {python} ({exc.strerror}); {setup_hint}."
        ) from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            reply: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return reply
    log.debug("%s worker output:\n%s\n%s", label, proc.stdout[-4000:], proc.stderr[-4000:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    raise ExportError(
        f"the {label} environment's Python {python} failed (exit {proc.returncode}: {tail}); {setup_hint}."
    )
