"""Hand-written MLP passes and the optimizer shortcuts DQN and SAC use: the same numbers as
autograd and `torch.optim.Adam`, in float32 exactly (to rounding) and in bfloat16 approximately."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tether.algos import dqn as dqn_algo
from tether.algos import sac as sac_algo
from tether.algos.base import Transitions
from tether.algos.optim import adam, adam_step, clip_grads
from tether.algos.passes import (
    LOW_PRECISION_ROWS,
    NARROW,
    MlpPasses,
    Tape,
    has_amx,
    has_native_bf16,
    matmul_dtype,
    onednn_float32_products,
    onednn_products,
    x86_vendor_is_not_intel,
)
from tether.algos.sac import EnsembleLinear, TwinQ
from tether.nets import mlp

LOOSE = {"rtol": 3e-2, "atol": 3e-2}  # bfloat16 keeps 8 bits of mantissa


def _plain(activation: str = "relu") -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(5, [64, 48], 3, activation)


def _twin() -> nn.Sequential:
    torch.manual_seed(0)
    return TwinQ(4, 2, [64, 48], "relu").net


def _ensemble_head() -> nn.Sequential:
    """An ensemble whose last layer has a few outputs (not one): its own narrow-layer path."""
    torch.manual_seed(0)
    return nn.Sequential(
        EnsembleLinear(2, 6, 64), nn.ReLU(), EnsembleLinear(2, 64, 48), nn.ReLU(), EnsembleLinear(2, 48, 3)
    )


NETS = {
    "relu": lambda: _plain("relu"),
    "tanh": lambda: _plain("tanh"),
    "twin": _twin,
    "ensemble": _ensemble_head,
}


def _input(net: nn.Sequential, rows: int = 40) -> torch.Tensor:
    torch.manual_seed(1)
    first = net[0]
    if first.weight.dim() == 3:
        return torch.randn(rows, first.weight.shape[1]).expand(2, rows, -1)
    return torch.randn(rows, first.weight.shape[1])


def _autograd(net: nn.Sequential, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[list, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    net(x).backward(grad_out)
    return [p.grad.clone() for p in net.parameters()], x.grad


@pytest.mark.parametrize("kind", list(NETS))
def test_forward_and_backward_match_autograd_in_float32(kind: str) -> None:
    net = NETS[kind]()
    _assert_matches_autograd(net, MlpPasses(net))


def _assert_matches_autograd(net: nn.Sequential, passes: MlpPasses) -> None:
    """`passes` of `net` give autograd's output, parameter gradients and input gradient."""
    reference = copy.deepcopy(net)
    x = _input(net)
    passes.allocate_grads()
    tape = Tape()
    out = passes.forward(x, tape)
    torch.testing.assert_close(out, reference(x))
    grad_out = torch.randn_like(out)
    grad_in = passes.backward(tape, grad_out, inputs=True)
    ref_grads, ref_in = _autograd(reference, x, grad_out)
    for ours, theirs in zip((p.grad for p in net.parameters()), ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad_in, ref_in)


NO_AMX = pytest.mark.skipif(not has_amx(torch.device("cpu")), reason="this CPU has no AMX tiles")


@pytest.mark.parametrize("route", ["casts", pytest.param("fused", marks=NO_AMX)])
@pytest.mark.parametrize("kind", ["relu", "twin", "ensemble"])
def test_bfloat16_products_stay_close_to_float32(kind: str, route: str) -> None:
    net = NETS[kind]()
    reference = copy.deepcopy(net)
    x = _input(net, rows=LOW_PRECISION_ROWS + 8)
    passes = MlpPasses(net, torch.bfloat16)
    passes.fused = route == "fused"
    passes.allocate_grads()
    tape = Tape()
    out = passes.forward(x, tape)
    # The casting route keeps its rounded operands; the fused one rounds inside the kernel.
    assert bool(tape.low) == (route == "casts")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(x), **LOOSE)
    grad_out = torch.randn_like(out)
    passes.backward(tape, grad_out)
    ref_grads, _ = _autograd(reference, x, grad_out)
    for ours, theirs in zip((p.grad for p in net.parameters()), ref_grads, strict=True):
        assert ours.dtype == torch.float32
        # Rounding errors compound towards the first layer (and near-zero units may flip).
        assert torch.linalg.vector_norm(ours - theirs) <= 0.1 * torch.linalg.vector_norm(theirs) + 1e-6


