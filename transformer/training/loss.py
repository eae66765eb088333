"""The training loss: label-smoothed cross-entropy as a pure function (section 5.4 of the paper).

Convention (PyTorch's ``cross_entropy(label_smoothing=eps)``, and the fairseq formulation with
``eps_i = eps / V`` spread over all V classes, the gold class included): the target distribution puts
``1 - eps + eps/V`` on the gold token and ``eps/V`` on every other token, so per token

    loss = (1 - eps) * nll + eps * mean_v(-log p_v)

where ``nll = -log p_gold``. (fairseq's own code uses ``(1 - eps - eps/V) * nll + (eps/V) * sum_v(-log p_v)``,
i.e. it removes the gold class from the smoothing mass; the two differ by ``eps/V * nll``.)

The loss is one autograd function rather than ``log_softmax`` followed by a gather and a mean. With
``lse = logsumexp(z)`` and ``z`` the logits of one token, ``nll = lse - z_gold`` and
``mean_v(-log p_v) = lse - mean(z)``, so the forward pass needs only three numbers per token, and the
gradient is ``c * softmax(z) - a * onehot(gold) - b / V`` with ``a = (1 - eps) g``, ``b = eps g``, ``c = a + b``
for the incoming gradient ``g`` of the token's loss. Both passes walk the (N, V) logits in blocks of rows
that stay in the cache (on the CPU; a GPU's blocks are 64 times larger, so that the loss is a few kernel
launches a step), and neither allocates an (N, V) temporary (bf16 logits take a float32 copy of one block at a
time): autograd's version makes four (the log-probabilities, their gradient, the gather's and the mean's), which
at N x V = 2048 x 8000 are 65 MB each, and a large allocation that the C library maps afresh costs a page fault
per 4 KiB on first touch.
With ``overwrite_logits=True`` the logits' own storage is reused (as Liger-Kernel's cross-entropy does):
float32 logits hold ``exp(z - max)`` after the forward pass, so the backward pass is a multiply, a
subtraction and a scatter with no second ``exp`` (the exponential is the costliest step of the loss on the
CPU), and the gradient is written over them.
The trainer uses it, since nothing reads the logits after the loss.

On the CPU with the compiled extension built (``transformer build-native``), that float32 path runs in two of its
kernels, ``exp_rows_`` and ``exp_rows_grad_`` (``transformer/model/csrc/decoder_step.cpp``): each row of logits
is read twice in the forward pass (its maximum and sum, then its exponentials written in place and added up)
instead of five ATen passes per block, and once in the backward pass (BENCHMARKS.md, session 20). Without it,
the ATen form below runs the same formulas.
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import Tensor

from transformer.data.vocab import PAD_ID
from transformer.model import native

# Rows per block: on the CPU about 1M elements (4 MB in float32), so a block's second and third passes hit the
# cache; on a GPU about 64M (256 MB in float32: each block is a few kernel launches, and a GPU has no cache to
# keep it in: 1M-element blocks made the loss about a thousand launches a step at 16k tokens, which a host
# could not issue as fast as the GPU ran them)
_CPU_BLOCK_ELEMENTS = 1 << 20
_GPU_BLOCK_ELEMENTS = 1 << 26
_GPU_BLOCKS = native.Switch()  # off: the CPU's blocks on every device (comparisons)
_KERNEL = native.Kernel("exp_rows_")  # the extension, looked up once per process


def aten_loss() -> ContextManager[None]:
    """Within the block, the ATen form of the loss even where the extension's kernels apply (comparisons: the
    ``ours_aten_loss`` peer of ``benchmarks/bench_train.py``, tests). A backward pass follows its forward pass."""
    return _KERNEL.off()


def cpu_sized_blocks() -> ContextManager[None]:
    """Within the block, the loss walks the logits in the CPU's blocks of rows on every device, as before session
    25 (comparisons: the ``ours_cpu_loss_blocks`` peer of ``benchmarks/bench_train.py``, tests). A backward pass
    follows its forward pass."""
    return _GPU_BLOCKS.off()


def _row_blocks(n_rows: int, vocab: int, device: torch.device) -> list[tuple[int, int]]:
    elements = _GPU_BLOCK_ELEMENTS if device.type != "cpu" and _GPU_BLOCKS else _CPU_BLOCK_ELEMENTS
    rows = max(1, elements // max(1, vocab))
    return [(start, min(n_rows, start + rows)) for start in range(0, n_rows, rows)]


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """(loss_sum, nll_sum) of (N, V) logits; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, ignore_index: int, overwrite: bool):
        n, vocab = logits.shape
        blocks = _row_blocks(n, vocab, logits.device)  # the backward pass walks the same ones
        keep = target.ne(ignore_index)  # (N,)
        gold_ids = target.masked_fill(~keep, 0).unsqueeze(1)  # (N,1), a safe index on ignored rows
        gold = logits.gather(1, gold_ids).squeeze(1).float()  # (N,), read before any overwriting
        mean = logits.new_empty(n, dtype=torch.float32)  # (N,)
        # float32 logits that may be overwritten keep exp(z - max) in their place for the backward pass,
        # which then needs no exp of its own; otherwise the backward pass recomputes it from lse.
        keep_exps = overwrite and logits.dtype == torch.float32
        module = None
        if keep_exps and logits.device.type == "cpu" and logits.is_contiguous() and not torch.compiler.is_compiling():
            module = _KERNEL.get()
        if keep_exps:
            data = logits.detach()  # the same storage (and version counter): autograd sees the change
            if module is not None:  # the extension: two reads of each row, exp(z - max) written in place
                top, total, mean = module.exp_rows_(data)  # (N,) each
            else:
                top, total = torch.empty_like(mean), torch.empty_like(mean)
                for start, end in blocks:
                    block = data[start:end]  # (n_b,V)
                    torch.mean(block, 1, out=mean[start:end])
                    torch.amax(block, 1, out=top[start:end])
                    block.sub_(top[start:end].unsqueeze(1)).exp_()
                    torch.sum(block, 1, out=total[start:end])
            lse = top + total.log()
            norm = total  # the backward pass divides the stored exponentials by it
        else:
            lse = torch.empty_like(mean)
            for start, end in blocks:
                block = logits[start:end].float()  # (n_b,V); a view when the logits are float32
                torch.logsumexp(block, 1, out=lse[start:end])
                torch.mean(block, 1, out=mean[start:end])
            norm = lse
        keep_f = keep.float()
        nll_sum = ((lse - gold) * keep_f).sum()
        loss_sum = (1.0 - epsilon) * nll_sum + epsilon * ((lse - mean) * keep_f).sum()
        ctx.save_for_backward(logits, norm, gold_ids, keep_f)
        ctx.epsilon, ctx.overwrite, ctx.keep_exps, ctx.module = epsilon, overwrite, keep_exps, module
        ctx.blocks = blocks
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        logits, norm, gold_ids, keep_f = ctx.saved_tensors
        n, vocab = logits.shape
        eps = ctx.epsilon
        a = (grad_loss * (1.0 - eps) + grad_nll) * keep_f  # (N,) weight of -onehot(gold)
        b = grad_loss * eps * keep_f  # (N,) weight of -1/V
        c = a + b  # (N,) weight of softmax(z)
        offset = b / vocab  # (N,)
        if ctx.keep_exps:  # logits hold exp(z - max) and norm their row sums: softmax = exps / norm
            scale = c / norm  # (N,)
            grad = logits.detach()
            if ctx.module is not None:  # the extension, one pass: exps * scale - offset, and -a at the gold token
                ctx.module.exp_rows_grad_(grad, scale.float(), offset.float(), gold_ids.view(-1), a.float())
                return grad, None, None, None, None
            for start, end in ctx.blocks:
                out = grad[start:end]
                out.mul_(scale[start:end].unsqueeze(1)).sub_(offset[start:end].unsqueeze(1))
                out.scatter_add_(1, gold_ids[start:end], -a[start:end].unsqueeze(1))
            return grad, None, None, None, None
        offset = offset.unsqueeze(1)  # (N,1)
        lse = norm
        # c * exp(z - lse) = exp(z - (lse - log c)): one subtraction and one exp per element. log 0 = -inf
        # gives exp(-inf) = 0 on ignored rows; a negative c (an unusual objective) takes the multiply.
        # On a GPU the multiply always: the test would make the host wait for the device at every step.
        scale_in_exp = logits.device.type == "cpu" and bool((c >= 0).all())
        shift = (lse - torch.log(c) if scale_in_exp else lse).unsqueeze(1)  # (N,1)
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        for start, end in ctx.blocks:
            src = logits[start:end]
            out = grad[start:end]
            if src.dtype == torch.float32:
                torch.sub(src, shift[start:end], out=out)
                work = out
            else:  # bf16/fp16 logits: the arithmetic in float32, the result in the logits' dtype
                work = src.float().sub_(shift[start:end])
            work.exp_()
            if not scale_in_exp:
                work.mul_(c[start:end].unsqueeze(1))
            work.sub_(offset[start:end])
            work.scatter_add_(1, gold_ids[start:end], -a[start:end].unsqueeze(1).to(work.dtype))
            if work is not out:
                out.copy_(work)
        return grad, None, None, None, None


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float, ignore_index: int = PAD_ID, overwrite_logits: bool = False
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed negative log-likelihood over non-pad target tokens.

    Computed in float32 whatever the logits' dtype (bf16/fp16 log-softmax loses too much precision).

    Args:
        overwrite_logits: reuse the storage of ``logits``: float32 logits hold their exponentials after the
            forward pass, and every dtype holds its gradient after the backward pass (no (N, V) allocation,
            and one exp per element instead of two). Only when nothing reads ``logits`` after the loss.
    Shapes:
        logits (B,T,V) or (N,V); target (B,T) or (N,) of token ids.
    Returns:
        (loss_sum, nll_sum): two scalar float32 tensors, sums (not means) over the tokens whose target is
        not ``ignore_index``. Divide by the number of target tokens to normalise; perplexity is
        ``exp(nll_sum / n_tokens)``.
    """
    flat = logits.reshape(-1, logits.size(-1))  # (N,V)
    return _LabelSmoothedCrossEntropy.apply(flat, target.reshape(-1), float(epsilon), ignore_index,
                                            overwrite_logits)


def count_tokens(target: Tensor, ignore_index: int = PAD_ID) -> int:
    """Number of target tokens that count towards the loss (not ``ignore_index``)."""
    return int(target.ne(ignore_index).sum())


__all__ = ["label_smoothed_nll_loss", "count_tokens", "aten_loss"]
