"""Forward and backward passes of the replay learners' MLPs, written out by hand.

DQN and SAC train small networks on small batches, where per-op cost weighs as much as
arithmetic: autograd records a graph and replays it op by op, while a 256-wide layer's product
takes only 160–350 µs in float32, depending on the CPU. These passes do the same arithmetic as
autograd (the tests compare the two) with fewer ops: they keep only what the backward pass needs
and write each gradient straight into its parameter's `.grad`.

They can also run the hidden-to-hidden products (every layer but the first and the last) in
bfloat16, which CPUs with AMX multiply about 4× faster and CPUs with AVX-512 BF16 about 2×.
Weights, biases, activations, gradients and optimizer state stay float32; only the product's
inputs are rounded, as in mixed-precision training. The first layer (raw inputs) and the output
layer (Q-values, action means) stay float32. With AMX the rounding happens inside oneDNN's kernel
(`onednn_products`); elsewhere the passes cast the operands themselves.

Float32 products of wide layers go through oneDNN instead of MKL on x86 CPUs that are not Intel's
but have AVX-512 (`onednn_float32_products`): MKL runs its AVX2 kernels there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Precision = Literal["auto", "float32", "bfloat16"]
ACTIVATIONS = (nn.ReLU, nn.Tanh)
# Smaller batches (acting on a few observations) multiply in float32: there the casts cost more
# than the faster product saves.
LOW_PRECISION_ROWS = 32
# A plain layer with at most this many outputs (or, for its weight gradient, inputs) multiplies in
# the transposed order, which the CPU's matrix library runs several times faster for such shapes.
NARROW = 16


def has_native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products are faster than float32 ones here: a CPU with AMX tiles (about
    4× for a 256-wide layer) or with AVX-512 BF16 dot products (about 2×)."""
    return has_amx(device) or _cpu_has(device, "_is_avx512_bf16_supported")


def _cpu_has(device: torch.device, probe: str) -> bool:
    """A `torch.cpu` feature probe for a CPU device (False on other devices or older torch)."""
    return device.type == "cpu" and bool(getattr(torch.cpu, probe, lambda: False)())


def matmul_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype of the hidden-to-hidden products for a `precision` setting ('auto': bfloat16
    where it is native, float32 elsewhere)."""
    if precision == "bfloat16" or (precision == "auto" and has_native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def has_amx(device: torch.device) -> bool:
    """Whether this is a CPU with AMX tiles, where oneDNN can round a float32 product's inputs to
    bfloat16 inside the kernel (`onednn_products`)."""
    return _cpu_has(device, "_is_amx_tile_supported")


# PyTorch's setting object for oneDNN's matmul precision (set at import, not in the stubs).
_ONEDNN_MATMUL = torch.backends.mkldnn.matmul  # type: ignore[attr-defined]


class onednn_products(AbstractContextManager[None]):  # lower case, like contextlib.nullcontext
    """Float32 products in this block (`mm`, `addmm`, `bmm`, `baddbmm`) run in oneDNN with its
    bfloat16 math mode, PyTorch's only route for float32 products into oneDNN. What that means
    depends on the CPU:
    - with AMX, oneDNN rounds the inputs to bfloat16 inside its kernel and accumulates in float32:
      the arithmetic of casting the inputs first, without the casts' passes over memory (on a
      2×256×256 ensemble layer, 190 µs against 340 µs for the casts and the bfloat16 product;
      docs/benchmarks.md), and the output stays float32 instead of being rounded too;
    - without AMX, oneDNN has no bfloat16 kernel for float32 inputs and multiplies in float32,
      with its own AVX-512 kernels (`onednn_float32_products` checks that it does).
    The setting is process-wide, so it is restored on exit. A class, not a generator: the passes
    enter it around every wide product, and a generator-based context costs several times more
    per entry."""

    __slots__ = ("_before",)

    def __enter__(self) -> None:
        self._before = _ONEDNN_MATMUL.fp32_precision
        _ONEDNN_MATMUL.fp32_precision = "bf16"

    def __exit__(self, *exc: object) -> None:
        _ONEDNN_MATMUL.fp32_precision = self._before


def onednn_float32_products(device: torch.device) -> bool:
    """Whether wide float32 products on `device` go through oneDNN (`onednn_products`) instead
    of PyTorch's default, MKL. MKL picks its kernels by CPU vendor and runs AVX2 ones on x86 CPUs
    that are not Intel's, where oneDNN runs AVX-512: on an AMD Zen 5, a 256×256 by 256×256 product
    takes 86–92 µs through oneDNN against 166–175 µs through MKL at two threads
    (docs/benchmarks.md). The decision is made by the CPU, not by timing, so runs on one machine always
    take the same route; it also needs the route to multiply in float32 (never on a CPU with AMX,
    where the same mode means bfloat16), which is checked once against float64."""
    if device.type != "cpu" or has_amx(device):
        return False
    return _onednn_float32_route()


@functools.cache
def _onednn_float32_route() -> bool:
    """The CPU check and the exactness check, once per process."""
    route = _avx512_outside_intel() and _onednn_float32_is_exact()
    if route:
        log.info("float32 products of wide layers run in oneDNN (MKL's kernels for this CPU are AVX2)")
    return route


def _avx512_outside_intel() -> bool:
    """An x86 CPU with AVX-512 whose vendor is not Intel (read from /proc/cpuinfo on Linux)."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return x86_vendor_is_not_intel(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def x86_vendor_is_not_intel(cpuinfo: str) -> bool:
    """Whether the `vendor_id` lines of a /proc/cpuinfo text name a vendor and none is Intel."""
    vendors = {line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("vendor_id")}
    return bool(vendors) and "GenuineIntel" not in vendors


