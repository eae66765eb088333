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
that stay in the cache, and neither allocates an (N, V) temporary: autograd's version makes four (the
log-probabilities, their gradient, the gather's and the mean's), which at N x V = 2048 x 8000 are 65 MB
each, and a large allocation that the C library maps afresh costs a page fault per 4 KiB on first touch.
With ``inplace_backward=True`` the gradient is written over the logits themselves, so the backward pass
allocates nothing of that size either (as Liger-Kernel's cross-entropy does); the trainer uses it, since
nothing reads the logits after the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from transformer.data.vocab import PAD_ID

# Rows per block: about 1M elements (4 MB in float32), so a block's second and third passes hit the cache.
_BLOCK_ELEMENTS = 1 << 20


def _row_blocks(n_rows: int, vocab: int) -> list[tuple[int, int]]:
    rows = max(1, _BLOCK_ELEMENTS // max(1, vocab))
    return [(start, min(n_rows, start + rows)) for start in range(0, n_rows, rows)]


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """(loss_sum, nll_sum) of (N, V) logits; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, ignore_index: int, inplace: bool):
        n, vocab = logits.shape
        keep = target.ne(ignore_index)  # (N,)
        gold_ids = target.masked_fill(~keep, 0).unsqueeze(1)  # (N,1), a safe index on ignored rows
        lse = logits.new_empty(n, dtype=torch.float32)  # (N,)
        gold = torch.empty_like(lse)
        mean = torch.empty_like(lse)
        for start, end in _row_blocks(n, vocab):
            block = logits[start:end].float()  # (n_b,V); a view when the logits are float32
            torch.logsumexp(block, 1, out=lse[start:end])
            gold[start:end] = block.gather(1, gold_ids[start:end]).squeeze(1)
            torch.mean(block, 1, out=mean[start:end])
        keep_f = keep.float()
        nll_sum = ((lse - gold) * keep_f).sum()
        loss_sum = (1.0 - epsilon) * nll_sum + epsilon * ((lse - mean) * keep_f).sum()
        ctx.save_for_backward(logits, lse, gold_ids, keep_f)
        ctx.epsilon, ctx.inplace = epsilon, inplace
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        logits, lse, gold_ids, keep_f = ctx.saved_tensors
        n, vocab = logits.shape
        eps = ctx.epsilon
        a = (grad_loss * (1.0 - eps) + grad_nll) * keep_f  # (N,) weight of -onehot(gold)
        b = grad_loss * eps * keep_f  # (N,) weight of -1/V
        c = a + b  # (N,) weight of softmax(z)
        # c * exp(z - lse) = exp(z - (lse - log c)): one subtraction and one exp per element. log 0 = -inf
        # gives exp(-inf) = 0 on ignored rows; a negative c (an unusual objective) takes the multiply.
        scale_in_exp = bool((c >= 0).all())
        shift = (lse - torch.log(c) if scale_in_exp else lse).unsqueeze(1)  # (N,1)
        offset = (b / vocab).unsqueeze(1)  # (N,1)
        grad = logits if ctx.inplace else torch.empty_like(logits)
        for start, end in _row_blocks(n, vocab):
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
    logits: Tensor, target: Tensor, epsilon: float, ignore_index: int = PAD_ID, inplace_backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed negative log-likelihood over non-pad target tokens.

    Computed in float32 whatever the logits' dtype (bf16/fp16 log-softmax loses too much precision).

    Args:
        inplace_backward: write the gradient over ``logits`` in the backward pass instead of into a new
            tensor (saves an (N, V) allocation). Only when nothing reads ``logits`` after ``backward()``.
    Shapes:
        logits (B,T,V) or (N,V); target (B,T) or (N,) of token ids.
    Returns:
        (loss_sum, nll_sum): two scalar float32 tensors, sums (not means) over the tokens whose target is
        not ``ignore_index``. Divide by the number of target tokens to normalise; perplexity is
        ``exp(nll_sum / n_tokens)``.
    """
    flat = logits.reshape(-1, logits.size(-1))  # (N,V)
    return _LabelSmoothedCrossEntropy.apply(flat, target.reshape(-1), float(epsilon), ignore_index,
                                            inplace_backward)


def count_tokens(target: Tensor, ignore_index: int = PAD_ID) -> int:
    """Number of target tokens that count towards the loss (not ``ignore_index``)."""
    return int(target.ne(ignore_index).sum())


__all__ = ["label_smoothed_nll_loss", "count_tokens"]
