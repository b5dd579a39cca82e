"""Weight-only quantization: rounding within half a step, lossless int4 packing, GPTQ equal to a
slow OBQ reference and better than rounding to nearest, and quantized decoders that still score
and generate like the float one at a quarter or an eighth of the linear layers' bytes."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.decoding.generation import generate
from modules.nn import Decoder, DecoderConfig
from modules.nn.quant import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    gptq,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    torchao_quantize,
    unpack_int4,
    weight_bytes,
)


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(vocab_size=67, block_size=32, n_layer=2, n_head=4, n_embd=128, pad_vocab_to=16)


def tiny_decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int8_error_is_at_most_half_a_step(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-4, 1, 16)[:, None]  # rows of very different ranges
    w[3] = 0  # an all-zero row
    w[5, 7] = 50.0  # an outlier sets its row's step
    w = w.to(dtype)
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    assert scale.shape == (16, 1) and scale.dtype == dtype  # bf16 scales: rounded up, the bound still holds
    err = (w.double() - codes.double() * scale.double()).abs()
    assert (err <= scale.double() / 2 * (1 + 1e-6)).all()
    assert (dequantize_int8(codes, scale)[3] == 0).all()
    # each row's absmax uses the full range (a bf16 scale rounded up by up to 2^-8 may leave it at 126)
    assert (codes.abs().amax(dim=1)[torch.arange(16) != 3] >= (127 if dtype == torch.float32 else 126)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int4_error_is_at_most_half_a_step_of_its_group(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    w[0, :64] = 0  # an all-zero group
    w[1, 64:128] = w[1, 64:128].abs() + 3  # all positive, far from 0
    w[2, 128:192] = -w[2, 128:192].abs()  # all negative
    w = w.to(dtype)
    codes, scale, zero = quantize_int4(w, group_size=64)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == zero.shape == (8, 4)
    assert scale.dtype == dtype
    step = scale.double().repeat_interleave(64, dim=1)  # (8, 256)
    deq = (codes.double() - zero.double().repeat_interleave(64, dim=1)) * step
    assert ((w.double() - deq).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (dequantize_int4(codes, scale, zero)[0, :64] == 0).all()
    torch.testing.assert_close(dequantize_int4(codes, scale, zero, torch.float64), deq)


def test_int4_packing_round_trips_every_pair_of_values() -> None:
    pairs = torch.cartesian_prod(torch.arange(16), torch.arange(16)).to(torch.uint8)  # (256, 2): every (low, high)
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1)
    assert sorted(packed.flatten().tolist()) == list(range(256))  # a bijection onto the bytes
    assert torch.equal(unpack_int4(packed), pairs)
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_quantized_linear_is_the_dequantized_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    x = torch.randn(2, 5, 64)
    for layer in (QuantizedLinear.int8(linear), QuantizedLinear.int4(linear, group_size=32)):
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, linear.bias))
        assert (layer.weight - linear.weight).abs().max() < 0.1 * linear.weight.abs().max()
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        assert not list(layer.parameters())  # everything is a buffer: nothing to train
        assert layer.to(torch.bfloat16).weight.dtype == torch.bfloat16  # follows the model's dtype
    assert QuantizedLinear.int4(linear, group_size=32).qweight.shape == (24, 32)  # two codes a byte


def int4_reference(column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The asymmetric int4 grid of one group (out, g): (scale, zero), each (out, 1), min/max widened to hold 0."""
    low, high = column.min(dim=1, keepdim=True).values.clamp(max=0), column.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (high - low) / 15
    return scale, torch.round(-low / scale)


def obq_reference(W: torch.Tensor, H: torch.Tensor, group_size: int, percdamp: float) -> torch.Tensor:
    """GPTQ's result the slow way (OBQ in a fixed column order, Frantar et al. Sec. 3): quantize column i,
    then move every column j >= i by -(w_i - q_i) [H_F^-1]_ij / [H_F^-1]_ii, where H_F^-1 is the inverse
    of the dampened Hessian over the columns F = {i, ..., n-1} not yet quantized, inverted afresh."""
    W, n = W.clone(), W.shape[1]
    H = H + percdamp * H.diag().mean() * torch.eye(n, dtype=H.dtype)
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % group_size == 0:
            scale, zero = int4_reference(W[:, i : i + group_size])
        Q[:, i : i + 1] = scale * (torch.clamp(torch.round(W[:, i : i + 1] / scale) + zero, 0, 15) - zero)
        Hinv = torch.linalg.inv(H[i:, i:])
        W[:, i:] -= (W[:, i : i + 1] - Q[:, i : i + 1]) / Hinv[0, 0] * Hinv[0:1, :]
    return Q


