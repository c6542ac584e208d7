"""`tether mqtt` (the Visual Mapper training server) and `tether sim android` (simulated devices).

Settings come from, in order of precedence: command-line flags, environment variables
(`ML_TRAINING`, `ML_ENABLED`, `MQTT_BROKER`, `MQTT_PORT`, `ML_DATA_DIR`, `USE_DQN`), the Home
Assistant add-on options file (`/data/options.json`: `ml_training_mode`, `ml_use_dqn`,
`ml_batch_size`, `ml_save_interval`, `ml_remote_host`, `ml_remote_port`), then defaults.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tether.errors import TetherError

console = Console()

DEFAULT_OPTIONS_FILE = Path("/data/options.json")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class MQTTOptionsError(TetherError):
    """A bad flag, environment variable or add-on option."""


# Broker credentials, shared by the server and the simulated devices.
UsernameOption = Annotated[
    str | None,
    typer.Option("--username", "-u", help="MQTT username (or env MQTT_USERNAME)", envvar="MQTT_USERNAME"),
]
PasswordOption = Annotated[
    str | None,
    typer.Option("--password", help="MQTT password (or env MQTT_PASSWORD)", envvar="MQTT_PASSWORD"),
]


def _env_bool(name: str) -> bool | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise MQTTOptionsError(f"environment variable {name}={raw!r} is not a boolean; set it to true or false.")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise MQTTOptionsError(
            f"environment variable {name}={raw!r} is not an integer; fix or unset it."
        ) from None


def read_addon_options(path: Path) -> dict[str, Any]:
    """The add-on's options JSON, or {} when the file is absent. Unknown keys are ignored (the
    add-on has many options of its own); known ones are type-checked."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MQTTOptionsError(
            f"add-on options file {path} is not readable JSON ({exc.__class__.__name__})."
        ) from None
    if not isinstance(data, dict):
        raise MQTTOptionsError(f"add-on options file {path} must hold a JSON object.")
    kinds = {
        "ml_training_mode": str,
        "ml_use_dqn": bool,
        "ml_batch_size": int,
        "ml_save_interval": int | float,
        "ml_remote_host": str,
        "ml_remote_port": int,
    }
    out: dict[str, Any] = {}
    for key, kind in kinds.items():
        if key in data and data[key] is not None:
            value = data[key]
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
                raise MQTTOptionsError(
                    f"add-on option {key} in {path} has the wrong type ({type(value).__name__})."
                )
            out[key] = value
    mode = out.get("ml_training_mode")
    if mode is not None and mode not in ("disabled", "local", "remote"):
        raise MQTTOptionsError(f"add-on option ml_training_mode is {mode!r}; use disabled, local or remote.")
    return out


def resolve_settings(
    flags: dict[str, Any], options_file: Path | None, env: bool = True
) -> tuple[dict[str, Any], str | None]:
    """Merge flags > environment > add-on options > defaults. Returns (settings, reason) where a
    non-None reason means the server must not run here (disabled, or remote mode)."""
    options = read_addon_options(options_file) if options_file is not None else {}
    mode = options.get("ml_training_mode")
    if mode == "disabled":
        return {}, "ML training is disabled by the add-on option ml_training_mode: disabled."
    if mode == "remote":
        host = options.get("ml_remote_host", "<remote host>")
        port = options.get("ml_remote_port")
        where = f"{host}:{port}" if port else host
        return {}, (
            f"ml_training_mode is remote: training runs on {where}; start "
            "`tether mqtt --broker <this broker>` "
            "there instead."
        )
    for name in ("ML_TRAINING", "ML_ENABLED"):
        if env and _env_bool(name) is False:
            return {}, f"ML training is disabled by {name}=false; unset it or set it to true."

    def pick(flag: str, env_name: str | None, option: str | None, default: Any, kind: type = str) -> Any:
        if flags.get(flag) is not None:
            return flags[flag]
        if env and env_name is not None:
            if kind is bool:
                value: Any = _env_bool(env_name)
            elif kind is int:
                value = _env_int(env_name)
            else:
                value = os.environ.get(env_name) or None
            if value is not None:
                return value
        if option is not None and option in options:
            return options[option]
        return default

    # In the add-on only /data persists, so the options file's folder hosts our state too.
    in_addon = options_file is not None and options_file.is_file()
    data_default = options_file.parent / "ml" if in_addon and options_file is not None else Path("data")
    settings = {
        "broker": pick("broker", "MQTT_BROKER", None, "localhost"),
        "port": pick("port", "MQTT_PORT", None, 1883, int),
        "data_dir": Path(pick("data_dir", "ML_DATA_DIR", None, data_default)),
        "use_dqn": bool(pick("dqn", "USE_DQN", "ml_use_dqn", False, bool)),
        "batch_size": int(pick("batch_size", None, "ml_batch_size", 64)),
        "save_interval": float(pick("save_interval", None, "ml_save_interval", 60.0)),
    }
    return settings, None


