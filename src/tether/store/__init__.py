"""Experience store, run history and model registry (SQLAlchemy; SQLite or PostgreSQL).

The whole API the trainer needs::

    from tether.store import open_store

    store = open_store()                 # URL: argument, else $TETHER_DB, else sqlite:///$ML_DATA_DIR/tether.db
    run_id = store.runs.start("lunabotics", preset="lunabotics", algorithm="ppo",
                              env_id="tether/Lunabotics-v0", config=job.to_dict(), run_dir=str(run_dir))
    store.runs.log_metrics(run_id, step, {"loss": 0.12, "sps": 5400.0})      # synchronous
    store.experience.write("rover-7", batch, episode=3, step=np.arange(100, 164))  # one transaction
    store.outcomes.write(episode=3, episode_return=12.5, length=200, success=True, run_id=run_id)
    model = store.models.register("lunabotics", "runs/x/policy.onnx", algorithm="ppo", parent_run_id=run_id)
    store.models.promote("lunabotics", model.version)   # previous production version -> archived
    store.models.get("lunabotics", stage="production")
    store.runs.finish(run_id, "completed", {"return_mean": 310.0})
    store.stats(); store.close()

Off the trainer thread (never blocks longer than `block_s`, drops with a counter when full)::

    with store.writer(on_commit=lambda ids: ...) as w:   # ids: batch ids now durable
        w.write_transitions("rover-7", batch, episode=3, step=t)
        w.log_metrics(run_id, step, metrics)
        w.write_outcomes([Outcome(episode=3, episode_return=12.5, length=200, run_id=run_id)])

Reading experience back (offline training, resume)::

    batch = store.experience.load_transitions("rover-7")                  # one Transitions
    for batch in store.experience.iter_transitions("rover-7", chunk_rows=65536):
        learner.observe(batch)                                           # bounded memory
    store.experience.load_into(replay_buffer, "rover-7", newest=capacity)  # n-step safe

psycopg (PostgreSQL) is imported only when a PostgreSQL URL is opened: `pip install 'tether[pg]'`.
See docs/store.md for tables, URLs, CLI and guarantees.
"""

from tether.store.api import Store, StoreStats, open_store
from tether.store.engine import StoreError, resolve_url
from tether.store.experience import ExperienceChunk, Outcome
from tether.store.export import export_npz, read_npz
from tether.store.registry import ModelRecord
from tether.store.runs import MetricPoint, RunRecord
from tether.store.writer import BackgroundWriter, WriterStats

__all__ = [
    "BackgroundWriter",
    "ExperienceChunk",
    "MetricPoint",
    "ModelRecord",
    "Outcome",
    "RunRecord",
    "Store",
    "StoreError",
    "StoreStats",
    "WriterStats",
    "export_npz",
    "open_store",
    "read_npz",
    "resolve_url",
]