@pytest.mark.parametrize("group_size, block_size", [(4, 8), (8, 4), (16, 16)])
def test_gptq_equals_the_column_by_column_obq_reference(group_size: int, block_size: int) -> None:
    torch.manual_seed(0)
    W = torch.randn(6, 16, dtype=torch.float64)
    X = torch.randn(64, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)  # correlated inputs
    H = 2 * X.T @ X
    codes, scale, zero = gptq(W, H, group_size, block_size, percdamp=0.01)
    expected = obq_reference(W, H, group_size, percdamp=0.01)
    torch.testing.assert_close(dequantize_int4(codes, scale, zero, torch.float64), expected, rtol=0, atol=1e-10)


def test_gptq_reconstructs_correlated_inputs_better_than_rounding() -> None:
    torch.manual_seed(0)
    mixing = torch.randn(8, 128)  # inputs live near an 8-dimensional subspace of 128
    X = torch.randn(512, 8) @ mixing + 0.01 * torch.randn(512, 128)
    W = torch.randn(48, 128)
    H = 2 * X.T @ X / len(X)

    def output_error(Q: torch.Tensor) -> float:
        return float((X @ W.T - X @ Q.T).norm())

    rtn = output_error(dequantize_int4(*quantize_int4(W, group_size=32)))
    optimal = output_error(dequantize_int4(*gptq(W, H, group_size=32)))
    assert optimal < 0.5 * rtn


def test_gptq_turns_dead_inputs_into_zero_columns() -> None:
    torch.manual_seed(0)
    X = torch.randn(64, 32)
    X[:, 5] = 0  # an input that is never active
    codes, scale, zero = gptq(torch.randn(4, 32), 2 * X.T @ X, group_size=16)
    Q = dequantize_int4(codes, scale, zero)
    assert torch.isfinite(Q).all() and (Q[:, 5] == 0).all()


STRIDE = 3  # the tiny decoder learns sequences that count up in steps of 3, modulo the vocabulary


def counting(n: int, length: int, seed: int) -> torch.Tensor:
    """n sequences (n, length) of t_{i+1} = t_i + STRIDE mod 67, from random starts."""
    start = torch.randint(0, 67, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + STRIDE * torch.arange(length)) % 67