@NO_AMX
def test_fused_products_multiply_bfloat16_rounded_inputs_and_only_inside_the_block() -> None:
    a, b = torch.randn(64, 256), torch.randn(256, 256)
    exact = torch.mm(a, b)
    rounded = torch.mm(a.bfloat16().float(), b.bfloat16().float())
    assert not torch.allclose(exact, rounded, rtol=1e-4, atol=1e-4)
    with onednn_products():
        torch.testing.assert_close(torch.mm(a, b), rounded, rtol=1e-5, atol=1e-5)
        ensemble = torch.bmm(a.expand(2, -1, -1), b.expand(2, -1, -1))
        torch.testing.assert_close(ensemble, rounded.expand(2, -1, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.mm(a, b), exact, rtol=0, atol=0)


@pytest.mark.skipif(has_amx(torch.device("cpu")), reason="with AMX the oneDNN mode rounds to bfloat16")
@pytest.mark.parametrize("kind", list(NETS))
def test_onednn_float32_route_matches_autograd(kind: str) -> None:
    # Forced on, whatever this CPU's vendor: the route must give float32's numbers everywhere.
    net = NETS[kind]()
    passes = MlpPasses(net)
    passes.onednn = [min(w.shape[-2:]) > NARROW for w in passes.weights]
    assert any(passes.onednn) and not all(passes.onednn)  # the narrow first/last layers stay out
    _assert_matches_autograd(net, passes)


def test_onednn_float32_route_is_chosen_by_the_cpu_and_only_for_wide_float32_layers(monkeypatch) -> None:
    assert x86_vendor_is_not_intel("processor\t: 0\nvendor_id\t: AuthenticAMD\n")
    assert not x86_vendor_is_not_intel("vendor_id\t: GenuineIntel\nvendor_id\t: GenuineIntel\n")
    assert not x86_vendor_is_not_intel("")  # no vendor named (not x86, or no /proc): no route
    assert not onednn_float32_products(torch.device("meta"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not onednn_float32_products(torch.device("cpu"))  # there the mode means bfloat16
    monkeypatch.undo()
    route = onednn_float32_products(torch.device("cpu"))
    assert MlpPasses(_plain()).onednn == [False, route, False]
    # A bfloat16 layer casts (or, on AMX, takes the fused route): never the float32 one.
    assert MlpPasses(_plain(), torch.bfloat16).onednn == [False, False, False]


def test_small_batches_and_first_and_last_layers_stay_float32() -> None:
    net = _plain()
    passes = MlpPasses(net, torch.bfloat16)
    assert passes.low == [False, True, False]
    x = _input(net, rows=4)
    tape = Tape()
    torch.testing.assert_close(passes.forward(x, tape), net(x))
    assert not tape.low


def test_bfloat16_passes_see_every_kind_of_weight_update() -> None:
    # Fused Adam and foreach lerp write without bumping version counters: nothing may be cached.
    net = _plain()
    passes = MlpPasses(net, torch.bfloat16)
    passes.allocate_grads()
    x = _input(net, rows=64)
    opt = adam(net.parameters(), 0.5, torch.device("cpu"))
    first = passes.forward(x)

    def check() -> None:
        out = passes.forward(x)
        torch.testing.assert_close(out, net(x), **LOOSE)
        assert not torch.allclose(out, first, **LOOSE)

    tape = Tape()
    passes.backward(tape, torch.ones_like(passes.forward(x, tape)))
    adam_step(opt)
    check()
    with torch.no_grad():
        torch._foreach_lerp_(list(net.parameters()), [torch.full_like(p, 0.1) for p in net.parameters()], 0.5)
    check()
    net.load_state_dict(_plain().state_dict())
    torch.testing.assert_close(passes.forward(x), first, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_numpy_forward_matches_and_follows_updates(activation: str) -> None:
    net = _plain(activation)
    passes = MlpPasses(net, torch.bfloat16)  # acting stays float32 whatever the precision
    x = _input(net, rows=3)
    torch.testing.assert_close(torch.from_numpy(passes.forward_numpy(x.numpy())), net(x).detach())
    opt = adam(net.parameters(), 0.5, torch.device("cpu"))
    net(x).sum().backward()
    adam_step(opt)
    torch.testing.assert_close(torch.from_numpy(passes.forward_numpy(x.numpy())), net(x).detach())
    with pytest.raises(ValueError, match="plain linear layers"):
        MlpPasses(_twin()).forward_numpy(np.zeros((1, 6), np.float32))


def test_first_rows_tape_backpropagates_only_those_rows() -> None:
    net = _plain()
    passes = MlpPasses(net)
    grads = passes.allocate_grads()
    x = _input(net, rows=30)
    tape = Tape()
    out = passes.forward(x, tape)
    grad_out = torch.randn(10, out.shape[1])
    passes.backward(tape.first_rows(10), grad_out)
    joint = grads[0].clone()
    ref_tape = Tape()
    passes.forward(x[:10], ref_tape)
    passes.backward(ref_tape, grad_out)
    torch.testing.assert_close(joint, grads[0])


def test_backward_into_weights_needs_allocated_grads() -> None:
    net = _plain()
    passes = MlpPasses(net)
    tape = Tape()
    out = passes.forward(_input(net), tape)
    with pytest.raises(RuntimeError, match="allocate_grads"):
        passes.backward(tape, torch.ones_like(out))
    assert passes.backward(tape, torch.ones_like(out), weights=False, inputs=True) is not None


def test_grads_are_views_of_one_flat_tensor() -> None:
    net = _plain()
    (flat,) = MlpPasses(net).allocate_grads()
    assert flat.numel() == sum(p.numel() for p in net.parameters())
    next(net.parameters()).grad.fill_(3.0)
    assert float(flat[0]) == 3.0


def test_supports_only_relu_or_tanh_linear_stacks() -> None:
    assert MlpPasses.supports(_plain("relu")) and MlpPasses.supports(_plain("tanh"))
    assert not MlpPasses.supports(_plain("elu"))
    assert not MlpPasses.supports(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Tanh()))
    mixed = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    assert not MlpPasses.supports(mixed)
    with pytest.raises(ValueError, match="ReLU or tanh"):
        MlpPasses(_plain("gelu"))


def test_precision_setting() -> None:
    cpu = torch.device("cpu")
    assert matmul_dtype("float32", cpu) == torch.float32
    assert matmul_dtype("bfloat16", cpu) == torch.bfloat16
    assert matmul_dtype("auto", cpu) == (torch.bfloat16 if has_native_bf16(cpu) else torch.float32)
    assert not has_native_bf16(torch.device("cuda"))


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "native"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_native_bfloat16_means_amx_or_avx512_bf16(
    monkeypatch, amx: bool, avx512_bf16: bool, native: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert has_native_bf16(torch.device("cpu")) is native
    assert matmul_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValidationError):
        dqn_algo.Config(precision="float16")


# ---------------------------------------------------------------------------------- optimizer
def test_adam_step_matches_optimizer_step_and_its_state() -> None:
    ours, theirs = _plain(), _plain()
    opt_ours, opt_theirs = (
        adam(ours.parameters(), 1e-2, torch.device("cpu")),
        adam(theirs.parameters(), 1e-2, torch.device("cpu")),
    )
    x = _input(ours)
    for _ in range(4):
        for net in (ours, theirs):
            net.zero_grad()
            net(x).pow(2).mean().backward()
        adam_step(opt_ours)
        opt_theirs.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A checkpoint of either loads into the other.
    opt_theirs.load_state_dict(opt_ours.state_dict())
    for state_a, state_b in zip(opt_ours.state.values(), opt_theirs.state.values(), strict=True):
        assert state_a.keys() == state_b.keys()
        torch.testing.assert_close(state_a["step"], state_b["step"])


def test_adam_step_falls_back_for_other_configurations() -> None:
    net = _plain()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0.1)
    reference = copy.deepcopy(net)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, weight_decay=0.1)
    x = _input(net)
    for model in (net, reference):
        model(x).sum().backward()
    adam_step(opt)
    ref_opt.step()
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_clip_grads_on_one_flat_tensor_matches_torch() -> None:
    net, reference = _plain(), _plain()
    flat = MlpPasses(net).allocate_grads()
    x = _input(net)
    net(x).sum().backward()  # accumulates into the flat views
    reference(x).sum().backward()
    clip_grads(flat, 0.5)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------- learners
def _transitions(rng: np.random.Generator, n: int, obs_dim: int, actions: np.ndarray) -> Transitions:
    return Transitions(
        rng.normal(size=(n, obs_dim)).astype(np.float32),
        actions,
        rng.normal(size=n).astype(np.float32),
        rng.normal(size=(n, obs_dim)).astype(np.float32),
        rng.random(n) < 0.1,
        np.zeros(n, bool),
    )


def _twins(learner: object) -> tuple[object, object]:
    """The learner and a copy of it forced through autograd."""
    reference = copy.deepcopy(learner)
    for name in ("_passes", "_target_passes", "_grads", "_actor_grads", "_critic_grads"):
        if hasattr(reference, name):
            setattr(reference, name, None)
    return learner, reference


def _assert_trains_through_autograd(learner: object, batch: Transitions, loss: str, net: nn.Module) -> None:
    """A learner without hand-written passes still updates: a finite `loss` and a changed `net`."""
    assert learner._passes is None
    learner.observe(batch)
    before = [p.clone() for p in net.parameters()]
    assert np.isfinite(learner.update()[loss])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"loss": "mse", "double_q": True}, {"prioritized": True, "max_grad_norm": None}],
)
def test_dqn_manual_update_matches_autograd(overrides: dict) -> None:
    obs = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    config = dqn_algo.Config(
        batch_size=32, train_freq=64, gradient_steps=6, learning_starts=0, net_arch=[32, 32], **overrides
    )
    learner = dqn_algo.build(config, obs, gym.spaces.Discrete(3), seed=3)
    assert learner._passes is not None
    rng = np.random.default_rng(0)
    learner.observe(_transitions(rng, 64, 4, rng.integers(0, 3, 64)))
    ours, reference = _twins(learner)
    metrics_ours, metrics_ref = ours.update(), reference.update()
    assert metrics_ours["loss"] == pytest.approx(metrics_ref["loss"], rel=1e-5)
    for a, b in zip(ours.q.parameters(), reference.q.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_dqn_dueling_head_trains_through_autograd() -> None:
    obs = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    config = dqn_algo.Config(batch_size=16, train_freq=16, learning_starts=0, net_arch=[16, 16], dueling=True)
    learner = dqn_algo.build(config, obs, gym.spaces.Discrete(2))
    rng = np.random.default_rng(0)
    _assert_trains_through_autograd(
        learner, _transitions(rng, 16, 4, rng.integers(0, 2, 16)), "loss", learner.q
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"ent_coef": 0.1, "prioritized": True},
        {"max_grad_norm": 0.5},
        {"normalize_obs": True},
        {"normalize_obs": True, "angle_obs": [1]},
    ],
)
def test_sac_manual_update_matches_autograd(overrides: dict) -> None:
    obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    config = sac_algo.Config(
        batch_size=32,
        train_freq=64,
        gradient_steps=4,
        learning_starts=0,
        actor_fc_layers=[32, 32],
        critic_fc_layers=[32, 32],
        **overrides,
    )
    learner = sac_algo.build(config, obs, act, seed=2)
    assert learner._passes is not None
    rng = np.random.default_rng(1)
    learner.observe(_transitions(rng, 64, 3, rng.uniform(-2, 2, (64, 2)).astype(np.float32)))
    ours, reference = _twins(learner)
    torch.manual_seed(7)
    metrics_ours = ours.update()
    torch.manual_seed(7)
    metrics_ref = reference.update()
    for key in ("critic_loss", "actor_loss", "ent_coef", "q_mean", "entropy"):
        assert metrics_ours[key] == pytest.approx(metrics_ref[key], rel=1e-4, abs=1e-6), key
    for name in ("actor", "critic", "critic_target"):
        for a, b in zip(getattr(ours, name).parameters(), getattr(reference, name).parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.log_alpha, reference.log_alpha)


