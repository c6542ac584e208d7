"""`tether export` (a trained policy to ONNX / FP16 / INT8 / TFLite / RKNN) and `tether infer`
(run an exported file with ONNX Runtime, LiteRT or RKNN-Lite on a chosen accelerator)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()
log = logging.getLogger(__name__)


def _fmt_size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _fmt_diff(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


_PROVIDER_NAMES = {
    "CPUExecutionProvider": "cpu",
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "directml",
    "CoreMLExecutionProvider": "coreml",
    "OpenVINOExecutionProvider": "openvino",
}


def _print_results(results: list[Any], out_dir: Path) -> None:
    table = Table(title=f"Exported to {out_dir}")
    for col in ("file", "size", "max abs diff", "agreement", "latency", "check"):
        table.add_column(col, justify="left" if col == "file" else "right", no_wrap=col == "file")
    for r in results:
        v = r.verify
        if v is None:
            table.add_row(r.path.name, _fmt_size(r.size_bytes), "—", "—", "—", "—")
            continue
        provider = _PROVIDER_NAMES.get(v.provider, v.provider)
        latency = "—" if v.latency_us is None else f"{v.latency_us:.1f} µs {provider}"
        table.add_row(
            r.path.name,
            _fmt_size(r.size_bytes),
            _fmt_diff(v.max_abs_diff),
            f"{100 * v.action_agreement:.2f} %",
            latency,
            "[green]pass[/]" if v.passed else "[red]FAIL[/]",
        )
    console.print(table)


def export_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory or a checkpoint file.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx, onnx-fp16, onnx-int8, tflite or rknn.")
    ] = "onnx",
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 17).")] = None,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Compare every file with PyTorch; exit 1 if one is out of tolerance."),
    ] = False,
    optimize: Annotated[
        bool, typer.Option("--optimize", help="Also save ONNX Runtime's optimised graph (<name>.opt.onnx).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: <run>/exports).")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="Recorded observations (.npz) for verification and static INT8."),
    ] = None,
    int8: Annotated[
        str | None,
        typer.Option("--int8", help="INT8 mode: dynamic or static (default: static with --calibration)."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Base file name of the exported files.")] = "policy",
    samples: Annotated[
        int,
        typer.Option(
            "--samples", min=1, max=100_000, help="Random (and recorded) observations to verify on."
        ),
    ] = 256,
    exporter: Annotated[
        str, typer.Option("--exporter", help="auto, torchscript or dynamo (torch's ONNX exporters).")
    ] = "auto",
    rknn_target: Annotated[str, typer.Option("--rknn-target", help="Rockchip target platform.")] = "rk3588",
    record: Annotated[
        bool, typer.Option("--record/--no-record", help="Record observations from the job's environment.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export a trained policy for devices, with a JSON sidecar and an accuracy check."""
    import torch

    from tether.export.onnx import DEFAULT_OPSET, FORMATS, export_learner, load_export_source, source_metadata
    from tether.export.quantize import load_calibration
    from tether.export.runtime import ExportError
    from tether.export.verify import record_observations

    if fmt not in FORMATS:
        raise ExportError(f"unsupported export format '{fmt}'; choose one of: {', '.join(FORMATS)}.")
    torch.set_num_threads(1)
    loaded = load_export_source(run)
    ckpt: Path = loaded.checkpoint
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out_dir = out if out is not None else run_dir / "exports"
    from tether.export.onnx import build_graph

    _, in_specs, _ = build_graph(loaded.learner.policy(), loaded.observation_space, loaded.action_space)
    recorded: Any = None
    calib = None
    if calibration is not None:
        calib = load_calibration(calibration, in_specs)
        recorded = calib if len(in_specs) > 1 else calib[in_specs[0].name]
    elif record:
        recorded = record_observations(loaded.learner, loaded.config, n=samples)
    results = export_learner(
        loaded.learner,
        loaded.observation_space,
        loaded.action_space,
        out_dir,
        fmt,
        name=name,
        opset=opset if opset is not None else DEFAULT_OPSET,
        exporter=exporter,
        verify=verify,
        optimize=optimize,
        n_verify=samples,
        recorded=recorded,
        calibration=calib,
        int8_mode=int8,
        rknn_target=rknn_target,
        metadata=source_metadata(loaded),
    )
    failed = [r for r in results if r.verify is not None and not r.verify.passed]
    if as_json:
        print(json.dumps({"checkpoint": str(ckpt), "files": [r.to_dict() for r in results]}))
    else:
        _print_results(results, out_dir)
    if verify and failed:
        names = ", ".join(r.path.name for r in failed)
        Console(stderr=True).print(f"[bold red]error:[/] {names} differ from PyTorch beyond the tolerance.")
        raise typer.Exit(1)


def infer_cmd(
    model: Annotated[Path, typer.Argument(help="An exported .onnx, .tflite or .rknn file.")],
    obs: Annotated[
        Path | None,
        typer.Option("--obs", help="Observations (.npz, arrays named like the inputs); default: random."),
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", help="auto, cpu, cuda, directml, coreml, openvino, npu or coral.")
    ] = "auto",
    use_npu: Annotated[
        bool, typer.Option("--use-npu", help="Run on the NPU (DirectML, CoreML, OpenVINO, ...).")
    ] = False,
    use_coral: Annotated[
        bool, typer.Option("--use-coral", help="Run a .tflite file on a Coral Edge TPU.")
    ] = False,
    samples: Annotated[int, typer.Option("--samples", min=1, max=100_000, help="Random observations.")] = 8,
    threads: Annotated[int, typer.Option("--threads", min=1, max=256, help="Inference threads.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run an exported policy on observations and show its actions, provider and latency."""
    import numpy as np

    from tether.export.runtime import ExportError, load_runtime, provider_from_flags

    runtime = load_runtime(model, provider_from_flags(provider, use_npu, use_coral), threads=threads)
    sidecar = runtime.metadata or {}
    if obs is not None:
        from tether.export.onnx import TensorSpec
        from tether.export.quantize import load_calibration

        if not sidecar.get("inputs"):
            raise ExportError(
                f"{model.name} has no sidecar to describe its inputs; pass it with its .json file."
            )
        specs = [TensorSpec(d["name"], d["dtype"], d["shape"]) for d in sidecar["inputs"]]
        data: Any = load_calibration(obs, specs)
    else:
        from tether.export.onnx import sample_observations

        if not sidecar.get("observation_space"):
            raise ExportError(f"{model.name} has no sidecar; pass observations with --obs.")
        from tether.export.onnx import space_from_spec

        data = sample_observations(space_from_spec(sidecar["observation_space"]), samples)
    if isinstance(data, dict) and len(data) == 1 and runtime.input_names == list(data):
        data = next(iter(data.values()))
    outputs = runtime.run_all(data)
    from tether.export.verify import measure_latency

    single = {k: v[0] for k, v in data.items()} if isinstance(data, dict) else data[0]
    latency = measure_latency(runtime, single, repeats=200, warmup=20)
    result = {
        "model": str(model),
        "provider": runtime.provider,
        "inputs": runtime.input_names,
        "latency_us": latency,
        "outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()},
    }
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{model.name} on {runtime.provider} — {latency:.1f} µs per observation")
    table.add_column("row", justify="right")
    for name in outputs:
        table.add_column(name)
    rows = len(next(iter(outputs.values())))
    for i in range(min(rows, 20)):
        table.add_row(str(i), *[np.array2string(np.asarray(v[i]), precision=4) for v in outputs.values()])
    console.print(table)


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("infer")(infer_cmd)