@pytest.fixture(scope="module")
def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration (16, 16), held-out (8, 17)) counting sequences."""
    return counting(16, 16, seed=1), counting(8, 17, seed=2)


@pytest.fixture(scope="module")
def float_model() -> Decoder:
    """The tiny decoder after 40 AdamW steps on counting sequences (about a second): a model with
    something to lose, whose quantized copies must still count."""
    model = tiny_decoder().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):
        x = counting(8, 17, seed=100 + step)
        optimizer.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def quantized(float_model: Decoder, tokens: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Decoder]:
    return {scheme: quantize(float_model, scheme, tokens[0]) for scheme in ("int8", "int4", "gptq-int4")}


def relative_logit_error(model: Decoder, reference: Decoder, idx: torch.Tensor) -> float:
    """||logits - reference logits|| / ||reference logits, centred per position||."""
    with torch.no_grad():
        got, want = model(idx), reference(idx)
    return float((got - want).norm() / (want - want.mean(-1, keepdim=True)).norm())


@pytest.mark.parametrize("scheme, logit_tol, loss_tol",
                         [("int8", 0.005, 1e-3), ("int4", 0.04, 0.01), ("gptq-int4", 0.04, 0.01)])
def test_quantized_decoder_scores_like_the_float_one(
    scheme: str, logit_tol: float, loss_tol: float, float_model: Decoder, quantized: dict[str, Decoder],
    tokens: tuple[torch.Tensor, torch.Tensor],
) -> None:
    model, (idx, targets) = quantized[scheme], (tokens[1][:, :-1], tokens[1][:, 1:])
    assert relative_logit_error(model, float_model, idx) < logit_tol
    with torch.no_grad():
        loss, predicted = float_model.loss(idx, targets), float_model(idx).argmax(-1)
        gap = model.loss(idx, targets) - loss
        agree = (model(idx).argmax(-1) == predicted).float().mean()
    assert loss < 1.0 and (predicted == targets).float().mean() > 0.9  # the float model has learned to count
    assert abs(float(gap)) < loss_tol
    assert agree > 0.95  # and the quantized one predicts as it does
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(names) == 2 * 4 and all(name.startswith("blocks.") for name in names)  # qkv, proj, fc, proj per block
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.wte.weight  # head stays float, tied
    assert isinstance(float_model.blocks[0].attn.qkv, nn.Linear)  # the original is untouched


def test_gptq_decoder_is_closer_than_rounding(
    float_model: Decoder, quantized: dict[str, Decoder], tokens: tuple[torch.Tensor, torch.Tensor]
) -> None:
    held_out = tokens[1][:, :-1]
    gptq_error = relative_logit_error(quantized["gptq-int4"], float_model, held_out)
    assert gptq_error < 0.6 * relative_logit_error(quantized["int4"], float_model, held_out)


@pytest.mark.parametrize("scheme, ratio, tol",
                         [("int8", 1 / 4, 0.01), ("int4", 1 / 8, 0.015), ("gptq-int4", 1 / 8, 0.015)])
def test_weight_bytes_shrink_by_the_bit_width(
    scheme: str, ratio: float, tol: float, float_model: Decoder, quantized: dict[str, Decoder]
) -> None:
    model = quantized[scheme]
    float_linears = [m for m in float_model.blocks.modules() if isinstance(m, nn.Linear)]
    quantized_linears = [m for m in model.blocks.modules() if isinstance(m, QuantizedLinear)]
    before = sum(m.weight.numel() * 4 for m in float_linears)
    after = sum(m.weight_bytes for m in quantized_linears)
    assert ratio <= after / before < ratio + tol  # scales and zero points add a little
    # the model's total: the same float parameters, each linear weight swapped for its quantized form
    assert weight_bytes(model) == weight_bytes(float_model) - before + after
    assert weight_bytes(float_model) == 4 * float_model.num_params()


def recompute_greedy(model: Decoder, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens without a cache: the whole sequence through the model at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1, : model.config.vocab_size].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("scheme", ["int8", "int4", "gptq-int4"])
def test_quantized_decoder_generates_as_the_float_one(
    scheme: str, float_model: Decoder, quantized: dict[str, Decoder]
) -> None:
    model, prompts = quantized[scheme], [[5], [10, 13], [58, 61, 64]]
    got = generate(model, prompts, max_new_tokens=6)
    assert got == [recompute_greedy(model, p, 6) for p in prompts]  # the cached path agrees with the full forward
    assert got == generate(float_model, prompts, max_new_tokens=6)
    assert got[0] == [(5 + STRIDE * k) % 67 for k in range(1, 7)]
    assert all(len(row) == 4 for row in generate(model, prompts, max_new_tokens=4, temperature=1.0, seed=0))


@pytest.mark.parametrize("overrides, scheme, group_size", [
    # MLA reads kv_up's weight directly (the absorbed cache path): it sees the dequantized weight
    (dict(position="rope", norm="rmsnorm", attention="mla", mla_q_rank=32, mla_rope_dim=4), "gptq-int4", 32),
    # Mamba's Delta projection has in_features = ceil(64 / 16) = 4
    (dict(layer_pattern="ma", position="none", mamba_d_state=4), "int4", 4),
    (dict(mlp="swiglu", moe_experts=4, moe_every=2, position="rope"), "gptq-int4", 64),
], ids=["mla", "hybrid", "moe"])
def test_other_architectures_quantize_and_generate(
    overrides: dict, scheme: str, group_size: int, tokens: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = tiny_decoder(n_embd=64, **overrides)
    q = quantize(model, scheme, tokens[0][:8], group_size=group_size)
    assert relative_logit_error(q, model, tokens[1]) < 0.3  # an untrained model: little to lose, loose bound
    prompts = [[5, 17, 3], [42]]
    assert generate(q, prompts, max_new_tokens=4) == [recompute_greedy(q, p, 4) for p in prompts]


def test_a_bfloat16_decoder_quantizes_and_converts(tokens: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = tiny_decoder(n_embd=64, position="rope", norm="rmsnorm", attention="mla", mla_rope_dim=4).bfloat16()
    q = quantize(model, "gptq-int4", tokens[0][:8], group_size=64)
    assert q.blocks[0].attn.q_up.scales.dtype == torch.bfloat16 and q(tokens[1]).dtype == torch.bfloat16
    assert len(generate(q, [[5, 8]], max_new_tokens=3)[0]) == 3
    q, model = q.float(), model.float()
    assert q.blocks[0].attn.kv_up.weight.dtype == torch.float32  # MLA reads it directly: it follows the conversion
    assert relative_logit_error(q, model, tokens[1]) < 0.3


def test_errors_say_what_is_wrong_and_how_to_fix_it(float_model: Decoder) -> None:
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int3': use one of int8, int4, gptq-int4"):
        quantize(float_model, "int3")
    with pytest.raises(ValueError, match="gptq-int4 needs calibration token ids"):
        quantize(float_model, "gptq-int4")
    with pytest.raises(ValueError, match=r"calibration must be integer token ids of shape \(N, T\)"):
        quantize(float_model, "gptq-int4", torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv has in_features=128.*here 64 is the largest"):
        quantize(float_model, "int4", group_size=96)
    with pytest.raises(ValueError, match="last dimension must be even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 values in \[0, 15\]"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="torchao_quantize supports schemes int8 and int4"):
        torchao_quantize(float_model, "gptq-int4")
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torchao"):
            torchao_quantize(float_model, "int8")
    else:
        with pytest.raises(ValueError, match="run on CUDA"):
            torchao_quantize(float_model, "int8")
