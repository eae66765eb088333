"""The training loss: label-smoothed cross-entropy as a pure function (section 5.4 of the paper).

Convention (PyTorch's ``cross_entropy(label_smoothing=eps)``, and the fairseq formulation with
``eps_i = eps / V`` spread over all V classes, the gold class included): the target distribution puts
``1 - eps + eps/V`` on the gold token and ``eps/V`` on every other token, so per token

    loss = (1 - eps) * nll + eps * mean_v(-log p_v)

where ``nll = -log p_gold``. (fairseq's own code uses ``(1 - eps - eps/V) * nll + (eps/V) * sum_v(-log p_v)``,
i.e. it removes the gold class from the smoothing mass; the two differ by ``eps/V * nll``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.data.vocab import PAD_ID


def label_smoothed_nll_loss(
    logits: Tensor, target: Tensor, epsilon: float, ignore_index: int = PAD_ID
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed loss and summed negative log-likelihood over non-pad target tokens.

    Computed in float32 whatever the logits' dtype (bf16/fp16 log-softmax loses too much precision).

    Shapes:
        logits (B,T,V) or (N,V); target (B,T) or (N,) of token ids.
    Returns:
        (loss_sum, nll_sum): two scalar float32 tensors, sums (not means) over the tokens whose target is
        not ``ignore_index``. Divide by the number of target tokens to normalise; perplexity is
        ``exp(nll_sum / n_tokens)``.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.size(-1))  # (N,V)
    target = target.reshape(-1)  # (N,)
    keep = target.ne(ignore_index)  # (N,)
    # Gather with a safe index on pad positions, then zero them out.
    nll = -lprobs.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,)
    smooth = -lprobs.mean(dim=-1)  # (N,) mean over classes of -log p
    nll = nll.masked_fill(~keep, 0.0)
    smooth = smooth.masked_fill(~keep, 0.0)
    nll_sum = nll.sum()
    loss_sum = (1.0 - epsilon) * nll_sum + epsilon * smooth.sum()
    return loss_sum, nll_sum


def count_tokens(target: Tensor, ignore_index: int = PAD_ID) -> int:
    """Number of target tokens that count towards the loss (not ``ignore_index``)."""
    return int(target.ne(ignore_index).sum())


__all__ = ["label_smoothed_nll_loss", "count_tokens"]
