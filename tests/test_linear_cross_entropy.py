"""The loss fused with the LM head, chunked over tokens: F.cross_entropy's value and gradients, without the
(tokens, vocab) logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from modules.nn import Decoder, DecoderConfig
from modules.nn.decoder import IGNORE
from modules.nn.linear_cross_entropy import linear_cross_entropy

N, C, V = 10, 8, 24  # tokens, width, vocabulary rows


class Recorder(TorchDispatchMode):
    """The largest tensor any op returns, and how many times each op ran."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.ops = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket] += 1
        self.largest = max([self.largest] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def inputs(dtype: torch.dtype = torch.float32, ignored: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, C, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:ignored]] = IGNORE
    return hidden, weight, targets


def value_and_grads(loss_fn, hidden, weight, targets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def reference(hidden, weight, targets) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [1, 3, N, 4 * N])  # one token, a chunk that does not divide N, exactly N, more than N
def test_value_and_grads_match_cross_entropy_in_float64(dtype: torch.dtype, chunk: int) -> None:
    hidden, weight, targets = inputs(dtype)
    fused = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, chunk), hidden, weight, targets)
    exact = value_and_grads(reference, hidden.double(), weight.double(), targets)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(fused, exact):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), **tol)


def test_bfloat16_inputs_match_float32_within_bfloat16_rounding() -> None:
    hidden, weight, targets = inputs(torch.bfloat16)
    fused = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, 4), hidden, weight, targets)
    exact = value_and_grads(reference, hidden.float(), weight.float(), targets)
    assert [t.dtype for t in fused] == [torch.float32, torch.bfloat16, torch.bfloat16]
    for got, want in zip(fused, exact):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_under_autocast_it_matches_the_plain_head_under_autocast() -> None:
    hidden, weight, targets = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, 4), hidden, weight, targets)
        plain = value_and_grads(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=IGNORE),
                                hidden, weight, targets)
    exact = value_and_grads(reference, hidden, weight, targets)
    assert [t.dtype for t in fused] == [torch.float32] * 3
    for got, want, full in zip(fused, plain, exact):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
        assert not torch.equal(got, full)  # the logits were bf16: autocast reached the chunk's matmul


def test_all_targets_ignored_gives_nan_and_zero_grads_as_cross_entropy() -> None:
    hidden, weight, targets = inputs(ignored=N)
    fused = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, 3), hidden, weight, targets)
    plain = value_and_grads(reference, hidden, weight, targets)
    assert fused[0].isnan() and plain[0].isnan()
    for got, want in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(got, want)
        assert not got.any()


@pytest.mark.parametrize("case", ["hidden frozen", "weight frozen", "no_grad"])
def test_grads_only_for_inputs_that_require_them(case: str) -> None:
    hidden, weight, targets = inputs()
    hidden.requires_grad_(case != "hidden frozen")
    weight.requires_grad_(case != "weight frozen")
    with Recorder() as record, torch.set_grad_enabled(case != "no_grad"):
        loss = linear_cross_entropy(hidden, weight, targets, IGNORE, 3)  # 4 chunks
    torch.testing.assert_close(loss, reference(hidden, weight, targets).detach())
    # each chunk's logits, and one more matmul for the gradient wanted (none under no_grad)
    assert record.ops[torch.ops.aten.mm] == 4 * (1 if case == "no_grad" else 2)
    if case != "no_grad":
        loss.backward()
        live, frozen = (weight, hidden) if case == "hidden frozen" else (hidden, weight)
        torch.testing.assert_close(live.grad, torch.autograd.grad(reference(hidden, weight, targets), live)[0])
        assert frozen.grad is None


def test_backward_scales_by_the_incoming_gradient() -> None:
    hidden, weight, targets = inputs()
    (3.0 * linear_cross_entropy(hidden, weight, targets, IGNORE, 4)).backward()
    want = torch.autograd.grad(3.0 * reference(hidden, weight, targets), (hidden, weight))
    torch.testing.assert_close(hidden.grad, want[0])
    torch.testing.assert_close(weight.grad, want[1])


def test_compiled_matches_eager() -> None:
    hidden, weight, targets = inputs()
    compiled = torch.compile(linear_cross_entropy, backend="aot_eager")  # dynamo + AOT autograd, no codegen
    got = value_and_grads(lambda h, w, t: compiled(h, w, t, IGNORE, 4), hidden, weight, targets)
    want = value_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, 4), hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_chunk_of_zero_tokens_is_refused() -> None:
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="chunk=0"):
        linear_cross_entropy(hidden, weight, targets, IGNORE, 0)


TINY = dict(vocab_size=97, pad_vocab_to=64, block_size=16, n_layer=2, n_head=2, n_embd=16)  # 128 vocabulary rows


def decoder(**overrides) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(**{**TINY, **overrides}))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 97, (2, 16), generator=g), torch.randint(0, 97, (2, 16), generator=g)
    targets[0, :5] = IGNORE  # a prompt
    return idx, targets


@pytest.mark.parametrize("tie", [True, False])
def test_decoder_loss_with_chunks_equals_the_plain_loss(tie: bool) -> None:
    idx, targets = batch()
    results = []
    for chunk in (0, 5):
        model = decoder(tie_embeddings=tie, loss_chunk=chunk)
        loss = model.loss(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, msg=lambda m: f"{name}: {m}")


def test_decoder_loss_with_chunks_never_makes_a_tokens_by_vocab_tensor() -> None:
    idx, targets = batch()
    logits = idx.numel() * decoder().config.padded_vocab_size  # 32 x 128, more than any other activation here
    largest = {}
    for chunk in (0, 8):
        model = decoder(loss_chunk=chunk)
        with Recorder() as record:
            model.loss(idx, targets).backward()
        largest[chunk] = record.largest
    assert largest[0] >= logits  # the recorder sees the plain path's logits
    assert largest[8] < logits


def test_decoder_refuses_to_fuse_a_head_it_would_bypass() -> None:
    model = decoder(loss_chunk=4)
    model.lm_head = torch.nn.Sequential(model.lm_head)  # as an adapter wrapping the head would
    with pytest.raises(ValueError, match="loss_chunk=0"):
        model.loss(*batch())


@pytest.mark.slow
def test_decoder_loss_compiled_with_inductor_equals_the_plain_loss() -> None:
    idx, targets = batch()
    plain, fused = decoder(), decoder(loss_chunk=8)
    want = plain.loss(idx, targets)
    got = torch.compile(fused.loss)(idx, targets)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    torch.testing.assert_close(fused.lm_head.weight.grad, plain.lm_head.weight.grad)
