"""Cross-entropy fused with the output projection, chunked over tokens: the (N, V) logits never exist.

At GPT-2 small (16 x 1024 tokens, vocabulary 50,304) the plain loss `F.cross_entropy((h @ W.T).float(), y)`
makes 16,384 x 50,304 logits (bf16 under autocast), their fp32 copy, its log-softmax kept for backward and
the gradient of each: 3.1 GiB per fp32 one. Here one chunk of tokens at a time makes its logits, their
log-sum-exp, its loss and, since softmax minus one-hot is known there, its gradients too (Liger-Kernel's
fused linear cross-entropy, Hsu et al. 2024, does the same in Triton); only d loss / d hidden (N, C) and
d loss / d weight (V, C) are kept for backward, which scales them by the incoming gradient.

Autocast: none is applied or undone here. The matmuls inside are ordinary ops, so under autocast (Lightning's
bf16-mixed) a chunk's logits are bf16 exactly as `nn.Linear`'s would be, and its gradients' matmuls run in
bf16 as the plain path's backward does; the log-sum-exp and softmax run in at least float32 and the weight's
gradient accumulates in float32 over chunks, then is cast to the weight's dtype.
"""

from __future__ import annotations

from typing import Any

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # at least float32 (the plain path's `.float()` before the softmax), float64 kept as it is
        wide = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        keep = targets != ignore_index  # (N,)
        count = keep.sum()
        scale = torch.where(keep, 1 / count.clamp(min=1).to(wide), 0)  # (N,) d mean / d a token's loss; 0 if ignored
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, C)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_weight else None  # (V, C)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            h, k = hidden[start:end], keep[start:end]  # (n, C), (n,)
            t = torch.where(k, targets[start:end], 0)  # (n,) an ignored row reads class 0, then counts for nothing
            logits = h @ weight.T  # (n, V): this chunk's only, in the matmul's dtype (the weight's, or autocast's)
            z = logits.to(wide)  # logits itself when already wide
            lse = torch.logsumexp(z, dim=-1)  # (n,)
            total = total + torch.where(k, lse - z.gather(1, t[:, None])[:, 0], 0).sum()
            if want_hidden or want_weight:
                g = z.sub_(lse[:, None]).exp_()  # (n, V) softmax, in z's memory
                g[torch.arange(g.shape[0], device=g.device), t] -= 1  # d loss_i / d logits_i = softmax - one-hot
                g = g.mul_(scale[start:end, None]).to(logits.dtype)  # of the mean; zero on ignored rows
                if want_hidden:
                    grad_hidden[start:end] = g @ weight
                if want_weight:
                    grad_weight += g.T @ h  # accumulated in wide
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total / count  # nan if every target is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else grad_weight * grad_loss, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         chunk: int) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)` (0-d, mean over the
    targets that are not ignore_index; nan if all are), computed `chunk` tokens at a time.

    hidden (N, C), weight (V, C) (every row is in the softmax, a padded vocabulary's too), targets (N,) ids.
    Transient memory is one to three chunk x V buffers (the logits; their float32 copy under autocast;
    its gradient in the matmul's dtype) instead of N x V ones, plus the (N, C) and (V, C) gradients, made
    in forward for the inputs that require grad (none under no_grad) and kept for backward.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: tokens per chunk must be at least 1")
    if not torch.is_grad_enabled():  # needs_input_grad ignores grad mode: validation would pay for gradients
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk)
