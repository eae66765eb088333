"""What every search shares: the decoder-step protocol, hypotheses, length limits and the length penalty.

A search drives any model that has the encoder-decoder inference interface (``Transformer`` does; the
tests' scripted decoder does too)::

    enc = model.encode(src_tokens)            # (B,S) -> an object with .reorder(new_order) -> same type
    cache = model.new_cache()                 # an object with .reorder(new_order) and .reorder_beams(new_order), in place
    logits = model.decode(new_tokens, enc, cache)   # new_tokens (B,1) -> (B,1,V)

so searches never look inside the model. :class:`NoCache` wraps a model and re-runs the decoder on the
whole prefix at every step: the reference that the cached path is tested against.

Length conventions (shared by greedy and beam search):

* ``src_len`` is the number of real source tokens fed to the encoder, the appended EOS included.
* The output length ``len`` counts generated tokens *including* the final EOS (never BOS).
* A hypothesis has at most ``max_len = min(floor(max_len_a * src_len + max_len_b), max_positions)``
  tokens; at its last step only EOS is allowed, so every search ends with a finished hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor

from transformer.config import LENGTH_PENALTY_FORMS
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.model import native

NEG_INF = float("-inf")

# The searches' compiled loops where the model has them (FrozenTransformer.compiled_greedy and compiled_beam);
# off within python_loop()
COMPILED_LOOP = native.Switch()


def python_loop() -> ContextManager[None]:
    """Within the block, greedy and beam search run their Python loops even where the compiled ones apply
    (comparisons: ``benchmarks/bench_inference.py``'s ``ours_pyloop``, tests)."""
    return COMPILED_LOOP.off()


@dataclass(frozen=True)
class Hypothesis:
    """A finished output.

    ``tokens``: the generated ids without BOS and without the final EOS.
    ``logprob``: the sum of the log-probabilities of ``tokens`` and of the final EOS.
    ``score``: what the search ranks by: ``logprob / lp(len(tokens) + 1)`` for beam search (see
    :func:`length_penalty`), ``logprob`` for greedy search.
    """

    tokens: list[int]
    score: float
    logprob: float


def length_penalty(length: int | Tensor, alpha: float, form: str = "gnmt") -> float | Tensor:
    """The length penalty ``lp(len)`` that beam search divides a hypothesis' log-probability by.

    ``form="gnmt"``: ``((5 + len) / 6) ** alpha`` (Wu et al. 2016, eq. 14), the one the Transformer paper
    used (section 6.1, alpha = 0.6). ``form="power"``: ``len ** alpha``, the one fairseq (``--lenpen``),
    Hugging Face ``generate`` (``length_penalty``) and CTranslate2 use. ``len`` counts output tokens
    including EOS in both; ``alpha = 0`` gives 1 (raw log-probabilities).

    Raises:
        TransformerError: ``form`` is not one of :data:`LENGTH_PENALTY_FORMS`.
    """
    if form == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if form == "power":
        return length ** alpha if isinstance(length, Tensor) else float(length) ** alpha
    raise TransformerError(f"length penalty form {form!r} is not one of {', '.join(LENGTH_PENALTY_FORMS)}")


def max_positions(model: Any) -> Optional[int]:
    """The model's positional limit (``model.cfg.max_positions``), or None for models without one."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "max_positions", None)


def max_output_lengths(src_tokens: Tensor, max_len_a: float, max_len_b: int, limit: Optional[int] = None) -> Tensor:
    """Per-sentence maximum output length ``floor(a * src_len + b)``, at least 1 and at most ``limit``.

    Shapes:
        src_tokens (B,S) right-padded with PAD -> (B,) long
    """
    src_len = src_tokens.ne(PAD_ID).sum(dim=1).double()  # (B,)
    max_len = torch.floor(max_len_a * src_len + max_len_b).long().clamp(min=1)
    if limit is not None:
        max_len = max_len.clamp(max=limit)
    return max_len


def next_token_logprobs(logits: Tensor) -> Tensor:
    """Log-softmax over the vocabulary in float32, with PAD and BOS made impossible (never generated).

    Shapes:
        logits (N,V) -> (N,V)
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logprobs[:, PAD_ID] = NEG_INF
    logprobs[:, BOS_ID] = NEG_INF
    return logprobs


def eos_only_where(logprobs: Tensor, at_limit: Tensor) -> Tensor:
    """Rows at their last allowed position (``at_limit``) may only continue with EOS: every other token's
    log-probability becomes -inf there.

    Shapes:
        logprobs (N,...,V), at_limit (N,) bool -> (N,...,V)
    """
    eos_only = torch.full_like(logprobs, NEG_INF)
    eos_only[..., EOS_ID] = logprobs[..., EOS_ID]
    return torch.where(at_limit.view(-1, *[1] * (logprobs.dim() - 1)), eos_only, logprobs)


def fused_candidates() -> Optional[Callable[..., list[Tensor]]]:
    """The compiled extension's ``step_candidates`` (:mod:`transformer.model.native`, a CPU with AVX2 and FMA),
    or None where it is not built or not enabled: log-softmax, scores and the best continuations of each
    sentence in two passes over a step's logits instead of ATen's three (see ``csrc/decoder_step.cpp``).

    ``fused(logits (n*K, V) float32, scores (n, K), N, banned ids, fill token)`` returns what
    ``beam_step(scores, next_token_logprobs(logits).view(n, K, V), N)`` returns (up to float rounding), with
    the banned ids left out instead of taken at -inf. Searches look it up once per call and use it for CPU
    float32 logits at steps where no sentence is at its length limit.
    """
    module = native.load()
    if module is None or not module.panels_supported():
        return None
    return module.step_candidates


def fused_applies(fused: Optional[Callable[..., list[Tensor]]], logits: Tensor) -> bool:
    """Whether ``fused`` (from :func:`fused_candidates`) takes these logits: CPU float32."""
    return fused is not None and logits.device.type == "cpu" and logits.dtype == torch.float32


def holds_source(cache: Any) -> bool:
    """Whether ``cache`` holds what it needs of the source itself, so that a search need not reorder its
    encoder output along with it (a static cache after its first step: see ``StaticCache.holds_source``)."""
    return bool(getattr(cache, "holds_source", False))


BANNED = [PAD_ID, BOS_ID]  # never generated (see next_token_logprobs)


@dataclass
class _PrefixCache:
    """The decoded prefix of each row; what :class:`NoCache` keeps instead of keys and values."""

    tokens: Optional[Tensor] = None  # (B,T)

    def reorder(self, new_order: Tensor) -> None:
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, new_order)

    reorder_beams = reorder


@dataclass
class NoCache:
    """A model wrapper that ignores incremental state: every ``decode`` re-runs the decoder on the full prefix.

    Slow (quadratic in the output length) and exact; the reference for "cached equals uncached" tests.
    """

    model: Any
    cfg: Any = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = getattr(self.model, "cfg", None)

    def encode(self, src_tokens: Tensor) -> Any:
        return self.model.encode(src_tokens)

    def new_cache(self) -> _PrefixCache:
        return _PrefixCache()

    def decode(self, tgt_tokens: Tensor, encoder_out: Any, cache: _PrefixCache) -> Tensor:
        """tgt_tokens (B,T_new) are appended to the prefix; returns logits (B,T_new,V) for the new positions."""
        prefix = tgt_tokens if cache.tokens is None else torch.cat([cache.tokens, tgt_tokens], dim=1)  # (B,T)
        cache.tokens = prefix
        return self.model.decode(prefix, encoder_out)[:, -tgt_tokens.size(1) :]  # (B,T,V) -> (B,T_new,V)

