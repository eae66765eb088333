"""The encoder-decoder ``Transformer`` and the decoder-only ``TransformerLM``, built from the same layers.

Shapes: B batch, S source length, T target length, D model width, V vocabulary.
Padding is inferred from ``PAD_ID`` in the token tensors; padding is on the right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.config import ModelConfig
from transformer.data.vocab import PAD_ID
from transformer.model.dropout import Dropout
from transformer.model.embeddings import PositionalEncoding, TokenEmbedding, tied_uses
from transformer.model.layers import DecoderLayer, EncoderLayer, LayerCache


@dataclass
class EncoderOut:
    """What the decoder needs from the encoder."""

    memory: Tensor  # (B,S,D)
    src_mask: Tensor  # (B,S) bool, True = real token
    padded: Optional[bool] = None  # any padding in src_mask; computed once (a device sync) and kept

    def __post_init__(self) -> None:
        if self.padded is None:
            self.padded = not bool(self.src_mask.all())

    def reorder(self, new_order: Tensor) -> "EncoderOut":
        """Select (and repeat) batch rows, e.g. to expand each source to its beams."""
        return EncoderOut(self.memory.index_select(0, new_order), self.src_mask.index_select(0, new_order), self.padded)

    def attn_mask(self) -> Optional[Tensor]:
        """(B,1,1,S) for SDPA, or None when nothing is padded (lets SDPA take its fastest path)."""
        return self.src_mask[:, None, None, :] if self.padded else None


@dataclass
class DecoderCache:
    """Incremental decoding state: one :class:`LayerCache` per decoder layer."""

    layers: list[LayerCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Number of target positions already decoded."""
        return self.layers[0].self_attn.length if self.layers else 0

    def reorder(self, new_order: Tensor) -> None:
        """Beam search's ``reorder_cache``: keep rows ``new_order`` (B',) of the batch, in place."""
        for layer in self.layers:
            layer.reorder(new_order)

    def reorder_beams(self, new_order: Tensor) -> None:
        """Like :meth:`reorder`, when every row keeps its source (beams moving within their sentence):
        the cross-attention keys/values, the same for all beams of a sentence, are left as they are."""
        for layer in self.layers:
            layer.reorder(new_order, sources_changed=False)


def self_attention_mask(t_new: int, past: int, device: torch.device) -> tuple[bool, Optional[Tensor]]:
    """``(is_causal, attn_mask)`` for the decoder's self-attention over ``past`` cached and ``t_new`` new positions.

    Right padding means a real query never sees a pad key under the causal mask, so there is no padding mask.
    Without a past, SDPA's ``is_causal`` (also right for one position; never a SymBool under compile); one new
    position sees everything; several new positions after a past need an explicit mask.
    """
    if past == 0:
        return True, None
    if t_new == 1:
        return False, None
    return False, _causal_mask(t_new, past + t_new, device)


