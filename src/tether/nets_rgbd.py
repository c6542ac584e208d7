"""The rover's RGB-D actor-critic: two convolutional branches fused into one encoder, a proprio MLP,
a tanh policy head and a value head on the shared features.

Inputs are a dict `{"rgb": (B, 3, H, W) uint8 (or float already in [0, 1]), "depth": (B, 1, H, W)
float32 in [0, 1] (metres / max_depth), "proprio": (B, 6) float32 raw}`. The codec brings depth to
the RGB size before it reaches the network (`tether.ingest.rover_codec.to_network_input`); should
the two feature maps still differ (a caller feeding other sizes), the depth features are resized to
the RGB features with nearest-neighbour interpolation before fusion.

Parameter count with the layer list of the rover design (shared encoder, padding k//2): 355,013
(encoder 288,896 incl. proprio MLP 4,608; policy head 33,090; value head 33,025; log-std 2). The
design's "about 560K" is its own estimate; the layers it lists give this number.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from tether.nets import ActorCritic, Obs

# Proprio arrives raw (m/s, rad/s, rad, rad, m/s², m); these fixed scales bring each to about unit
# range: 0.5 m/s top speed, 1 rad/s, ±0.5 rad tilt, g, 10 m range. Stored as a buffer, so they
# travel with the checkpoint and the ONNX export.
DEFAULT_PROPRIO_SCALE = (2.0, 1.0, 2.0, 2.0, 1.0 / 9.81, 0.1)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, k, stride=2, padding=k // 2)
    nn.init.orthogonal_(conv.weight, math.sqrt(2))
    nn.init.zeros_(cast(torch.Tensor, conv.bias))
    return conv


def _linear(cin: int, cout: int, gain: float = math.sqrt(2)) -> nn.Linear:
    lin = nn.Linear(cin, cout)
    nn.init.orthogonal_(lin.weight, gain)
    nn.init.zeros_(lin.bias)
    return lin


def rgbd_observation_space(image_size: tuple[int, int], proprio_dim: int = 6) -> gym.spaces.Dict:
    """The network's input space for `image_size` (w, h)."""
    w, h = image_size
    return gym.spaces.Dict(
        {
            "rgb": gym.spaces.Box(0, 255, (3, h, w), np.uint8),
            "depth": gym.spaces.Box(0.0, 1.0, (1, h, w), np.float32),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (proprio_dim,), np.float32),
        }
    )


