import pytest

from tether.config import ConfigError, apply_override, load_config, preset_names


def test_presets_load_and_overrides_apply():
    assert {"lunabotics", "cartpole", "lunarlander"} <= set(preset_names())
    config, name = load_config("cartpole", ["training.learning_rate=0.01", "schedule.total_steps=5"])
    assert name == "cartpole"
    assert config.training.learning_rate == 0.01
    assert config.schedule.total_steps == 5
    assert config.algorithm == "ppo"


def test_lunabotics_preset_has_the_documented_defaults():
    config, _ = load_config("lunabotics")
    t = config.training
    assert (t.learning_rate, t.num_epochs, t.lambda_gae, t.discount_factor, t.batch_size) == (
        3e-4,
        10,
        0.95,
        0.99,
        512,
    )
    assert t.actor_fc_layers == [256, 256] and t.value_fc_layers == [256, 256] and t.activation == "tanh"
    assert config.rewards["deposit_orb"] == 200.0


@pytest.mark.parametrize(
    ("source", "overrides", "fragment"),
    [
        ("no-such-preset", [], "unknown preset 'no-such-preset'"),
        ("cartpole", ["training.learning_rat=0.1"], "unknown config key 'training.learning_rat'"),
        ("cartpole", ["training.learning_rate=fast"], "training.learning_rate"),
        ("cartpole", ["training.num_epochs=-1"], "training.num_epochs"),
        ("cartpole", ["schedule.total_steps=[1, 2]"], "schedule.total_steps"),
        ("cartpole", ["nonsense"], "must look like section.key=value"),
        ("cartpole", ["training.algorithm=magic"], "unknown training.algorithm 'magic'"),
        ("cartpole", ["environment.id=NoSuchEnv-v9"], "unknown environment id"),
        ("cartpole", ["rewards.deposit_orb=1"], "only applies to tether/Lunabotics-v0"),
        ("lunabotics", ["rewards.deposit_orbz=1"], "unknown reward term 'rewards.deposit_orbz'"),
        ("lunabotics", ["environment.warp_drive=1"], "unknown config key 'environment.warp_drive'"),
        ("cartpole", ["device=tpu"], "device"),
    ],
)
def test_bad_config_is_one_clear_sentence(source, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(listy))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_override_into_a_value_is_refused():
    data = {"seed": 3}
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override(data, "seed.x=1")
