"""`tether export` (a trained policy to ONNX / FP16 / INT8 / TFLite / RKNN) and `tether infer`
(run an exported file with ONNX Runtime, LiteRT or RKNN-Lite on a chosen accelerator)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
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


@dataclass
class _ExportOptions:
    """What `tether export` does to each source (one run, or every model of an --all query)."""

    fmt: str
    opset: int
    verify: bool
    optimize: bool
    calibration: Path | None
    int8: str | None
    name: str
    samples: int
    exporter: str
    rknn_target: str
    record: bool


def _failed_checks(results: list[Any]) -> list[Any]:
    """The exported files whose accuracy check against PyTorch did not pass."""
    return [r for r in results if r.verify is not None and not r.verify.passed]


def _export_source(
    source: Path, out: Path | None, opts: _ExportOptions, extra_meta: dict[str, Any] | None = None
) -> tuple[Path, Path, list[Any]]:
    """Export one run directory or checkpoint: (checkpoint, output directory, results)."""
    from tether.export.onnx import build_graph, export_learner, load_export_source, source_metadata
    from tether.export.quantize import load_calibration
    from tether.export.verify import record_observations

    table = opts.fmt == "qtable-json"
    loaded = load_export_source(source, table=table)
    ckpt: Path = loaded.checkpoint
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out_dir = out if out is not None else run_dir / "exports"
    recorded: Any = None
    calib = None
    if not table:  # a Q-table has no graph to verify, so nothing to record for it
        _, in_specs, _ = build_graph(loaded.learner.policy(), loaded.observation_space, loaded.action_space)
        if opts.calibration is not None:
            calib = load_calibration(opts.calibration, in_specs)
            recorded = calib if len(in_specs) > 1 else calib[in_specs[0].name]
        elif opts.record:
            recorded = record_observations(loaded.learner, loaded.config, n=opts.samples)
    results = export_learner(
        loaded.learner,
        loaded.observation_space,
        loaded.action_space,
        out_dir,
        opts.fmt,
        name=opts.name,
        opset=opts.opset,
        exporter=opts.exporter,
        verify=opts.verify,
        optimize=opts.optimize,
        n_verify=opts.samples,
        recorded=recorded,
        calibration=calib,
        int8_mode=opts.int8,
        rknn_target=opts.rknn_target,
        metadata={**source_metadata(loaded), **(extra_meta or {})},
    )
    return ckpt, out_dir, results


def export_cmd(
    run: Annotated[
        str | None,
        typer.Argument(
            metavar="RUN_OR_CHECKPOINT | QUERY",
            # Rich markup would take "[@VERSION|@STAGE]" for a tag; "\\[" prints a bracket.
            help="A run directory or a checkpoint file; with --all, a registry query "
            "NAME\\[@VERSION|@STAGE] whose NAME may use * ? \\[...] (default: every model).",
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="onnx, onnx-fp16, onnx-int8, tflite, rknn, or qtable-json for a Q-table run.",
        ),
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
        Path | None,
        typer.Option("--out", help="Output directory (default: <run>/exports; with --all: required)."),
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
    export_all: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Export every registered model the query selects, each into <out>/<model>/<version>/.",
        ),
    ] = False,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="With --all: database URL; default $TETHER_DB, "
            "else sqlite:///<$ML_DATA_DIR or ./data>/tether.db.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export a trained policy for devices, with a JSON sidecar and an accuracy check."""
    import torch

    from tether.export.onnx import DEFAULT_OPSET, FORMATS
    from tether.export.runtime import ExportError

    if fmt not in FORMATS:
        raise ExportError(f"unsupported export format '{fmt}'; choose one of: {', '.join(FORMATS)}.")
    opts = _ExportOptions(
        fmt=fmt,
        opset=opset if opset is not None else DEFAULT_OPSET,
        verify=verify,
        optimize=optimize,
        calibration=calibration,
        int8=int8,
        name=name,
        samples=samples,
        exporter=exporter,
        rknn_target=rknn_target,
        record=record,
    )
    torch.set_num_threads(1)  # exporting and verifying small policies: one thread, as on a device
    if export_all:
        _export_registry(run or "*", out, db, opts, as_json)
        return
    if db is not None:
        raise ExportError("--db selects the registry for --all; pass --all with a query, or drop --db.")
    if run is None:
        raise ExportError(
            "pass a run directory or checkpoint to export, or --all with a registry query "
            "(e.g. tether export --all 'rover*@production' --out exports/)."
        )
    ckpt, out_dir, results = _export_source(Path(run), out, opts)
    failed = _failed_checks(results)
    if as_json:
        print(json.dumps({"checkpoint": str(ckpt), "files": [r.to_dict() for r in results]}))
    else:
        _print_results(results, out_dir)
    if verify and failed:
        names = ", ".join(r.path.name for r in failed)
        Console(stderr=True).print(f"[bold red]error:[/] {names} differ from PyTorch beyond the tolerance.")
        raise typer.Exit(1)