def register(app: typer.Typer, sim_app: typer.Typer) -> None:
    @app.command("mqtt")
    def mqtt_command(
        broker: Annotated[
            str | None, typer.Option("--broker", "-b", help="MQTT broker address [localhost]")
        ] = None,
        port: Annotated[int | None, typer.Option("--port", "-p", help="MQTT broker port [1883]")] = None,
        username: UsernameOption = None,
        password: PasswordOption = None,
        dqn: Annotated[
            bool | None, typer.Option("--dqn/--qtable", help="Deep Q-Network instead of a Q-table")
        ] = None,
        use_npu: Annotated[
            bool, typer.Option("--use-npu", help="run the DQN with ONNX Runtime DirectML")
        ] = False,
        use_coral: Annotated[
            bool, typer.Option("--use-coral", help="run the DQN on a Coral Edge TPU")
        ] = False,
        tls: Annotated[bool, typer.Option("--tls", help="connect with TLS (usually port 8883)")] = False,
        tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="CA certificate file for TLS")] = None,
        tls_insecure: Annotated[
            bool, typer.Option("--tls-insecure", help="skip certificate and hostname checks (testing only)")
        ] = False,
        topic_prefix: Annotated[str, typer.Option("--topic-prefix", help="topic prefix")] = "visualmapper",
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", help="training batch size [64]")
        ] = None,
        save_interval: Annotated[
            float | None, typer.Option("--save-interval", help="seconds between checkpoints [60]")
        ] = None,
        data_dir: Annotated[
            Path | None, typer.Option("--data-dir", help="checkpoints, journal, exports [./data]")
        ] = None,
        client_id: Annotated[
            str, typer.Option("--client-id", help="stable MQTT client id (the broker keeps its session)")
        ] = "tether-ml-training",
        status_interval: Annotated[
            float, typer.Option("--status-interval", help="seconds between status")
        ] = 10.0,
        qtable_interval: Annotated[
            float, typer.Option("--qtable-interval", help="min seconds between Q-table publishes per app")
        ] = 0.05,
        learning_rate: Annotated[float, typer.Option("--learning-rate", help="Q-learning step size α")] = 0.5,
        discount: Annotated[float, typer.Option("--discount", help="discount factor γ")] = 0.9,
        ha_discovery: Annotated[
            bool, typer.Option("--ha-discovery", help="announce sensors via Home Assistant MQTT discovery")
        ] = False,
        options_file: Annotated[
            Path,
            typer.Option("--options-file", help="Home Assistant add-on options JSON (read when present)"),
        ] = DEFAULT_OPTIONS_FILE,
    ) -> None:
        """Run the Visual Mapper ML training server: learn from devices over MQTT, publish Q-values."""
        from tether.ingest.mqtt_server import MLTrainingServer, ServerConfig

        flags = {
            "broker": broker,
            "port": port,
            "data_dir": data_dir,
            "dqn": dqn,
            "batch_size": batch_size,
            "save_interval": save_interval,
        }
        settings, reason = resolve_settings(flags, options_file)
        if reason is not None:
            console.print(reason)
            raise typer.Exit(0)
        if use_npu and use_coral:
            raise MQTTOptionsError("--use-npu and --use-coral exclude each other; pick one accelerator.")
        if not 0.0 < learning_rate <= 1.0 or not 0.0 <= discount <= 1.0:
            raise MQTTOptionsError("--learning-rate must be in (0, 1] and --discount in [0, 1].")
        config = ServerConfig(
            username=username,
            password=password,
            tls=tls or bool(tls_ca) or tls_insecure,
            tls_ca=tls_ca,
            tls_insecure=tls_insecure,
            topic_prefix=topic_prefix,
            client_id=client_id,
            provider="npu" if use_npu else "coral" if use_coral else "cpu",
            status_interval=status_interval,
            qtable_interval=qtable_interval,
            learning_rate=learning_rate,
            discount=discount,
            ha_discovery=ha_discovery,
            **settings,
        )
        server = MLTrainingServer(config)
        done = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            console.print(
                f"[bold]Tether ML training[/] ({server.model.kind}) on {config.broker}:{config.port}, "
                f"topics {server.topics.base}/#, data in {config.data_dir}. Ctrl-C to stop.",
                highlight=False,
            )
            while not done.wait(0.5):
                pass
        finally:
            server.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        c = server.counters.as_dict()
        console.print(
            f"stopped: {c['accepted']} transitions learned, {c['duplicates']} duplicates, "
            f"{c['rejected_total']} rejected, {c['published']} messages published.",
            highlight=False,
        )

    @sim_app.command("android")
    def sim_android(
        broker: Annotated[str, typer.Option("--broker", "-b", help="MQTT broker address")] = "localhost",
        port: Annotated[int, typer.Option("--port", "-p", help="MQTT broker port")] = 1883,
        username: UsernameOption = None,
        password: PasswordOption = None,
        apps: Annotated[int, typer.Option("--apps", min=1, max=1000, help="number of simulated apps")] = 2,
        devices: Annotated[
            int, typer.Option("--devices", min=1, max=500, help="number of simulated devices")
        ] = 2,
        steps: Annotated[int, typer.Option("--steps", min=0, help="taps per device (0: until Ctrl-C)")] = 0,
        rate: Annotated[
            float, typer.Option("--rate", min=0.0, help="taps per second per device (0: flat out)")
        ] = 10.0,
        batch: Annotated[int, typer.Option("--batch", min=1, max=2000, help="transitions per message")] = 1,
        epsilon: Annotated[float, typer.Option("--epsilon", min=0.0, max=1.0, help="exploration rate")] = 0.2,
        seed: Annotated[int, typer.Option("--seed", help="seed of the app graphs and devices")] = 0,
        topic_prefix: Annotated[str, typer.Option("--topic-prefix", help="topic prefix")] = "visualmapper",
        tls: Annotated[bool, typer.Option("--tls", help="connect with TLS")] = False,
        tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="CA certificate file")] = None,
        tls_insecure: Annotated[bool, typer.Option("--tls-insecure", help="skip certificate checks")] = False,
    ) -> None:
        """Simulated Visual Mapper phones exploring random apps over MQTT (for demos, tests and load)."""
        from tether.ingest.android_sim import AndroidSimulator

        sim = AndroidSimulator(
            broker=broker,
            port=port,
            apps=apps,
            devices=devices,
            seed=seed,
            epsilon=epsilon,
            batch=batch,
            rate=rate,
            topic_prefix=topic_prefix,
            username=username,
            password=password,
            tls=tls or bool(tls_ca) or tls_insecure,
            tls_ca=tls_ca,
            tls_insecure=tls_insecure,
        )
        try:
            sim.connect()
        except (OSError, ConnectionError) as exc:
            raise MQTTOptionsError(
                f"cannot connect the simulator to {broker}:{port} ({exc}); check the broker address, "
                "port and "
                "credentials."
            ) from None
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        runner = threading.Thread(target=sim.run, args=(steps or None, stop), daemon=True)
        t0 = time.monotonic()
        runner.start()
        try:
            while runner.is_alive():
                runner.join(5.0)
                st = sim.stats
                mean_len = sum(st.episode_lengths) / len(st.episode_lengths) if st.episode_lengths else 0.0
                console.print(
                    f"{time.monotonic() - t0:6.1f}s  {st.transitions} transitions  {st.episodes} episodes  "
                    f"goal rate {st.goals / max(1, st.episodes):.2f}  mean length {mean_len:.1f}",
                    highlight=False,
                )
        finally:
            stop.set()
            runner.join()
            for s, handler in previous.items():
                signal.signal(s, handler)
        time.sleep(0.5)  # let the last Q-table publishes arrive before judging them
        scores = sim.evaluate()
        sim.close()
        table = Table(title="greedy policy from the published Q-values")
        table.add_column("app")
        table.add_column("starts within 1.2× shortest path", justify="right")
        for name, score in scores.items():
            table.add_row(name, f"{100 * score:.0f} %")
        console.print(table)