def test_sac_with_another_activation_trains_through_autograd() -> None:
    obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    config = sac_algo.Config(
        batch_size=16,
        train_freq=16,
        learning_starts=0,
        actor_fc_layers=[16],
        critic_fc_layers=[16],
        activation="elu",
    )
    learner = sac_algo.build(config, obs, act)
    rng = np.random.default_rng(0)
    batch = _transitions(rng, 16, 3, rng.uniform(-1, 1, (16, 1)).astype(np.float32))
    _assert_trains_through_autograd(learner, batch, "critic_loss", learner.actor)


@pytest.mark.parametrize("algorithm", ["dqn", "sac"])
def test_bfloat16_learners_update_close_to_float32(algorithm: str) -> None:
    rng = np.random.default_rng(4)
    obs = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    results = {}
    for precision in ("float32", "bfloat16"):
        if algorithm == "dqn":
            config = dqn_algo.Config(
                batch_size=64, train_freq=64, gradient_steps=2, learning_starts=0, precision=precision
            )
            learner = dqn_algo.build(config, obs, gym.spaces.Discrete(2), seed=1)
            batch = _transitions(np.random.default_rng(4), 64, 4, rng.integers(0, 2, 64))
        else:
            config = sac_algo.Config(batch_size=64, train_freq=64, learning_starts=0, precision=precision)
            learner = sac_algo.build(config, obs, gym.spaces.Box(-1.0, 1.0, (1,), np.float32), seed=1)
            batch = _transitions(np.random.default_rng(4), 64, 4, np.zeros((64, 1), np.float32))
        learner.observe(batch)
        torch.manual_seed(0)
        results[precision] = learner.update()
    key = "loss" if algorithm == "dqn" else "critic_loss"
    assert results["bfloat16"][key] == pytest.approx(results["float32"][key], rel=0.05)
