import threading

import numpy as np
import pytest
import torch

from tether.checkpoint import load_checkpoint
from tether.config import ConfigError, load_config
from tether.metrics import MetricsBus, read_jsonl
from tether.runs import load_learner
from tether.trainer import Trainer


def _config(overrides, extra=()):
    config, _ = load_config("cartpole", [*overrides, *extra])
    return config


def test_run_writes_record_and_checkpoints(tmp_path, cartpole_overrides):
    bus = MetricsBus()
    result = Trainer(_config(cartpole_overrides), tmp_path / "run", bus=bus).run()
    run = tmp_path / "run"
    assert result.status == "finished" and result.steps == 1024 and result.updates == 8
    assert (run / "config.yaml").is_file() and (run / "final.pt").is_file()
    assert len(list((run / "checkpoints").glob("ckpt_*.pt"))) == 3  # keep_checkpoints default
    assert list((run / "tb").glob("events.out.tfevents.*"))
    events = read_jsonl(run / "metrics.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "training_status" and events[0]["data"]["status"] == "started"
    assert kinds[-1] == "training_status" and events[-1]["data"]["status"] == "finished"
    rows = [e["data"] for e in events if e["type"] == "metrics_update"]
    assert [r["update"] for r in rows] == list(range(1, 9))
    for key in (
        "train/policy_loss",
        "train/value_loss",
        "train/entropy",
        "perf/sps",
        "train/episode_reward_ma100",
    ):
        assert key in rows[-1]


def test_resume_continues_counters_and_weights(tmp_path, cartpole_overrides):
    run = tmp_path / "run"
    first = Trainer(_config(cartpole_overrides), run).run()
    state = load_checkpoint(run / "final.pt")
    resumed = Trainer(_config(cartpole_overrides, ["schedule.total_steps=2048"]), run, resume=True)
    # The restored learner acts exactly like the saved one before training on.
    loaded = load_learner(run / "final.pt")
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    expected = loaded.learner.act(obs, explore=False).action
    result = resumed.run()
    assert result.steps == 2048 and result.updates == first.updates * 2
    assert result.episodes >= state["trainer"]["episodes"]["episodes"]
    rows = [e["data"] for e in read_jsonl(run / "metrics.jsonl") if e["type"] == "metrics_update"]
    assert [r["update"] for r in rows] == list(range(1, 17))
    assert expected.shape == (16,)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, cartpole_overrides):
    with pytest.raises(ConfigError, match="found no checkpoint"):
        Trainer(_config(cartpole_overrides), tmp_path / "empty", resume=True).run()


def _final_weights(run):
    return load_checkpoint(run / "final.pt")["learner"]["net"]


def test_evaluations_during_training_are_logged_and_leave_training_unchanged(tmp_path, cartpole_overrides):
    evaluated = ["schedule.eval_every=256", "schedule.eval_every_episodes=3"]
    result = Trainer(_config(cartpole_overrides, evaluated), tmp_path / "eval").run()
    Trainer(_config(cartpole_overrides), tmp_path / "plain").run()
    assert result.status == "finished" and result.steps == 1024 and result.reached_target_at is None
    events = read_jsonl(tmp_path / "eval" / "metrics.jsonl")
    rows = [e["data"] for e in events if e["type"] == "metrics_update"]
    scored = [r for r in rows if "eval/mean_return" in r]
    assert [r["step"] for r in scored] == [256, 512, 768, 1024]
    for row in scored:  # CartPole pays 1 per step, so a greedy episode's return is its length
        assert row["eval/mean_return"] == row["eval/mean_length"] >= 8
        assert row["eval/std_return"] >= 0 and "train/policy_loss" in row
    # Greedy evaluation draws nothing from the training's random streams: the same weights.
    trained, plain = _final_weights(tmp_path / "eval"), _final_weights(tmp_path / "plain")
    assert trained.keys() == plain.keys()
    assert all(torch.equal(trained[k], plain[k]) for k in trained)


def test_stop_at_return_ends_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, cartpole_overrides):
    target = ["schedule.eval_every=256", "schedule.eval_every_episodes=2", "schedule.stop_at_return=1"]
    bus = MetricsBus()
    result = Trainer(_config(cartpole_overrides, target), tmp_path / "run", bus=bus).run()
    assert result.status == "finished" and result.reached_target_at == 256 and result.steps == 256
    assert (tmp_path / "run" / "final.pt").is_file()
    assert load_checkpoint(tmp_path / "run" / "final.pt")["trainer"]["steps"] == 256
    final = bus.history("training_status")[-1]["data"]
    assert final["status"] == "finished" and final["reached_target_at"] == 256


def test_stop_at_return_without_evaluations_is_a_clear_error(cartpole_overrides):
    with pytest.raises(ConfigError, match=r"needs schedule\.eval_every"):
        _config(cartpole_overrides, ["schedule.stop_at_return=100"])
    with pytest.raises(ConfigError, match=r"schedule\.eval_every.*greater than or equal to 1"):
        _config(cartpole_overrides, ["schedule.eval_every=0", "schedule.stop_at_return=100"])


def test_controls_from_another_thread(tmp_path, cartpole_overrides):
    config = _config(cartpole_overrides, ["schedule.total_steps=10000000"])
    bus = MetricsBus()
    trainer = Trainer(config, tmp_path / "run", bus=bus)
    sub = bus.subscribe()
    thread = threading.Thread(target=trainer.run)
    thread.start()
    try:
        while True:  # wait for the first update
            event = sub.get(timeout=60)
            assert event is not None
            if event["type"] == "metrics_update":
                break
        with pytest.raises(ConfigError, match="live keys are"):
            trainer.update_config({"training.num_epochs": 3})
        with pytest.raises(ConfigError):
            trainer.update_config({"training.learning_rate": -1})
        applied = trainer.update_config({"training.learning_rate": 0.005})
        assert applied == {"training.learning_rate": 0.005}
        path = trainer.request_save()
        assert path.is_file() and load_checkpoint(path)["trainer"]["updates"] >= 1
        while True:
            event = sub.get(timeout=60)
            assert event is not None
            if event["type"] == "config_updated":
                assert event["data"] == {"training.learning_rate": 0.005}
                break
    finally:
        trainer.request_stop()
        thread.join(timeout=60)
    assert trainer.status == "stopped"
    assert trainer.learner.config.learning_rate == 0.005
    assert bus.history("training_status")[-1]["data"]["status"] == "stopped"


def test_load_learner_rejects_foreign_files(tmp_path):
    from tether.errors import TetherError

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TetherError, match="cannot be read"):
        load_learner(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(TetherError, match="not a Tether training checkpoint"):
        load_learner(other)
    with pytest.raises(TetherError, match="neither a run directory"):
        load_learner(tmp_path / "missing")
