"""The rover's RGB-D actor-critic: its size, shapes, gradients, feature reuse, autocast and export."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tether.algos.base import Transitions
from tether.nets import ActorCritic
from tether.nets_rgbd import (
    ONNX_METADATA_KEY,
    RgbdActorCritic,
    RgbdExportPolicy,
    export_rgbd_onnx,
    parameter_count,
    rgbd_observation_space,
)


def _obs(
    b: int = 4, h: int = 30, w: int = 53, seed: int = 0, depth_hw: tuple[int, int] | None = None
) -> dict:
    g = torch.Generator().manual_seed(seed)
    dh, dw = depth_hw or (h, w)
    return {
        "rgb": torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=g),
        "depth": torch.rand(b, 1, dh, dw, generator=g),
        "proprio": torch.randn(b, 6, generator=g),
    }


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _lin(cin: int, cout: int) -> int:
    return cin * cout + cout


def test_parameter_count_matches_the_rover_design_layer_by_layer() -> None:
    net = RgbdActorCritic()
    encoder = _conv(3, 32, 5) + _conv(32, 64, 3) + _conv(1, 16, 5) + _conv(16, 32, 3)
    encoder += _conv(96, 128, 3) + _conv(128, 128, 3) + _lin(6, 64) + _lin(64, 64)
    policy = _lin(192, 128) + _lin(128, 64) + _lin(64, 2)
    value = _lin(192, 128) + _lin(128, 64) + _lin(64, 1)
    assert parameter_count(net) == encoder + policy + value + 2  # + the 2 log-stds
    assert parameter_count(net) == 355_013
    assert parameter_count(net.policy_head) == policy and parameter_count(net.value_head) == value
    assert isinstance(net, ActorCritic)


def test_shapes_and_action_range() -> None:
    net = RgbdActorCritic()
    obs = _obs(b=5)
    dist = net.distribution(obs)
    assert dist.batch_shape == (5,) and dist.event_shape == (2,)
    assert net.value(obs).shape == (5,)
    action = net(obs)
    assert action.shape == (5, 2) and bool((action.abs() < 1).all())


def test_uint8_and_unit_float_rgb_give_the_same_output() -> None:
    net = RgbdActorCritic()
    obs = _obs()
    as_float = {**obs, "rgb": obs["rgb"].float() / 255.0}
    assert torch.allclose(net(obs), net(as_float), atol=1e-6)


def test_depth_of_another_size_is_fused_after_resizing() -> None:
    net = RgbdActorCritic()
    obs = _obs(b=2, h=60, w=106, depth_hw=(30, 53))
    assert net(obs).shape == (2, 2) and torch.isfinite(net.value(obs)).all()


def test_gradients_reach_every_parameter() -> None:
    net = RgbdActorCritic()
    obs = _obs(b=8)
    dist, value = net.distribution_and_value(obs)
    loss = -dist.log_prob(torch.full((8, 2), 0.3)).mean() + (value - 1.0).pow(2).mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in net.named_parameters() if float(p.grad.abs().sum()) == 0.0]
    assert not zero, f"no gradient reached {zero}"


def test_value_after_distribution_reuses_features_with_identical_gradients() -> None:
    torch.manual_seed(0)
    a, b = RgbdActorCritic(), RgbdActorCritic()
    b.load_state_dict(a.state_dict())
    obs = _obs(b=6)
    actions = torch.full((6, 2), -0.2)
    # a: PPO's call pattern, the same dict twice (features reused); b: separate encoder passes.
    loss_a = -a.distribution(obs).log_prob(actions).mean() + a.value(obs).pow(2).mean()
    loss_b = -b.distribution(obs).log_prob(actions).mean() + b.value(dict(obs)).pow(2).mean()
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


def test_feature_reuse_is_dropped_after_a_parameter_update() -> None:
    net = RgbdActorCritic()
    obs = _obs(b=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    dist = net.distribution(obs)
    (-dist.log_prob(torch.zeros(3, 2)).mean() - net.value(obs).mean()).backward()
    _ = net.distribution(obs)  # caches features, then the weights change
    opt.step()
    cached_then_stepped = net.value(obs)
    fresh = net.value(dict(obs))
    assert torch.allclose(cached_then_stepped, fresh)


def test_bf16_autocast_keeps_heads_and_log_probs_in_float32() -> None:
    net = RgbdActorCritic()
    obs = _obs(b=4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        dist, value = net.distribution_and_value(obs)
        logp = dist.log_prob(torch.zeros(4, 2))
    assert value.dtype == torch.float32 and logp.dtype == torch.float32
    with torch.no_grad():
        ref = net(obs)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low = net(obs)
    assert (ref - low).abs().max() < 0.05


def test_onnx_export_matches_pytorch_and_carries_metadata() -> None:
    torch.manual_seed(3)
    net = RgbdActorCritic().eval()
    with torch.no_grad():
        net.policy_head[-2].weight.mul_(100.0)  # make the actions far from 0 so the check means something
    meta = {"image_size": [53, 30], "max_depth": 10.0, "log_std": [-0.5, -0.5]}
    blob = export_rgbd_onnx(net, (53, 30), meta)
    model = onnx.load_from_string(blob)
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props[ONNX_METADATA_KEY]) == meta
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    obs = _obs(b=7, seed=5)
    feeds = {k: v.numpy() for k, v in obs.items()}
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = RgbdExportPolicy(net)(obs["rgb"], obs["depth"], obs["proprio"]).numpy()
    assert got.shape == (7, 2)
    assert np.abs(want).max() > 0.3
    assert np.abs(got - want).max() <= 1e-4


def test_ppo_trains_the_rgbd_net_on_dict_observations() -> None:
    from tether.algos.ppo import PPO, Config

    space = rgbd_observation_space((24, 16))
    net = RgbdActorCritic()
    ppo = PPO(
        Config(rollout_steps=32, batch_size=16, num_epochs=2, normalize_obs=False),
        space,
        gym.spaces.Box(-1, 1, (2,), np.float32),
        actor_critic=net,
    )
    rng = np.random.default_rng(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for i in range(32):
        obs = {k: v.numpy() for k, v in _obs(b=1, h=16, w=24, seed=i).items()}
        out = ppo.act(obs)
        ppo.observe(
            Transitions(
                obs,
                out.action,
                np.array([rng.normal()]),
                obs,
                np.array([False]),
                np.array([i == 31]),
                out.extras,
            )
        )
    assert ppo.ready()
    metrics = ppo.update()
    assert all(np.isfinite(metrics[k]) for k in ("policy_loss", "value_loss", "entropy"))
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("log_std_init", [-0.5, 0.0])
def test_log_std_init(log_std_init: float) -> None:
    net = RgbdActorCritic(log_std_init=log_std_init)
    assert torch.allclose(net.log_std, torch.full((2,), log_std_init))
