"""`tether train`, `tether eval` and `tether config`."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import gymnasium as gym
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tether.config import ConfigError, dump_config, load_config, preset_names
from tether.errors import TetherError

console = Console()


class _ProgressSink:
    """Feeds metrics rows from the trainer thread into a rich progress bar."""

    def __init__(self, progress: Progress, task: Any, start_step: int) -> None:
        self.progress, self.task = progress, task
        self.progress.update(task, completed=start_step)

    def __call__(self, event: dict[str, Any]) -> None:
        if event["type"] != "metrics_update":
            return
        d = event["data"]
        phases = sum(d.get(k, 0.0) for k in ("perf/env_s", "perf/act_s", "perf/learn_s")) or 1.0
        success = d.get("train/success_rate")
        self.progress.update(
            self.task,
            completed=d["step"],
            sps=f"{d.get('perf/sps', 0):,.0f}",
            reward=f"{d.get('train/episode_reward_ma100', float('nan')):.1f}",
            success="-" if success is None else f"{100 * success:.0f}%",
            profile="env {:.0f}% act {:.0f}% learn {:.0f}%".format(
                *(100 * d.get(k, 0.0) / phases for k in ("perf/env_s", "perf/act_s", "perf/learn_s"))
            ),
        )


def _steps_override(steps: int | None) -> list[str]:
    return [f"schedule.total_steps={steps}"] if steps is not None else []


def train(
    preset: Annotated[
        str, typer.Argument(help="A preset name (see `tether config presets`) or a YAML file.")
    ],
    steps: Annotated[
        int | None, typer.Option("--steps", help="Total environment steps (schedule.total_steps).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config key: section.key=value (repeatable).")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Where the run goes (default runs/<preset>-<time>).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --run-dir (or the newest run of the preset)."),
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the live dashboard and REST/WebSocket API beside training.")
    ] = False,
    host: Annotated[str, typer.Option("--host", help="Address for --serve.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8765,
    token: Annotated[
        str | None, typer.Option("--token", envvar="TETHER_TOKEN", help="Bearer token for --serve.")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db", envvar="TETHER_DB", help="Store URL for run history (default SQLite in $ML_DATA_DIR)."
        ),
    ] = None,
    no_store: Annotated[bool, typer.Option("--no-store", help="Do not record the run in the store.")] = False,
    evaluate_episodes: Annotated[
        int | None, typer.Option("--eval-episodes", help="Episodes for the final evaluation (0 skips it).")
    ] = None,
) -> None:
    """Train an agent; the run directory gets config.yaml, metrics.jsonl, TensorBoard events, checkpoints."""
    from tether.evaluate import evaluate
    from tether.metrics import MetricsBus
    from tether.runs import latest_run_dir, new_run_dir
    from tether.trainer import Trainer

    extra = list(overrides or []) + _steps_override(steps)
    if seed is not None:
        extra.append(f"seed={seed}")
    if device is not None:
        extra.append(f"device={device}")
    if resume:
        if run_dir is None:
            name = Path(preset).stem
            run_dir = latest_run_dir(name)
            if run_dir is None:
                raise ConfigError(f"--resume found no earlier run of '{name}' in runs/; pass --run-dir.")
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume needs {saved}; that directory holds no Tether run.")
        config, name = load_config(str(saved), extra)
    else:
        config, name = load_config(preset, extra)
        run_dir = run_dir or new_run_dir(name)

    bus = MetricsBus()
    trainer = Trainer(config, run_dir, bus=bus, resume=resume)
    history = None
    if not no_store:
        from tether.store import open_store
        from tether.store.history import RunHistorySink

        store = open_store(db)
        history = RunHistorySink(store, name, config.algorithm, config.environment.id, config.to_dict())
        bus.add_sink(history)
    service = None
    if serve:
        from tether.commands.serve import start_service_for_trainer

        service = start_service_for_trainer(trainer, host=host, port=port, token=token)
        console.print(f"Dashboard: [bold]{service.url}[/]")

    previous = signal.signal(signal.SIGINT, lambda *_: trainer.request_stop())
    console.print(f"Training [bold]{name}[/] ({config.algorithm}, {config.environment.id}) → {run_dir}")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
        TextColumn("{task.fields[sps]} sps"),
        TextColumn("reward {task.fields[reward]}"),
        TextColumn("success {task.fields[success]}"),
        TextColumn("[dim]{task.fields[profile]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    try:
        with progress:
            task = progress.add_task(
                "train", total=config.schedule.total_steps, sps="-", reward="-", success="-", profile=""
            )
            sink = _ProgressSink(progress, task, 0)
            bus.add_sink(sink)
            result = trainer.run()
    finally:
        signal.signal(signal.SIGINT, previous)
        if history is not None:
            history.close()
            history.store.close()

    console.print(
        f"Run [bold]{result.status}[/] at step {result.steps:,} after {result.updates} updates: {run_dir}"
    )
    if result.reached_target_at is not None:
        console.print(
            f"An evaluation at step {result.reached_target_at:,} reached schedule.stop_at_return="
            f"{config.schedule.stop_at_return:g}, so training stopped there."
        )
    episodes = config.schedule.eval_episodes if evaluate_episodes is None else evaluate_episodes
    if episodes > 0 and trainer.learner is not None:
        with console.status(f"Evaluating the deterministic policy over {episodes} episodes…"):
            ev = evaluate(trainer.learner, config, episodes)
        (run_dir / "eval.json").write_text(json.dumps(ev.to_dict(), indent=2), encoding="utf-8")
        _print_eval(ev.to_dict())
    if service is not None:
        service.stop()


def _print_eval(data: dict[str, Any]) -> None:
    table = Table(title="Deterministic evaluation", show_header=False)
    table.add_row("episodes", str(data["episodes"]))
    table.add_row("mean return", f"{data['mean_return']:.2f} ± {data['std_return']:.2f}")
    table.add_row("mean length", f"{data['mean_length']:.1f}")
    if data.get("success_rate") is not None:
        table.add_row("success rate", f"{100 * data['success_rate']:.1f} %")
    console.print(table)


def eval_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory or a checkpoint file.")],
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="Number of episodes.")] = 100,
    gif: Annotated[Path | None, typer.Option("--gif", help="Also write an animation of one episode.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first evaluation episode.")] = 10_000,
) -> None:
    """Evaluate a trained policy deterministically: mean return and success rate."""
    from tether.evaluate import evaluate, record_gif
    from tether.runs import load_learner

    loaded = load_learner(run)
    result = evaluate(loaded.learner, loaded.config, episodes, seed=seed).to_dict()
    result["checkpoint"] = str(loaded.checkpoint)
    if gif is not None:
        try:
            result["gif_frames"] = record_gif(loaded.learner, loaded.config, gif, seed=seed)
        except (ValueError, NotImplementedError, gym.error.DependencyNotInstalled) as exc:
            raise TetherError(f"cannot animate this environment ({exc}).") from None
        result["gif"] = str(gif)
    if as_json:
        print(json.dumps(result))
        return
    _print_eval(result)
    if gif is not None:
        console.print(f"Animation: {gif}")


config_app = typer.Typer(help="Inspect presets and resolved configs.", no_args_is_help=True)


@config_app.command("presets")
def presets_cmd() -> None:
    """List the presets that ship with Tether."""
    for name in preset_names():
        console.print(name)


@config_app.command("show")
def show_cmd(
    preset: Annotated[str, typer.Argument(help="A preset name or a YAML file.")] = "lunabotics",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="section.key=value")] = None,
) -> None:
    """Print the fully resolved config (all defaults filled in)."""
    config, _ = load_config(preset, overrides or [])
    console.print(dump_config(config), highlight=False, markup=False)


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
    app.add_typer(config_app, name="config")
