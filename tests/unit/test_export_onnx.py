"""ONNX export: parity with PyTorch for every learner, the deterministic action `tether eval`
takes, dynamic batch, named inputs/outputs, opsets, the sidecar, and bad input."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch
from export_support import LEARNERS, make_learner

from tether.export.onnx import (
    ExportError,
    build_graph,
    export_learner,
    export_onnx,
    sample_observations,
    space_from_spec,
    torch_outputs,
)
from tether.export.runtime import load_runtime


@functools.cache
def learner(kind: str) -> tuple[Any, gym.Space[Any], gym.Space[Any], Any]:
    return make_learner(kind)


@functools.cache
def exported(kind: str, tmp: str) -> Path:
    lrn, obs_space, act_space, _ = learner(kind)
    return export_onnx(lrn.policy(), obs_space, act_space, Path(tmp) / f"{kind}.onnx").path


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("onnx"))


def _obs(kind: str, n: int, seed: int = 1) -> Any:
    """Random observations from the space followed by recorded ones from the environment."""
    _, obs_space, _, recorded = learner(kind)
    rnd = sample_observations(obs_space, n, seed)
    if isinstance(rnd, dict):
        return {k: np.concatenate([rnd[k], recorded[k][:n]]) for k in rnd}
    return np.concatenate([rnd, np.asarray(recorded[:n]).astype(rnd.dtype)])


@pytest.mark.parametrize("kind", LEARNERS)
def test_onnx_runtime_matches_pytorch_within_1e5(kind: str, out_dir: str) -> None:
    lrn, obs_space, act_space, _ = learner(kind)
    path = exported(kind, out_dir)
    graph, in_specs, out_specs = build_graph(lrn.policy(), obs_space, act_space)
    obs = _obs(kind, 64)
    names = [s.name for s in in_specs]
    reference = torch_outputs(graph, obs, names)
    runtime = load_runtime(path, provider="cpu")
    got = runtime.run_all(obs if isinstance(obs, dict) else {"obs": obs})
    assert runtime.output_names == [s.name for s in out_specs]
    for spec, ref in zip(out_specs, reference, strict=True):
        assert got[spec.name].shape == ref.shape
        assert got[spec.name].dtype == np.dtype(spec.dtype)
        if np.issubdtype(ref.dtype, np.floating):
            assert np.max(np.abs(got[spec.name] - ref)) <= 1e-5
        else:
            np.testing.assert_array_equal(got[spec.name], ref)


@pytest.mark.parametrize("kind", LEARNERS)
def test_exported_action_equals_eval_deterministic_action(kind: str, out_dir: str) -> None:
    """`tether eval` acts with `learner.act(obs, explore=False)` on raw observations."""
    lrn, _, act_space, _ = learner(kind)
    obs = _obs(kind, 32, seed=5)
    expected = lrn.act(obs, explore=False).action
    action = load_runtime(exported(kind, out_dir), provider="cpu").run(obs)
    if isinstance(act_space, gym.spaces.Discrete):
        np.testing.assert_array_equal(action, expected)
    else:
        assert action.shape == expected.shape
        assert np.max(np.abs(action - expected)) <= 1e-5
        assert (action >= act_space.low - 1e-6).all() and (action <= act_space.high + 1e-6).all()


@pytest.mark.parametrize("kind", ["ppo_box", "rgbd", "dqn_discrete_obs"])
def test_dynamic_batch_and_single_observation(kind: str, out_dir: str) -> None:
    _, obs_space, _, _ = learner(kind)
    runtime = load_runtime(exported(kind, out_dir), provider="cpu")
    model = onnx.load(str(exported(kind, out_dir)))
    for value in model.graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    for n in (1, 3, 300):
        obs = sample_observations(obs_space, n, seed=n)
        assert runtime.run(obs).shape[0] == n
    one = sample_observations(obs_space, 1, seed=9)
    single = {k: v[0] for k, v in one.items()} if isinstance(one, dict) else one[0]
    np.testing.assert_array_equal(runtime.run(single), runtime.run(one)[0])


def test_named_inputs_and_outputs(out_dir: str) -> None:
    names = {k: load_runtime(exported(k, out_dir), provider="cpu") for k in ("ppo_box", "dqn", "rgbd")}
    assert names["ppo_box"].input_names == ["obs"] and names["ppo_box"].output_names == ["action"]
    assert names["dqn"].output_names == ["action", "q_values"]
    assert sorted(names["rgbd"].input_names) == ["depth", "proprio", "rgb"]
    obs = _obs("dqn", 16)
    out = names["dqn"].run_all(obs)
    np.testing.assert_array_equal(out["action"], out["q_values"].argmax(axis=1))


@pytest.mark.parametrize("kind", ["ppo_box", "ppo_discrete", "dqn"])
def test_graph_has_no_no_op_casts(kind: str, out_dir: str) -> None:
    """The outputs already have their exported dtype (float32 actions and Q-values, int64
    argmax), so no Cast node is traced for them: ONNX Runtime would keep and run it."""
    model = onnx.load(str(exported(kind, out_dir)))
    assert "Cast" not in {n.op_type for n in model.graph.node}
    lrn, obs_space, act_space, _ = learner(kind)
    _, _, out_specs = build_graph(lrn.policy(), obs_space, act_space)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in model.graph.output}
    expected = {s.name: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(s.dtype)) for s in out_specs}
    assert dtypes == expected


def test_a_policy_of_another_dtype_is_still_cast_to_the_contract(tmp_path: Path) -> None:
    space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 2).double(), torch.nn.Tanh())

    class Float64Policy(torch.nn.Module):
        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return policy(obs.double())

    path = export_onnx(
        Float64Policy(), space, gym.spaces.Box(-1.0, 1.0, (2,), np.float32), tmp_path / "p.onnx"
    ).path
    out = load_runtime(path, provider="cpu").run(np.zeros((3, 4), np.float32))
    assert out.dtype == np.float32 and out.shape == (3, 2)


def test_dict_inputs_keep_their_dtypes(out_dir: str) -> None:
    model = onnx.load(str(exported("rgbd", out_dir)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    assert types == {
        "rgb": onnx.TensorProto.UINT8,
        "depth": onnx.TensorProto.FLOAT,
        "proprio": onnx.TensorProto.FLOAT,
    }


def _strict_json(path: Path) -> dict[str, Any]:
    def refuse(value: str) -> None:
        raise AssertionError(f"non-standard JSON constant {value}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_sidecar_describes_the_model(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("ppo_box")
    meta = {"algorithm": "ppo", "training": {"metrics": {"train/episode_reward": 12.5}}}
    result = export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "p.onnx", metadata=meta)
    assert result.sidecar_path == tmp_path / "p.onnx.json"
    side = _strict_json(result.sidecar_path)
    assert side["format"] == "tether-export" and side["model_format"] == "onnx"
    assert side["sha256"] == hashlib.sha256((tmp_path / "p.onnx").read_bytes()).hexdigest()
    assert side["size_bytes"] == (tmp_path / "p.onnx").stat().st_size
    assert side["opset"] == 17 and side["tether_version"]
    assert side["inputs"] == [{"name": "obs", "dtype": "float32", "shape": [None, 28]}]
    assert side["outputs"] == [{"name": "action", "dtype": "float32", "shape": [None, 3]}]
    assert side["action_space"]["low"] == [-1.0, -1.0, 0.0] and side["action_space"]["high"] == 1.0
    assert space_from_spec(side["observation_space"]) == obs_space
    assert space_from_spec(side["action_space"]) == act_space
    (norm,) = side["normalizer"]
    np.testing.assert_allclose(norm["mean"], lrn.obs_norm.mean.numpy())
    np.testing.assert_allclose(norm["var"], lrn.obs_norm.var.numpy())
    assert norm["clip"] == 10.0 and norm["count"] > 100
    assert side["algorithm"] == "ppo" and side["training"]["metrics"]["train/episode_reward"] == 12.5


def test_sidecar_writes_unbounded_spaces_as_null(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    side = _strict_json(export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "c.onnx").sidecar_path)
    assert side["observation_space"]["low"][1] is None and side["observation_space"]["high"][3] is None
    assert space_from_spec(side["observation_space"]) == obs_space
    assert side["outputs"] == [{"name": "action", "dtype": "int64", "shape": [None]}]


def test_metadata_cannot_overwrite_file_facts(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    result = export_onnx(
        lrn.policy(), obs_space, act_space, tmp_path / "c.onnx", metadata={"sha256": "forged"}
    )
    assert result.sidecar["sha256"] == hashlib.sha256(result.path.read_bytes()).hexdigest()


@pytest.mark.parametrize("opset", [13, 17])
def test_opset_is_selectable(tmp_path: Path, opset: int) -> None:
    lrn, obs_space, act_space, _ = learner("dqn")
    result = export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "q.onnx", opset=opset)
    model = onnx.load(str(result.path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    obs = _obs("dqn", 8)
    np.testing.assert_array_equal(
        load_runtime(result.path, "cpu").run(obs), lrn.act(obs, explore=False).action
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ppo_box", "dqn"])
def test_dynamo_exporter_matches_pytorch(tmp_path: Path, kind: str) -> None:
    lrn, obs_space, act_space, _ = learner(kind)
    result = export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "d.onnx", opset=18, exporter="dynamo")
    assert result.sidecar["exporter"] == "dynamo" and result.sidecar["opset"] == 18
    graph, _, _ = build_graph(lrn.policy(), obs_space, act_space)
    obs = _obs(kind, 64)
    reference = torch_outputs(graph, obs, ["obs"])
    got = load_runtime(result.path, "cpu").run_all(obs)
    for ref, value in zip(reference, got.values(), strict=True):
        assert np.max(np.abs(value.astype(np.float64) - ref)) <= 1e-5


@pytest.mark.parametrize("opset", [5, 10, 999])
def test_unsupported_opset_is_one_clear_error(tmp_path: Path, opset: int) -> None:
    lrn, obs_space, act_space, _ = learner("dqn")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "q.onnx", opset=opset)
    assert not (tmp_path / "q.onnx").exists()


def test_dynamo_exporter_refuses_old_opsets(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("dqn")
    with pytest.raises(ExportError, match="opset 18 or later"):
        export_onnx(lrn.policy(), obs_space, act_space, tmp_path / "q.onnx", opset=13, exporter="dynamo")


def test_export_replaces_files_atomically(tmp_path: Path) -> None:
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    target = tmp_path / "c.onnx"
    target.write_bytes(b"an older, broken export")
    export_onnx(lrn.policy(), obs_space, act_space, target)
    export_onnx(lrn.policy(), obs_space, act_space, target)
    assert onnx.load(str(target)).graph.output[0].name == "action"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c.onnx.json"]  # no temp files left


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"fmt": "onnx-int4"}, "unsupported export format 'onnx-int4'"),
        ({"fmt": "tensorrt"}, "unsupported export format"),
        ({"name": "../escape"}, "plain file name"),
        ({"int8_mode": "sometimes"}, "INT8 mode"),
    ],
)
def test_bad_export_requests_are_one_clear_error(
    tmp_path: Path, kwargs: dict[str, Any], fragment: str
) -> None:
    lrn, obs_space, act_space, _ = learner("ppo_discrete")
    with pytest.raises(ExportError, match=fragment):
        export_learner(lrn, obs_space, act_space, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_spaces_and_policies_are_refused(tmp_path: Path) -> None:
    lrn, obs_space, _, _ = learner("ppo_discrete")
    with pytest.raises(ExportError, match="MultiDiscrete action space"):
        export_onnx(lrn.policy(), obs_space, gym.spaces.MultiDiscrete([2, 3]), tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="Tuple observation space"):
        export_onnx(lrn.policy(), gym.spaces.Tuple([obs_space]), gym.spaces.Discrete(2), tmp_path / "x.onnx")

    class TwoHeads(torch.nn.Module):
        def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return obs, obs

    with pytest.raises(ExportError, match="returns one tensor"):
        export_onnx(TwoHeads(), obs_space, gym.spaces.Discrete(2), tmp_path / "x.onnx")