class RgbdActorCritic(ActorCritic):
    """Gaussian policy (tanh mean, state-independent log-std) and value on a shared RGB-D encoder."""

    proprio_scale: torch.Tensor

    def __init__(
        self,
        proprio_dim: int = 6,
        action_dim: int = 2,
        log_std_init: float = -0.5,
        proprio_scale: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.rgb_branch = nn.Sequential(_conv(3, 32, 5), nn.ReLU(), _conv(32, 64, 3), nn.ReLU())
        self.depth_branch = nn.Sequential(_conv(1, 16, 5), nn.ReLU(), _conv(16, 32, 3), nn.ReLU())
        self.fusion = nn.Sequential(
            _conv(96, 128, 3), nn.ReLU(), _conv(128, 128, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.proprio_mlp = nn.Sequential(_linear(proprio_dim, 64), nn.ReLU(), _linear(64, 64), nn.ReLU())
        self.policy_head = nn.Sequential(
            _linear(192, 128),
            nn.ReLU(),
            _linear(128, 64),
            nn.ReLU(),
            _linear(64, action_dim, gain=0.01),
            nn.Tanh(),
        )
        self.value_head = nn.Sequential(
            _linear(192, 128), nn.ReLU(), _linear(128, 64), nn.ReLU(), _linear(64, 1, gain=1.0)
        )
        self.log_std = nn.Parameter(torch.full((action_dim,), float(log_std_init)))
        scale = proprio_scale if proprio_scale is not None else DEFAULT_PROPRIO_SCALE[:proprio_dim]
        if len(scale) != proprio_dim:
            raise ValueError(f"proprio_scale needs {proprio_dim} values, got {len(scale)}")
        self.register_buffer("proprio_scale", torch.tensor(list(scale), dtype=torch.float32))
        self._feature_cache: tuple[Any, int, bool, torch.Tensor] | None = None
        # channels-last convolutions are about 20% faster on CPU (oneDNN) and suit GPU tensor cores.
        self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # accepted, not in the stubs

    def features(self, obs: Obs) -> torch.Tensor:
        """The shared 192-wide feature: 128 from the fused image encoder, 64 from proprio."""
        if not isinstance(obs, dict):
            raise TypeError("RgbdActorCritic takes a dict of rgb, depth and proprio tensors")
        rgb = obs["rgb"]
        rgb = rgb.float() * (1.0 / 255.0) if rgb.dtype == torch.uint8 else rgb.float()
        r = self.rgb_branch(rgb.contiguous(memory_format=torch.channels_last))
        d = self.depth_branch(obs["depth"].float().contiguous(memory_format=torch.channels_last))
        if d.shape[-2:] != r.shape[-2:]:
            d = F.interpolate(d, size=r.shape[-2:], mode="nearest")
        vision = self.fusion(torch.cat([r, d], dim=1))
        proprio = self.proprio_mlp(obs["proprio"].float() * self.proprio_scale)
        return torch.cat([vision, proprio], dim=1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_feature_cache"] = None  # never copy or pickle a live autograd graph
        return state

    # The heads and the distribution run in float32 even under autocast: they cost little, and
    # log-probabilities in bf16 would make PPO's probability ratios noisy. The convolutions, where
    # the FLOPs are, keep the autocast dtype.
    def _mean(self, feat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=feat.device.type, enabled=False):
            return self.policy_head(feat.float())

    def _value(self, feat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=feat.device.type, enabled=False):
            return self.value_head(feat.float()).squeeze(-1)

    def _dist(self, mean: torch.Tensor) -> Distribution:
        return Independent(Normal(mean, self.log_std.exp().expand_as(mean)), 1)

    def _shared_features(self, obs: Obs) -> torch.Tensor:
        """PPO asks `distribution(obs)` then `value(obs)` for the same minibatch; the second call
        reuses the first one's encoder pass when it gets the very same dict and no parameter has
        changed in between (same gradient, half the convolution work)."""
        cache = self._feature_cache
        self._feature_cache = None
        if (
            cache is not None
            and cache[0] is obs
            and cache[1] == self._param_version()
            and cache[2] == torch.is_grad_enabled()
        ):
            return cache[3]
        return self.features(obs)

    def _param_version(self) -> int:
        return self.log_std._version + self.value_head[0].weight._version + self.rgb_branch[0].weight._version

    def distribution(self, obs: Obs) -> Distribution:
        feat = self.features(obs)
        self._feature_cache = (obs, self._param_version(), torch.is_grad_enabled(), feat)
        return self._dist(self._mean(feat))

    def value(self, obs: Obs) -> torch.Tensor:
        return self._value(self._shared_features(obs))

    def distribution_and_value(self, obs: Obs) -> tuple[Distribution, torch.Tensor]:
        """Both from one encoder pass."""
        feat = self.features(obs)
        return self._dist(self._mean(feat)), self._value(feat)

    def forward(self, obs: Obs) -> torch.Tensor:
        return self._mean(self.features(obs))


class RgbdExportPolicy(nn.Module):
    """Positional (rgb, depth, proprio) → deterministic action in [-1, 1], for ONNX/RKNN export."""

    def __init__(self, net: RgbdActorCritic) -> None:
        super().__init__()
        self.net = net

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        action = self.net({"rgb": rgb, "depth": depth, "proprio": proprio})
        return torch.clamp(action, -1.0, 1.0)


class RgbdDeterministicPolicy(nn.Module):
    """Dict observation → deterministic action in [-1, 1] (what `tether.export.onnx` exports)."""

    def __init__(self, net: RgbdActorCritic) -> None:
        super().__init__()
        self.net = net

    def forward(self, obs: Obs) -> torch.Tensor:
        return torch.clamp(self.net(obs), -1.0, 1.0)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


ONNX_INPUTS = ("rgb", "depth", "proprio")
ONNX_METADATA_KEY = "tether.rover"


def export_rgbd_onnx(net: RgbdActorCritic, image_size: tuple[int, int], metadata: dict[str, Any]) -> bytes:
    """The deterministic policy as one self-contained ONNX file (bytes): inputs `rgb` uint8
    (B, 3, h, w), `depth` float32 (B, 1, h, w) in [0, 1], `proprio` float32 (B, 6); output `action`
    (B, 2) in [-1, 1]. `metadata` (image size, depth scale, log-std, ...) is stored as the model's
    `tether.rover` metadata property, where `RoverPolicy` reads it."""
    import copy

    import onnx

    w, h = image_size
    module = RgbdExportPolicy(copy.deepcopy(net).float().cpu()).eval()
    args = (
        torch.zeros(1, 3, h, w, dtype=torch.uint8),
        torch.zeros(1, 1, h, w, dtype=torch.float32),
        torch.zeros(1, module.net.proprio_scale.shape[0], dtype=torch.float32),
    )
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter takes about a second for this network, the torch.export one
            # over ten: the server exports after every update, so the fast one comes first.
            torch.onnx.export(
                module,
                args,
                buf,  # type: ignore[arg-type]  # a file object is accepted, not in the stubs
                input_names=list(ONNX_INPUTS),
                output_names=["action"],
                dynamic_axes={**{k: {0: "batch"} for k in ONNX_INPUTS}, "action": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception:  # a torch without the TorchScript exporter
            buf = io.BytesIO()
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(
                module,
                args,
                input_names=list(ONNX_INPUTS),
                output_names=["action"],
                dynamic_shapes={k: {0: batch} for k in ONNX_INPUTS},
                dynamo=True,
                external_data=False,
            )
            assert program is not None
            program.save(buf)  # type: ignore[arg-type]
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key = ONNX_METADATA_KEY
    entry.value = json.dumps(metadata)
    return model.SerializeToString()
