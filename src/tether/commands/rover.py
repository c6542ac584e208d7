"""`tether rover-server`, `tether sim rover` and `tether deploy`: the ROS2 rover's remote training.

See docs/rover.md for the whole loop and docs/protocols.md ("Rover (ZeroMQ)") for the wire format.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tether.errors import TetherError

console = Console()

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_HOST = re.compile(r"^[A-Za-z0-9._:\-\[\]]+$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._\-]*$")
_REMOTE_DIR = re.compile(r"^[A-Za-z0-9._/][A-Za-z0-9._/\-]*$")  # relative paths start at the rover's home


class RoverCommandError(TetherError):
    """A bad flag or a failed step of a rover command."""


def parse_image_size(text: str) -> tuple[int, int]:
    m = _SIZE.match(text)
    if not m:
        raise RoverCommandError(f"image size {text!r} must look like WIDTHxHEIGHT, e.g. 424x240.")
    w, h = int(m.group(1)), int(m.group(2))
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise RoverCommandError(f"image size {w}x{h} must be between 16x16 and 2048x2048.")
    return w, h


# ----------------------------------------------------------------------------------------- deploy


def _rknn_toolkit_available() -> bool:
    try:
        import rknn.api  # noqa: F401
    except ImportError:
        return False
    return True


def _rknn_inputs(sidecar: dict[str, Any], image_size: tuple[int, int]) -> tuple[list[str], list[list[int]]]:
    """Input names in the ONNX model's order, with batch-1 shapes (RKNN models have a fixed batch)."""
    w, h = image_size
    shapes = {"rgb": [1, 3, h, w], "depth": [1, 1, h, w], "proprio": [1, 6]}
    names = [i["name"] for i in sidecar.get("inputs", [])] or ["rgb", "depth", "proprio"]
    return names, [shapes[n] for n in names]


def convert_to_rknn(
    onnx_path: Path,
    rknn_path: Path,
    sidecar: dict[str, Any],
    image_size: tuple[int, int],
    target: str = "rk3588",
) -> None:
    """ONNX → RKNN (float16, no quantisation calibration data needed) with rknn-toolkit2."""
    from rknn.api import RKNN

    names, shapes = _rknn_inputs(sidecar, image_size)
    rknn = RKNN()
    try:
        rknn.config(target_platform=target)
        if rknn.load_onnx(model=str(onnx_path), inputs=names, input_size_list=shapes) != 0:
            raise RoverCommandError(f"rknn-toolkit2 could not load {onnx_path}.")
        if rknn.build(do_quantization=False) != 0:
            raise RoverCommandError("rknn-toolkit2 failed to build the model; see its log above.")
        if rknn.export_rknn(str(rknn_path)) != 0:
            raise RoverCommandError(f"rknn-toolkit2 could not write {rknn_path}.")
    finally:
        rknn.release()


def rover_rknn_command(
    models_dir: str, name: str, sidecar: dict[str, Any], image_size: tuple[int, int], target: str = "rk3588"
) -> str:
    """The shell command that converts `name.onnx` on the rover (rknn-toolkit2 for aarch64), gives
    the result the same sidecar and points `remote_trained.rknn` at it."""
    names, shapes = _rknn_inputs(sidecar, image_size)
    onnx_file = f"{models_dir}/{name}.onnx"
    rknn_file = f"{models_dir}/{name}.rknn"
    script = (
        "from rknn.api import RKNN; r = RKNN(); "
        f"r.config(target_platform={target!r}); "
        f"assert r.load_onnx(model={onnx_file!r}, inputs={names!r}, input_size_list={shapes!r}) == 0; "
        "assert r.build(do_quantization=False) == 0; "
        f"assert r.export_rknn({rknn_file!r}) == 0"
    )
    copy_sidecar = f"cp {shlex.quote(onnx_file + '.json')} {shlex.quote(rknn_file + '.json')}"
    link = _link_command(models_dir, f"{name}.rknn", "remote_trained.rknn")
    return f"python3 -c {shlex.quote(script)} && {copy_sidecar} && {link}"


def _link_command(models_dir: str, target_name: str, link_name: str) -> str:
    # Make the new link beside the old one, then rename over it: the rover never sees no link.
    d = shlex.quote(models_dir)
    tmp = shlex.quote(f"{models_dir}/.{link_name}.tmp")
    return f"ln -sfn {shlex.quote(target_name)} {tmp} && mv -Tf {tmp} {d}/{shlex.quote(link_name)}"