def _model_line(record: Any, out_dir: Path, results: list[Any]) -> str:
    """One line per exported model: what was written and how it compared with PyTorch."""
    parts = []
    for r in results:
        check = ""
        if r.verify is not None:
            verdict = "pass" if r.verify.passed else "FAIL"
            check = f" {_fmt_diff(r.verify.max_abs_diff)} {verdict}"
        parts.append(f"{r.path.name} {_fmt_size(r.size_bytes)}{check}")
    return f"{record.ref} ({record.stage}) → {out_dir}: " + ", ".join(parts)


def _export_registry(
    query_text: str, out: Path | None, db: str | None, opts: _ExportOptions, as_json: bool
) -> None:
    """`tether export --all QUERY`: every selected model's checkpoint, one result line each;
    a failed model does not stop the others, and any failure makes the exit code 1."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tether.errors import TetherError, first_line
    from tether.export.runtime import ExportError
    from tether.export.selection import parse_query, select_models
    from tether.store import open_store

    query = parse_query(query_text)
    if out is None:
        raise ExportError("--all exports several models; choose where with --out DIR.")
    with open_store(db) as store:
        selection = select_models(store, query)
    # Progress goes to stderr with --json, so stdout stays one JSON object.
    shown = Console(stderr=True) if as_json else console
    if selection.skipped:
        refs = ", ".join(f"{r.ref} ({r.artifact_format})" for r in selection.skipped)
        shown.print(f"skipping {len(selection.skipped)} model(s) that are not checkpoints: {escape(refs)}")
    entries: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]export[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=shown,
        transient=True,
    )
    with progress:
        task = progress.add_task("", total=len(selection.models))
        for record in selection.models:
            progress.update(task, description=escape(record.ref))
            entry: dict[str, Any] = {"model": record.ref, "name": record.name, "version": record.version,
                                     "stage": record.stage, "artifact": record.artifact_uri}  # fmt: skip
            out_dir = out / record.name / str(record.version)
            try:
                if "://" in record.artifact_uri:
                    raise ExportError(
                        f"{record.artifact_uri} is a remote artifact; fetch it and register the local file."
                    )
                meta = {"registry": {"name": record.name, "version": record.version, "stage": record.stage}}
                ckpt, out_dir, results = _export_source(Path(record.artifact_uri), out_dir, opts, meta)
            except Exception as exc:
                # One model's bad checkpoint (or an exporter bug on its graph) must not cost the
                # others their export; a Tether error is already one sentence, others get a name.
                text = first_line(exc)
                entry["error"] = text if isinstance(exc, TetherError) else f"{exc.__class__.__name__}: {text}"
                progress.console.print(
                    f"[red]✗[/] {escape(record.ref)}: {escape(entry['error'])}",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                bad = [r.path.name for r in _failed_checks(results)]
                entry.update(checkpoint=str(ckpt), out=str(out_dir), files=[r.to_dict() for r in results])
                if bad and opts.verify:
                    entry["error"] = f"{', '.join(bad)} differ from PyTorch beyond the tolerance"
                mark = "[red]✗[/]" if "error" in entry else "[green]✓[/]"
                progress.console.print(
                    f"{mark} {escape(_model_line(record, out_dir, results))}", highlight=False, soft_wrap=True
                )
            entries.append(entry)
            progress.advance(task)
    failed = [e["model"] for e in entries if "error" in e]
    if as_json:
        print(json.dumps({"query": str(query), "out": str(out), "models": entries, "failed": failed}))
    else:
        console.print(
            f"exported {len(entries) - len(failed)} of {len(entries)} model(s) to {escape(str(out))}"
        )
    if failed:
        Console(stderr=True).print(
            f"[bold red]error:[/] {len(failed)} of {len(entries)} export(s) failed: "
            f"{escape(', '.join(failed))}.",
            highlight=False,
        )
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