def _onednn_float32_is_exact() -> bool:
    """Whether products in `onednn_products` match float64 to float32 accuracy here, on the
    shapes the passes use (plain, transposed and batched), and are not rounded to bfloat16."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 256, 256, generator=generator) for _ in range(2))
    products: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        lambda x, y: torch.mm(x[0], y[0].t()),
        lambda x, y: torch.mm(x[0].t(), y[0]),
        lambda x, y: torch.bmm(x, y),
        lambda x, y: torch.bmm(x.transpose(1, 2), y),
    ]
    with onednn_products():
        ours = [product(a, b) for product in products]
    for product, result in zip(products, ours, strict=True):
        exact = product(a.double(), b.double())
        # float32 accumulation over 256 terms stays near 1e-6 of the largest entry; inputs
        # rounded to bfloat16 (8 bits) would be off by about 1e-3.
        if float((result.double() - exact).abs().max()) > 1e-5 * float(exact.abs().max()):
            return False
    return True


@dataclass
class Tape:
    """What one forward pass keeps for its backward pass: each layer's input (and, for a
    reduced-precision layer, the rounded input and weight it multiplied)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    low: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def first_rows(self, rows: int) -> Tape:
        """The tape of the first `rows` rows of the batch alone (a forward pass over two batches
        at once, of which only the first is back-propagated)."""
        return Tape(
            [x[..., :rows, :] for x in self.inputs],
            {i: (x[..., :rows, :], w) for i, (x, w) in self.low.items()},
        )