def deploy_plan(
    files: list[Path], host: str, user: str | None, models_dir: str, link_target: str, ssh_port: int | None
) -> list[list[str]]:
    """The commands that copy `files` into the rover's models dir and repoint `remote_trained`."""
    if not _HOST.match(host):
        raise RoverCommandError(f"rover host {host!r} is not a host name or address.")
    if user is not None and not _USER.match(user):
        raise RoverCommandError(f"user {user!r} is not a valid user name.")
    if not _REMOTE_DIR.match(models_dir):
        raise RoverCommandError(
            f"--models-dir {models_dir!r} may use letters, digits and . _ - / only "
            "(a relative path starts at the rover user's home)."
        )
    dest = f"{user}@{host}" if user else host
    ssh_opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    scp = ["scp", "-q", *ssh_opts] + (["-P", str(ssh_port)] if ssh_port else [])
    ssh = ["ssh", *ssh_opts] + (["-p", str(ssh_port)] if ssh_port else [])
    suffix = Path(link_target).suffix
    remote_dir = shlex.quote(models_dir)
    return [
        [*ssh, dest, f"mkdir -p {remote_dir}"],
        [*scp, *[str(f) for f in files], f"{dest}:{models_dir}/"],
        [*ssh, dest, _link_command(models_dir, link_target, f"remote_trained{suffix}")],
    ]


def _run_step(cmd: list[str]) -> None:
    tool = cmd[0]
    if shutil.which(tool) is None:
        raise RoverCommandError(f"`{tool}` is not installed; install OpenSSH client tools or use --dry-run.")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"exit code {result.returncode}"
        raise RoverCommandError(
            f"`{' '.join(cmd[:1] + cmd[-2:])}` failed ({reason}); check `ssh` access to the rover with keys."
        )