def _causal_mask(t_new: int, t_total: int, device: torch.device) -> Tensor:
    """(1,1,T_new,T_total) bool: query i (at absolute position t_total - t_new + i) sees keys up to itself."""
    q_pos = torch.arange(t_total - t_new, t_total, device=device)[:, None]
    k_pos = torch.arange(t_total, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


class Decoder(nn.Module):
    """A stack of decoder layers over embedded targets; used by both model kinds."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, cross_attention: bool) -> None:
        super().__init__()
        scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.embed_tokens = TokenEmbedding(vocab_size, cfg.d_model, PAD_ID, scale)
        self.embed_positions = PositionalEncoding(cfg.max_positions, cfg.d_model, cfg.positional == "learned")
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cross_attention) for _ in range(cfg.n_decoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(
        self,
        tokens: Tensor,
        memory: Optional[Tensor] = None,
        memory_mask: Optional[Tensor] = None,
        cache: Optional[DecoderCache] = None,
        embed_weight: Optional[Tensor] = None,
    ) -> Tensor:
        """tokens (B,T) -> hidden states (B,T,D). With a cache, ``tokens`` are the new positions only.
        ``embed_weight``: the embedding's weight as one of :func:`tied_uses`'s aliases (training)."""
        past = cache.length if cache is not None else 0
        if cache is not None and not cache.layers:
            cache.layers.extend(LayerCache() for _ in self.layers)
        t = tokens.size(1)
        x = self.dropout(self.embed_positions(self.embed_tokens(tokens, embed_weight), offset=past))  # (B,T,D)
        is_causal, self_attn_mask = self_attention_mask(t, past, tokens.device)
        for i, layer in enumerate(self.layers):
            x = layer(
                x, memory, memory_mask, self_attn_mask, is_causal, cache.layers[i] if cache is not None else None
            )
        return self.final_norm(x) if self.final_norm is not None else x


class Encoder(nn.Module):
    """Embedded source through a stack of encoder layers."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.embed_tokens = TokenEmbedding(vocab_size, cfg.d_model, PAD_ID, scale)
        self.embed_positions = PositionalEncoding(cfg.max_positions, cfg.d_model, cfg.positional == "learned")
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm_first else None

    def forward(self, src_tokens: Tensor, embed_weight: Optional[Tensor] = None) -> EncoderOut:
        """src_tokens (B,S) -> EncoderOut(memory (B,S,D), src_mask (B,S)). ``embed_weight``: as the decoder's."""
        src_mask = src_tokens.ne(PAD_ID)  # (B,S)
        # Eager: skip the mask when nothing is padded (a device sync, then the fastest attention kernel).
        # Compiled or captured in a CUDA graph: always pass it (no data-dependent branch, no sync while capturing).
        fixed = torch.compiler.is_compiling() or (src_tokens.is_cuda and torch.cuda.is_current_stream_capturing())
        padded = True if fixed else not bool(src_mask.all())
        attn_mask = src_mask[:, None, None, :] if padded else None  # (B,1,1,S)
        x = self.dropout(self.embed_positions(self.embed_tokens(src_tokens, embed_weight)))  # (B,S,D)
        for layer in self.layers:
            x = layer(x, attn_mask)
        memory = self.final_norm(x) if self.final_norm is not None else x
        return EncoderOut(memory, src_mask, padded)


def _init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _OutputLayer(nn.Module):
    """The pre-softmax projection ``lm_head`` (optionally tied to an embedding) and Marian's logits bias."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, tied: Optional[nn.Embedding]) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.d_model**-0.5)
        if tied is not None:
            self.lm_head.weight = tied.weight
        if cfg.final_logits_bias:
            self.final_logits_bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.final_logits_bias = None
        self._wt: Optional[Tensor] = None  # inference's transposed copy of the weight (see _weight_t)
        self._wt_key: Optional[tuple] = None

    def forward(self, h: Tensor, weight: Optional[Tensor] = None) -> Tensor:  # (B,T,D) -> (B,T,V)
        """``weight``: ``lm_head``'s weight as one of :func:`tied_uses`'s aliases (training)."""
        w = self.lm_head.weight if type(self.lm_head) is nn.Linear else None  # not once quantised
        if weight is not None:
            logits = F.linear(h, weight)
        elif (w is not None and not self.training and w.device.type == "cpu" and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            logits = h @ self._weight_t(w)  # (B,T,D) @ (D,V)
        else:
            logits = self.lm_head(h)
        return logits + self.final_logits_bias if self.final_logits_bias is not None else logits

    def train(self, mode: bool = True) -> "_OutputLayer":
        self._wt, self._wt_key = None, None
        return super().train(mode)

    def _weight_t(self, w: Tensor) -> Tensor:
        """``w`` (V,D) transposed to a contiguous (D,V) copy, kept until ``w`` changes. On the CPU, MKL
        multiplies by it 2.95x faster than ``F.linear`` by ``w`` at one decoding row (0.37 against 1.10 ms
        for V=8000, D=256; ``benchmarks/bench_micro.py``) and 1.16x at 32 rows: the costliest product of a decoding step. Inference only
        (no autograd, eval mode): training keeps ``nn.Linear``. Costs one more V x D copy of memory.

        The copy is dropped whenever the module's mode is set (``train()`` / ``eval()``: a fused optimizer
        step changes the weight without bumping its version counter) and rebuilt when the weight is
        replaced or changed in place by an ordinary op."""
        key = (w.data_ptr(), w._version, w.dtype)
        if self._wt_key != key:
            self._wt = w.detach().t().contiguous()  # (D,V)
            self._wt_key = key
        return self._wt


def _tied_aliases(output: _OutputLayer, stacks: tuple[nn.Module, ...]) -> Optional[tuple[Optional[Tensor], ...]]:
    """One alias of the output projection's weight per stack whose embedding shares it (None for the others),
    then the projection's own: :func:`~transformer.model.embeddings.tied_uses` for a training step. None when
    nothing is shared or the plain path applies."""
    if type(output.lm_head) is not nn.Linear:
        return None
    w = output.lm_head.weight
    shared = [stack.embed_tokens.weight is w for stack in stacks]
    aliases = tied_uses(w, 1 + sum(shared)) if any(shared) else None
    if aliases is None:
        return None
    it = iter(aliases)
    return (*(next(it) if s else None for s in shared), next(it))


class Transformer(nn.Module):
    """The encoder-decoder model of "Attention Is All You Need".

    Args:
        cfg: the architecture.
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        shared_vocab: one vocabulary for both sides; with ``cfg.tie_embeddings`` the source embedding,
            target embedding and output projection are one matrix (section 3.4). Default: the sizes are equal.
    """

    def __init__(
        self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, shared_vocab: Optional[bool] = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        shared_vocab = src_vocab_size == tgt_vocab_size if shared_vocab is None else shared_vocab
        self.encoder = Encoder(cfg, src_vocab_size)
        self.decoder = Decoder(cfg, tgt_vocab_size, cross_attention=True)
        _init_linear(self)
        if cfg.tie_embeddings and shared_vocab:
            self.decoder.embed_tokens.weight = self.encoder.embed_tokens.weight
        self.output = _OutputLayer(cfg, tgt_vocab_size, self.decoder.embed_tokens if cfg.tie_embeddings else None)

    def forward(self, src_tokens: Tensor, tgt_input: Tensor) -> Tensor:
        """Teacher-forced logits.

        Shapes:
            src_tokens (B,S), tgt_input (B,T) -> logits (B,T,V)
        """
        aliases = _tied_aliases(self.output, (self.encoder, self.decoder))
        if aliases is None:
            return self.decode(tgt_input, self.encode(src_tokens))
        w_src, w_tgt, w_out = aliases
        encoder_out = self.encoder(src_tokens, embed_weight=w_src)
        h = self.decoder(tgt_input, encoder_out.memory, encoder_out.attn_mask(), embed_weight=w_tgt)
        return self.output(h, weight=w_out)

    def encode(self, src_tokens: Tensor) -> EncoderOut:
        """Run the encoder once per source. src_tokens (B,S)."""
        return self.encoder(src_tokens)

    def decode(self, tgt_tokens: Tensor, encoder_out: EncoderOut, cache: Optional[DecoderCache] = None) -> Tensor:
        """Decoder logits (B,T,V) for ``tgt_tokens`` (B,T); with a cache, only the new tokens are given."""
        h = self.decoder(tgt_tokens, encoder_out.memory, encoder_out.attn_mask(), cache)
        return self.output(h)

    def new_cache(self) -> DecoderCache:
        """An empty incremental-decoding state."""
        return DecoderCache()


class TransformerLM(nn.Module):
    """A decoder-only language model made of the same decoder layers, without cross-attention."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg, vocab_size, cross_attention=False)
        _init_linear(self)
        self.output = _OutputLayer(cfg, vocab_size, self.decoder.embed_tokens if cfg.tie_embeddings else None)

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits. tokens (B,T) -> (B,T,V)."""
        aliases = _tied_aliases(self.output, (self.decoder,))
        if aliases is None:
            return self.decode(tokens)
        w_tgt, w_out = aliases
        return self.output(self.decoder(tokens, embed_weight=w_tgt), weight=w_out)

    def decode(self, tokens: Tensor, cache: Optional[DecoderCache] = None) -> Tensor:
        """Logits (B,T,V); with a cache, ``tokens`` are the new positions only."""
        return self.output(self.decoder(tokens, cache=cache))

    def new_cache(self) -> DecoderCache:
        return DecoderCache()
