"""Weight-only quantization of the decoder's linear layers: int8, int4 and GPTQ int4.

- int8: symmetric absmax per output channel (row), scale = max|w_row| / 127, codes in [-127, 127].
- int4: asymmetric per group of `group_size` consecutive input columns of a row, with an integer zero
  point, as GPTQ's reference quantizer (`sym=False`): the group's range [min, max], widened to hold 0,
  is split in 15 steps, scale = (max - min) / 15, zero = round(-min / scale) in [0, 15], code =
  clamp(round(w / scale) + zero, 0, 15), w ~ scale (code - zero). Codes are packed two per byte.
  Asymmetric uses all 16 levels on groups that are not centred on 0; holding 0 in the range keeps
  the zero point a 4-bit integer and 0 exactly representable.
- gptq-int4: the same int4 format, with codes chosen by GPTQ (Frantar et al. 2023, arXiv 2210.17323,
  Alg. 1): columns are quantized left to right and each one's error is spread over the columns
  not yet quantized, weighted by the inverse Hessian of the layer's reconstruction error
  ||X W^T - X Q^T||^2, H = 2 X^T X over calibration inputs X.

int8 and int4 round to nearest: every weight is within half a step of its float value. Scales are
stored in the weight's dtype (4 bytes for float32, 2 for bf16) and rounded up where that dtype would
round them down, so that no weight falls outside the grid and the half-step bound holds in any
dtype; zero points are uint8. The quantized model follows `.to(dtype)` as a float one does.
Only the `nn.Linear` layers inside the transformer blocks are replaced: the token embedding and
the LM head stay float (they are one tied matrix in most configs, and quantizing the head
separately would store a second copy), as do a mixture of experts' batched expert weights
(parameters, not `nn.Linear`; its router is an `nn.Linear` and is quantized).

`QuantizedLinear.forward` dequantizes the whole weight to the input's dtype and calls `F.linear`:
a reference path that saves memory at rest, not time (no int kernels; see `torchao_quantize`).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modules.nn.decoder import Decoder

SCHEMES = ("int8", "int4", "gptq-int4")
TORCHAO_SCHEMES = ("torchao-int8", "torchao-int4")  # `torchao_quantize`, on CUDA


def storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale (in a float32 or float64 computation) as `dtype` will store it, rounded up where `dtype`
    would round it down, returned in scale's dtype: a grid of the stored step still covers the range."""
    stored = scale.to(dtype)
    below = stored.to(scale.dtype) < scale
    stored = torch.where(below, torch.nextafter(stored, torch.full_like(stored, torch.inf)), stored)
    return stored.to(scale.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per output channel of w (out, in): codes (out, in) int8 and scales (out, 1)
    in w's dtype, with w ~ codes * scales. An all-zero row gets scale 1 (its codes are all 0)."""
    x = w.to(_compute_dtype(w.dtype))
    scale = x.abs().amax(dim=1, keepdim=True) / 127  # (out, 1)
    scale = storable(torch.where(scale == 0, torch.ones_like(scale), scale), w.dtype)
    codes = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    return codes, scale.to(w.dtype)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w (out, in) in `dtype` from int8 codes (out, in) and scales (out, 1), computed in float32
    (in float64 for float64 scales)."""
    compute = _compute_dtype(scale.dtype)
    return (codes.to(compute) * scale.to(compute)).to(dtype)


def int4_params(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 scale (`storable` in `dtype`) and integer zero point (...,), in w's dtype, for
    each group w (..., group_size) (module doc). An all-zero group gets scale 1 and zero 0."""
    low = w.amin(dim=-1).clamp(max=0)
    high = w.amax(dim=-1).clamp(min=0)
    scale = (high - low) / 15
    scale = storable(torch.where(scale == 0, torch.ones_like(scale), scale), dtype)
    zero = torch.round(-low / scale)  # in [0, 15] because low <= 0 <= high and scale >= (high - low) / 15
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] (as w's float dtype) for w (...) with scale and zero broadcastable to it."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 15)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 of w (out, in), round to nearest: codes (out, in) uint8 in [0, 15],
    scales (out, in / group_size) in w's dtype and zero points (out, in / group_size) uint8."""
    out, n = w.shape
    groups = w.to(_compute_dtype(w.dtype)).view(out, n // group_size, group_size)  # (out, G, g)
    scale, zero = int4_params(groups, w.dtype)  # (out, G) each
    codes = int4_codes(groups, scale[..., None], zero[..., None]).view(out, n)
    return codes.to(torch.uint8), scale.to(w.dtype), zero.to(torch.uint8)


def dequantize_int4(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w (out, in) in `dtype` from codes (out, in) in [0, 15], scales and zero points (out, G), computed
    as `dequantize_int8`."""
    out, n = codes.shape
    compute = _compute_dtype(scale.dtype)
    groups = codes.to(compute).view(out, scale.shape[1], -1)  # (out, G, g)
    return ((groups - zero.to(compute)[..., None]) * scale.to(compute)[..., None]).view(out, n).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: codes (..., n) uint8 in [0, 15], n even -> (..., n / 2) uint8,
    column 2j in the low nibble of byte j and column 2j + 1 in the high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing pairs columns: the last dimension must be even, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8 or bool((codes > 15).any()):
        raise ValueError(f"int4 codes must be uint8 values in [0, 15]; got {codes.dtype} values up to "
                         f"{codes.max().item()}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: packed (..., m) uint8 -> codes (..., 2m) uint8 in [0, 15]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    block_size: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ int4 codes for weight (out, in) under the layer Hessian (in, in) = 2 X^T X (any positive
    multiple gives the same result): codes (out, in) uint8, scales (out, G) and zero points (out, G)
    uint8, in the format of `quantize_int4` (scales in the weight's dtype; the work in float32, or
    float64 for a float64 weight).

    Frantar et al. 2023, Alg. 1: H is dampened by `percdamp` of its mean diagonal, and the rows of
    the upper Cholesky factor U of H^-1 hold the OBS update of each step: quantizing column i moves
    the columns j > i by -(w_i - q_i) U[i, j] / U[i, i]. Updates inside a block of columns are applied
    at once; the rest of the matrix gets the block's errors in one matmul at the block's end (lazy
    batch updates, Sec. 3 Step 2). A group's scale and zero point come from its columns as they are
    when its first column is reached (after the earlier columns' updates), as the reference does
    with `groupsize`; blocks are rounded up to whole groups so that a group never straddles two.
    Inputs that are always zero (diag(H) = 0) are dead columns: they quantize to 0.
    """
    dtype = _compute_dtype(weight.dtype)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(dtype).clone()
    out, n = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U

    codes = torch.zeros(out, n, dtype=dtype, device=W.device)
    scales = torch.zeros(out, n // group_size, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    block = -(-block_size // group_size) * group_size
    for start in range(0, n, block):
        end = min(start + block, n)
        W1, U1 = W[:, start:end].clone(), U[start:end, start:end]
        errors = torch.zeros_like(W1)  # (out, end - start): (w - q) / U[i, i] per column
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                scales[:, g], zeros[:, g] = int4_params(W1[:, i : i + group_size], weight.dtype)
            scale, zero = scales[:, column // group_size], zeros[:, column // group_size]
            codes[:, column] = int4_codes(W1[:, i], scale, zero)
            q = scale * (codes[:, column] - zero)
            errors[:, i] = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= errors[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, end:] -= errors @ U[start:end, end:]
    return codes.to(torch.uint8), scales.to(weight.dtype), zeros.to(torch.uint8)


class QuantizedLinear(nn.Module):
    """A linear layer y = x W^T + b whose W is stored as int8 (per-row scales) or packed int4
    (per-group scales and zero points); all of it, bias included, in buffers (inference only).

    Build one with `QuantizedLinear.int8(linear)` or `QuantizedLinear.int4(linear, group_size,
    hessian)` (a Hessian: GPTQ; none: round to nearest).
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
        in_features: int,
    ) -> None:
        super().__init__()
        self.bits = 8 if zeros is None else 4
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.register_buffer("qweight", qweight)  # int8 (out, in), or uint8 (out, in / 2): two codes a byte
        self.register_buffer("scales", scales)  # (out, 1) for int8, (out, G) for int4; the model's float dtype
        self.register_buffer("zeros", zeros)  # uint8 (out, G) for int4
        self.register_buffer("bias", bias)

    @classmethod
    def int8(cls, linear: nn.Linear) -> QuantizedLinear:
        codes, scales = quantize_int8(linear.weight.detach())
        return cls(codes, scales, None, _bias(linear), linear.in_features)

    @classmethod
    def int4(cls, linear: nn.Linear, group_size: int = 128, hessian: torch.Tensor | None = None) -> QuantizedLinear:
        w = linear.weight.detach()
        codes, scales, zeros = quantize_int4(w, group_size) if hessian is None else gptq(w, hessian, group_size)
        return cls(pack_int4(codes), scales, zeros, _bias(linear), linear.in_features)

    @property
    def group_size(self) -> int:
        return self.in_features if self.bits == 8 else self.in_features // self.scales.shape[1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) in `dtype`."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the scales' dtype (the model's), for code that reads `linear.weight`
        (MLA's key/value up-projection)."""
        return self.dequantize(self.scales.dtype)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weight: integer codes, scales and zero points (not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out), through the weight dequantized to x's dtype."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


def quantize(
    decoder: Decoder,
    scheme: str,
    calibration: torch.Tensor | None = None,
    group_size: int = 128,
    batch_size: int = 8,
) -> Decoder:
    """A deep copy of `decoder` with every `nn.Linear` in its blocks a `QuantizedLinear` of `scheme`:
    "int8", "int4" (round to nearest, groups of `group_size` input columns) or "gptq-int4".

    calibration: token ids (N, T), T <= block_size, run through the model `batch_size` rows at a time;
    required by gptq-int4, unused by the others. GPTQ runs sequentially over blocks, as the reference's
    model scripts do: block i's Hessians come from its inputs as computed by the already quantized
    blocks 0..i-1 (so each block corrects the error of those before it), its layers are quantized,
    and the quantized block computes the inputs of block i + 1. Within a block all layers see the
    float block's activations. A linear whose weight is read rather than called (MLA's `kv_up`)
    sees no inputs and is rounded to nearest. The copy keeps `decoder`'s train/eval mode.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    linears = {f"blocks.{name}": m for name, m in decoder.blocks.named_modules() if isinstance(m, nn.Linear)}
    if scheme != "int8":
        _check_groups(linears, group_size)
    if scheme == "gptq-int4":
        _check_calibration(calibration, decoder)
    quantized = copy.deepcopy(decoder)
    if scheme == "int8":
        _replace_linears(quantized.blocks, lambda name, linear: QuantizedLinear.int8(linear))
    elif scheme == "int4":
        _replace_linears(quantized.blocks, lambda name, linear: QuantizedLinear.int4(linear, group_size))
    else:
        training = quantized.training
        quantized.eval()
        _gptq_blocks(quantized, calibration.to(next(quantized.parameters()).device), group_size, batch_size)
        quantized.train(training)
    return quantized


def weight_bytes(decoder: nn.Module) -> int:
    """Bytes of the weights the model stores: its parameters (a tied matrix once) and every
    `QuantizedLinear`'s buffers (codes, scales, zero points, bias). Other buffers (RoPE tables,
    MoE load counters) are derived state, not weights."""
    params = sum(p.numel() * p.element_size() for p in decoder.parameters())
    buffers = sum(
        b.numel() * b.element_size()
        for m in decoder.modules() if isinstance(m, QuantizedLinear)
        for b in m.buffers(recurse=False)
    )
    return params + buffers


def _check_groups(linears: dict[str, nn.Linear], group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be a positive integer; got {group_size}")
    if not linears:
        return
    common = math.gcd(*(m.in_features for m in linears.values()))
    fit = next(d for d in range(min(group_size, common), 0, -1) if common % d == 0)
    for name, linear in linears.items():
        if linear.in_features % group_size:
            raise ValueError(
                f"int4 groups of {group_size} input columns must divide each layer's in_features, but {name} has "
                f"in_features={linear.in_features}: pass a group_size that divides every quantized layer's "
                f"in_features (here {fit} is the largest such size up to {group_size})"
            )


def _check_calibration(calibration: torch.Tensor | None, decoder: Decoder) -> None:
    if calibration is None:
        raise ValueError("gptq-int4 needs calibration token ids (N, T): pass calibration=... (e.g. a few hundred "
                         "sequences from the training distribution); int8 and int4 need none")
    if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration must be integer token ids of shape (N, T); got {calibration.dtype} "
                         f"of shape {tuple(calibration.shape)}")
    if calibration.shape[1] > decoder.config.block_size:
        raise ValueError(f"calibration sequences of {calibration.shape[1]} tokens exceed the model's block_size "
                         f"{decoder.config.block_size}")


def _replace_linears(root: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Swap each `nn.Linear` under root (name relative to root) for make(name, linear)."""
    for name, module in list(root.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent), child, make(name, module))


class _Hessian:
    """A forward pre-hook accumulating H = 2 X^T X / rows over a linear's inputs X (rows, in), in float32."""

    def __init__(self, linear: nn.Linear) -> None:
        self.sum = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, self.sum.shape[0]).float()  # (rows, in)
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor | None:
        return 2 * self.sum / self.rows if self.rows else None


class _BlockInput(Exception):
    """Raised by the hook that catches the first block's input, ending that forward pass there."""


@torch.no_grad()
def _gptq_blocks(decoder: Decoder, calibration: torch.Tensor, group_size: int, batch_size: int) -> None:
    inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (x (b, T, C), rope) per calibration batch

    def catch(module: nn.Module, args: tuple) -> None:
        inputs.append((args[0], args[1]))
        raise _BlockInput

    handle = decoder.blocks[0].register_forward_pre_hook(catch)
    try:
        for batch in calibration.split(batch_size):
            try:
                decoder.hidden(batch)
            except _BlockInput:
                pass
    finally:
        handle.remove()

    for block in decoder.blocks:
        hessians = {name: _Hessian(m) for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        handles = [block.get_submodule(name).register_forward_pre_hook(h) for name, h in hessians.items()]
        try:
            for x, rope in inputs:
                block(x, rope)
        finally:
            for handle in handles:
                handle.remove()
        _replace_linears(block, lambda name, linear: QuantizedLinear.int4(linear, group_size, hessians[name].value()))
        inputs = [(block(x, rope), rope) for x, rope in inputs]


def torchao_quantize(decoder: Decoder, scheme: str, group_size: int = 128) -> Decoder:
    """A deep copy of `decoder` with its blocks' linears quantized by torchao's weight-only int8
    (scheme "int8", per channel) or int4 (scheme "int4", `group_size`, tinygemm kernels: bf16 only),
    for speed on CUDA. Needs torchao (not a dependency of this project) and a CUDA model; the
    embedding and head stay float as in `quantize`. `weight_bytes` does not see inside torchao's
    tensor subclasses."""
    if scheme not in ("int8", "int4"):
        raise ValueError(f"torchao_quantize supports schemes int8 and int4; got {scheme!r}")
    try:
        import torchao.quantization as tq  # optional: torchao is no dependency of the suite
    except ImportError as error:
        raise ImportError("torchao_quantize needs torchao, which is not installed: pip install torchao "
                          "(or use quantize(), the pure-PyTorch reference)") from error
    weight = next(decoder.parameters())
    if weight.device.type != "cuda":
        raise ValueError(f"torchao's weight-only kernels run on CUDA; this model is on {weight.device}: "
                         "move it with .cuda()")
    if scheme == "int4" and weight.dtype != torch.bfloat16:
        raise ValueError(f"torchao's int4 weight-only kernels take bfloat16; this model is {weight.dtype}: "
                         "convert it with .to(torch.bfloat16)")
    if scheme == "int8":
        config = tq.Int8WeightOnlyConfig() if hasattr(tq, "Int8WeightOnlyConfig") else tq.int8_weight_only()
    else:
        config = (tq.Int4WeightOnlyConfig(group_size=group_size) if hasattr(tq, "Int4WeightOnlyConfig")
                  else tq.int4_weight_only(group_size=group_size))
    quantized = copy.deepcopy(decoder)
    tq.quantize_(quantized.blocks, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear))
    return quantized