def export_checkpoint(checkpoint: Path, out_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Checkpoint → `<out_dir>/<name>.onnx` and its sidecar `<name>.onnx.json` (with the rover's
    image size, depth scale and exploration std)."""
    from tether.checkpoint import CheckpointError
    from tether.export.onnx import export_onnx
    from tether.ingest.rover_server import ACTION_SPACE, load_rover_net
    from tether.nets_rgbd import RgbdDeterministicPolicy, rgbd_observation_space

    if not checkpoint.is_file():
        raise RoverCommandError(f"checkpoint {checkpoint} does not exist; pass a ppo_update_N.pt file.")
    try:
        net, state = load_rover_net(checkpoint)
    except CheckpointError as exc:
        raise RoverCommandError(str(exc)) from None
    rover = state.get("rover", {})
    image_size = (int(rover["image_size"][0]), int(rover["image_size"][1]))
    meta = {
        "update": int(state["trainer"]["updates"]),
        "image_size": list(image_size),
        "max_depth": float(rover["max_depth"]),
        "log_std": [float(x) for x in net.log_std.detach()],
        "source": checkpoint.name,
    }
    onnx_path = out_dir / f"{checkpoint.stem}.onnx"
    policy = RgbdDeterministicPolicy(net).eval()
    result = export_onnx(policy, rgbd_observation_space(image_size), ACTION_SPACE, onnx_path, metadata=meta)
    return result.path, result.sidecar_path, result.sidecar


def deploy(
    checkpoint: Path,
    host: str,
    user: str | None,
    models_dir: str = "models",
    out_dir: Path = Path("export"),
    dry_run: bool = False,
    ssh_port: int | None = None,
    rknn: str = "auto",
) -> list[list[str]]:
    """Export, convert where possible, copy to the rover and repoint `remote_trained`. Returns the
    copy commands (run unless `dry_run`)."""
    if rknn not in ("auto", "never"):
        raise RoverCommandError("--rknn must be auto or never.")
    onnx_path, json_path, sidecar = export_checkpoint(checkpoint, out_dir)
    console.print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB) and {json_path.name}")
    image_size = (int(sidecar["image_size"][0]), int(sidecar["image_size"][1]))
    files = [onnx_path, json_path]
    link_target = onnx_path.name
    name = checkpoint.stem
    if rknn == "auto" and _rknn_toolkit_available():
        rknn_path = out_dir / f"{name}.rknn"
        rknn_sidecar = rknn_path.with_name(rknn_path.name + ".json")
        if dry_run:
            console.print(f"would convert {onnx_path} → {rknn_path} with rknn-toolkit2")
        else:
            convert_to_rknn(onnx_path, rknn_path, sidecar, image_size)
            rknn_sidecar.write_text(json_path.read_text())
            console.print(f"converted {rknn_path}")
        files += [rknn_path, rknn_sidecar]
        link_target = rknn_path.name
    elif rknn == "auto":
        console.print(
            "rknn-toolkit2 is not installed here, so the RKNN conversion happens on the rover. "
            "After the copy, run there:"
        )
        command = rover_rknn_command(models_dir, name, sidecar, image_size)
        console.print(f"  {command}", highlight=False, soft_wrap=True, markup=False)
    plan = deploy_plan(files, host, user, models_dir, link_target, ssh_port)
    for cmd in plan:
        console.print(
            ("would run: " if dry_run else "running: ") + shlex.join(cmd), highlight=False, soft_wrap=True
        )
        if not dry_run:
            _run_step(cmd)
    if not dry_run:
        console.print(
            f"[green]deployed[/] {link_target} → {host}:{models_dir}/remote_trained{Path(link_target).suffix}"
        )
    return plan


# --------------------------------------------------------------------------------------- register


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    @app.command("rover-server")
    def rover_server(
        port: Annotated[int, typer.Option(help="ZeroMQ PULL port for rover samples.")] = 5555,
        bind: Annotated[
            str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")
        ] = "127.0.0.1",
        pub_port: Annotated[
            int | None, typer.Option(help="PUB port for model hot-reload (default port+1; -1 disables).")
        ] = None,
        update_interval: Annotated[
            int, typer.Option(help="Samples per PPO update (rollout capacity).")
        ] = 8192,
        checkpoint_interval: Annotated[int, typer.Option(help="Updates between checkpoints.")] = 10,
        checkpoint_dir: Annotated[Path, typer.Option(help="Where ppo_update_N.pt files go.")] = Path(
            "./checkpoints"
        ),
        tensorboard_dir: Annotated[
            Path, typer.Option(help="TensorBoard and metrics.jsonl directory.")
        ] = Path("./runs"),
        image_size: Annotated[
            str, typer.Option(help="Network input WxH; frames are resized to it.")
        ] = "424x240",
        max_depth: Annotated[float, typer.Option(help="Depth in metres that maps to 1.0.")] = 10.0,
        workers: Annotated[int, typer.Option(help="Decode threads.")] = 2,
        jpeg_fast_decode: Annotated[
            bool,
            typer.Option(help="libjpeg-turbo's fast DCT and upsampling: 5-10% faster, not bit-exact."),
        ] = False,
        epochs: Annotated[int, typer.Option(help="PPO epochs per update.")] = 4,
        minibatch_size: Annotated[int, typer.Option(help="PPO minibatch size.")] = 256,
        learning_rate: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-4,
        keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (oldest removed).")] = 5,
        publish_interval: Annotated[
            int, typer.Option(help="Updates between model publications (0: never).")
        ] = 1,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
        amp: Annotated[str, typer.Option(help="Mixed precision: auto, off, bf16 or fp16.")] = "auto",
        bc_warm_start: Annotated[
            bool, typer.Option(help="Start the policy from the behaviour model fitted on teleop samples.")
        ] = True,
        resume: Annotated[
            bool, typer.Option(help="Resume from the newest checkpoint in --checkpoint-dir.")
        ] = True,
        torch_threads: Annotated[int | None, typer.Option(help="torch intra-op threads.")] = None,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    ) -> None:
        """Train the rover's RGB-D PPO policy from samples streamed over ZeroMQ."""
        from tether.ingest.rover_server import RoverServer, RoverServerConfig
        from tether.nets_rgbd import RgbdActorCritic, parameter_count

        config = RoverServerConfig(
            port=port,
            bind=bind,
            pub_port=pub_port,
            image_size=parse_image_size(image_size),
            max_depth=max_depth,
            update_interval=update_interval,
            checkpoint_interval=checkpoint_interval,
            checkpoint_dir=checkpoint_dir,
            tensorboard_dir=tensorboard_dir,
            keep_checkpoints=keep_checkpoints,
            publish_interval=publish_interval,
            learning_rate=learning_rate,
            epochs=epochs,
            minibatch_size=minibatch_size,
            workers=workers,
            jpeg_fast_decode=jpeg_fast_decode,
            device=device,
            amp=amp,
            bc_warm_start=bc_warm_start,
            resume=resume,
            torch_threads=torch_threads,
            seed=seed,
        )
        server = RoverServer(config)
        console.print(
            f"RgbdActorCritic: {parameter_count(RgbdActorCritic()):,} parameters; "
            f"input {config.image_size[0]}x{config.image_size[1]}; "
            f"device {server.device}; amp {server.amp_dtype or 'off'}"
        )
        if server.resumed_from is not None:
            console.print(f"resumed from {server.resumed_from} (update {server.updates})")
        console.print(f"listening on tcp://{bind}:{port}; Ctrl-C saves a checkpoint and stops")
        server.run()
        stats = server.stats()
        console.print(
            f"stopped after {stats['updates']} updates: received {stats['received']}, "
            f"decoded {stats['decoded']}, rejected {stats['rejected'] or 0}, dropped {stats['dropped'] or 0}"
        )

    @sim_app.command("rover")
    def sim_rover(
        connect: Annotated[str, typer.Option(help="The server's ZeroMQ endpoint.")] = "tcp://127.0.0.1:5555",
        rate: Annotated[float, typer.Option(help="Samples per second (0: as fast as possible).")] = 10.0,
        image_size: Annotated[str, typer.Option(help="Camera frame WxH.")] = "424x240",
        steps: Annotated[
            int | None, typer.Option(help="Stop after this many samples (default: run on).")
        ] = None,
        policy: Annotated[
            str, typer.Option(help="auto (scripted until a model arrives), scripted or onnx.")
        ] = "auto",
        model_connect: Annotated[
            str | None, typer.Option(help="The server's model PUB endpoint (default: its port + 1).")
        ] = None,
        models_dir: Annotated[Path | None, typer.Option(help="Where received models are kept.")] = None,
        raw: Annotated[bool, typer.Option(help="Send raw RGB instead of JPEG.")] = False,
        jpeg_quality: Annotated[int, typer.Option(help="JPEG quality 1-100.")] = 90,
        rover_id: Annotated[
            str | None, typer.Option(help="Name sent with each sample (several rovers).")
        ] = None,
        seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    ) -> None:
        """A simulated rover that renders RGB-D frames and streams them like the real one."""
        from tether.ingest.rover_sim import run_sim_rover

        if policy not in ("auto", "scripted", "onnx"):
            raise RoverCommandError("--policy must be auto, scripted or onnx.")
        if not 1 <= jpeg_quality <= 100:
            raise RoverCommandError("--jpeg-quality must be within 1..100.")
        if rate < 0:
            raise RoverCommandError("--rate must be 0 (unlimited) or positive.")
        size = parse_image_size(image_size)
        console.print(
            f"simulated rover → {connect} at {rate or 'max'} Hz, {size[0]}x{size[1]}, policy {policy}"
        )
        try:
            stats = run_sim_rover(
                connect,
                rate=rate or None,
                image_size=size,
                steps=steps,
                policy=policy,
                model_connect=model_connect,
                models_dir=str(models_dir) if models_dir else None,
                compress=not raw,
                jpeg_quality=jpeg_quality,
                seed=seed,
                rover_id=rover_id,
                on_episode=lambda ret: console.print(f"episode return {ret:8.2f}"),
            )
        except KeyboardInterrupt:
            return
        except TimeoutError as exc:
            raise RoverCommandError(
                f"{exc}; start `tether rover-server` first or use --policy auto."
            ) from None
        console.print(
            f"sent {stats.sent} samples ({stats.dropped} dropped), {stats.episodes} episodes, "
            f"{stats.model_reloads} model reloads"
        )

    @app.command("deploy")
    def deploy_cmd(
        checkpoint: Annotated[Path, typer.Argument(help="A ppo_update_N.pt from tether rover-server.")],
        rover: Annotated[str, typer.Option("--rover", help="The rover's host name or address.")],
        user: Annotated[str | None, typer.Option(help="SSH user on the rover.")] = None,
        models_dir: Annotated[
            str, typer.Option(help="Models directory on the rover (relative to home).")
        ] = "models",
        out_dir: Annotated[Path, typer.Option(help="Where the exported files are written here.")] = Path(
            "./export"
        ),
        ssh_port: Annotated[int | None, typer.Option(help="SSH port of the rover.")] = None,
        rknn: Annotated[
            str, typer.Option(help="auto: convert here when rknn-toolkit2 is installed; never.")
        ] = "auto",
        dry_run: Annotated[
            bool, typer.Option(help="Export, then print the copy commands without running them.")
        ] = False,
    ) -> None:
        """Export a rover checkpoint to ONNX (and RKNN where possible), copy it to the rover and
        point its `remote_trained` link at it."""
        deploy(checkpoint, rover, user, models_dir, out_dir, dry_run, ssh_port, rknn)