class MlpPasses:
    """Hand-written passes of an `nn.Sequential` of linear layers with one activation (ReLU or
    tanh) between them. Layers are `nn.Linear` (weight (out, in)) or ensemble layers of E members
    (weight (E, in, out), bias (E, 1, out), inputs (E, B, in)), as `tether.algos.sac.TwinQ` uses.

    The passes hold detached aliases of the parameters (same storage), so optimizer steps, target
    updates and `load_state_dict`, which all write in place, take effect; build them after the
    module has moved to its device."""

    def __init__(self, net: nn.Sequential, dtype: torch.dtype = torch.float32) -> None:
        if not self.supports(net):
            raise ValueError("MlpPasses needs linear layers with ReLU or tanh between them")
        self.relu = not any(isinstance(m, nn.Tanh) for m in net)
        self.params: list[nn.Parameter] = [
            getattr(m, name) for m in list(net)[0::2] for name in ("weight", "bias")
        ]
        self.weights = [p.detach() for p in self.params[0::2]]
        self.biases = [p.detach() for p in self.params[1::2]]
        self.ensemble = self.weights[0].dim() == 3
        last = len(self.weights) - 1
        self.low = [dtype != torch.float32 and 0 < i < last for i in range(len(self.weights))]
        self.dtype = dtype
        device = self.weights[0].device
        # On AMX, bfloat16 layers multiply float32 tensors in oneDNN's bf16 mode (no casts).
        self.fused = dtype == torch.bfloat16 and has_amx(device)
        # Float32 layers with no narrow side multiply in oneDNN where MKL is slow (see above).
        wide = [min(w.shape[-2:]) > NARROW for w in self.weights]
        onednn = onednn_float32_products(device)
        self.onednn = [onednn and w and not low for w, low in zip(wide, self.low, strict=True)]
        self._numpy: list[tuple[np.ndarray, np.ndarray]] | None = None

    @staticmethod
    def supports(net: nn.Module) -> bool:
        """True for alternating linear / activation layers with one activation kind, ReLU or tanh."""
        if not isinstance(net, nn.Sequential) or len(net) % 2 != 1:
            return False
        acts = {type(m) for m in list(net)[1::2]}
        params = [(getattr(m, "weight", None), getattr(m, "bias", None)) for m in list(net)[0::2]]
        linear = all(
            isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.dim() in (2, 3)
            for w, b in params
        )
        return linear and len(acts) <= 1 and acts <= set(ACTIVATIONS)

    def allocate_grads(self) -> list[torch.Tensor]:
        """Give every parameter a `.grad` that `backward` overwrites (no zeroing needed), all views
        of one flat tensor so that a gradient norm is one op; returns `[that tensor]`."""
        sizes = [p.numel() for p in self.params]
        flat = torch.zeros(sum(sizes), dtype=self.params[0].dtype, device=self.params[0].device)
        for p, g in zip(self.params, flat.split(sizes), strict=True):
            p.grad = g.view_as(p)
        return [flat]

    # ------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """The network's output for `x`; with a `tape`, record what `backward` needs."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if tape is not None:
                tape.inputs.append(x)
            if self._is_low(i, x) and not self.fused:
                # Cast on every call: fused optimizer kernels write weights without bumping their
                # version counter, so a cached cast could not tell that it went stale.
                x_low, w_low = x.to(self.dtype), w.to(self.dtype)
                if tape is not None:
                    tape.low[i] = (x_low, w_low)
                product = torch.bmm(x_low, w_low) if self.ensemble else torch.mm(x_low, w_low.t())
                x = product.float().add_(b)
            else:
                with self._product_mode(i, x):
                    x = self._product(w, b, x)
            if i < last:
                x = x.relu_() if self.relu else x.tanh_()
        return x

    def forward_numpy(self, x: np.ndarray) -> np.ndarray:
        """The float32 forward pass in numpy, for acting on a few rows of a CPU network: numpy's
        per-op cost is a fraction of torch's, and acting is one small pass per env step. The
        weights are numpy views of the parameters, so every update shows at once."""
        if self._numpy is None:
            if self.ensemble or self.weights[0].device.type != "cpu":
                raise ValueError("forward_numpy is for plain linear layers on the CPU")
            self._numpy = [(w.numpy().T, b.numpy()) for w, b in zip(self.weights, self.biases, strict=True)]
        h = np.asarray(x, dtype=np.float32)
        last = len(self._numpy) - 1
        for i, (w_t, b) in enumerate(self._numpy):
            h = h @ w_t
            h += b
            if i < last:
                h = np.maximum(h, 0.0, out=h) if self.relu else np.tanh(h, out=h)
        return h

    # ------------------------------------------------------------------------ backward
    def backward(
        self, tape: Tape, grad_out: torch.Tensor, weights: bool = True, inputs: bool = False
    ) -> torch.Tensor | None:
        """Back-propagate `grad_out` (d loss / d output) through the taped pass. `weights`: write
        d loss / d parameter into each `.grad` (overwriting it); `inputs`: return d loss / d input.
        """
        grad = grad_out
        for i in range(len(self.weights) - 1, -1, -1):
            x = tape.inputs[i]
            if i in tape.low:
                (x_low, w_low), g_low = tape.low[i], grad.to(self.dtype)
                if weights:
                    self._weight_grad(x_low, g_low, self._grad(2 * i))
                    self._bias_grad(i, grad)
                grad = self._input_grad(w_low, g_low).float()
            else:
                with self._product_mode(i, x):
                    if weights:
                        self._weight_grad(x, grad, self._grad(2 * i))
                        self._bias_grad(i, grad)
                    if i == 0 and not inputs:
                        return None
                    grad = self._input_grad(self.weights[i], grad)
            if i > 0:  # through the activation that produced this layer's input
                grad = torch.ops.aten.threshold_backward(grad, x, 0) if self.relu else grad.mul_(1.0 - x * x)
        return grad

    def _is_low(self, i: int, x: torch.Tensor) -> bool:
        """Whether layer `i` multiplies input `x` (a batch, not a few rows) in reduced precision."""
        return self.low[i] and x.shape[-2] >= LOW_PRECISION_ROWS

    def _product_mode(self, i: int, x: torch.Tensor) -> AbstractContextManager[None]:
        """Where layer `i`'s float32 products on `x` run: in oneDNN for a reduced-precision layer
        on the fused route and for a wide float32 layer where oneDNN is the faster float32 route;
        in PyTorch's default otherwise (also for a few rows, where oneDNN's per-call cost shows)."""
        batch = x.shape[-2] >= LOW_PRECISION_ROWS
        if batch and (self.onednn[i] or (self.fused and self.low[i])):
            return onednn_products()
        return nullcontext()

    # The products (of float32 operands, or of a reduced-precision layer's rounded ones). A narrow
    # side (at most NARROW units: a Q-head, an action head, a network's few inputs) can send the
    # matrix library down slow paths, up to 10× slower than the other order ((W xᵀ)ᵀ for x Wᵀ).
    # Each case takes the order measured fastest for its shape (docs/benchmarks.md); a product
    # over a single unit is a broadcast multiply.
    def _product(self, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b (plain) or x W + b per member (ensemble)."""
        if self.ensemble:
            if w.shape[2] <= NARROW:
                return torch.baddbmm(b.transpose(1, 2), w.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2)
            return torch.baddbmm(b, x, w)
        if w.shape[0] <= NARROW:
            return torch.addmm(b.unsqueeze(1), w, x.t()).t()
        return torch.addmm(b, x, w.t())

    def _weight_grad(self, x: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
        """d loss / d W into `out` (float32 whatever the product's dtype): xᵀ grad per member
        (ensemble), gradᵀ x (plain)."""
        if self.ensemble:
            if grad.shape[2] <= NARROW:
                out.copy_(torch.bmm(grad.transpose(1, 2), x).transpose(1, 2))
            elif grad.dtype == out.dtype:
                torch.bmm(x.transpose(1, 2), grad, out=out)
            else:
                out.copy_(torch.bmm(x.transpose(1, 2), grad))
        elif x.shape[1] <= NARROW:
            out.copy_(torch.mm(x.t(), grad).t())
        elif grad.dtype == out.dtype:
            torch.mm(grad.t(), x, out=out)
        else:
            out.copy_(torch.mm(grad.t(), x))

    def _input_grad(self, w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """d loss / d x: grad Wᵀ per member (ensemble), grad W (plain)."""
        if not self.ensemble:
            return torch.mm(grad, w)
        if w.shape[2] == 1:
            return grad * w.transpose(1, 2)
        return torch.bmm(grad, w.transpose(1, 2))

    def _grad(self, index: int) -> torch.Tensor:
        """The `.grad` of parameter `index`, which `backward` overwrites."""
        grad = self.params[index].grad
        if grad is None:
            raise RuntimeError("MlpPasses.backward writes parameter gradients: call allocate_grads() first")
        return grad

    def _bias_grad(self, i: int, grad: torch.Tensor) -> None:
        out = self._grad(2 * i + 1)
        if self.ensemble:
            torch.sum(grad, 1, keepdim=True, out=out)
        else:
            torch.sum(grad, 0, out=out)
