"""The Transformer: attention (+ KV cache), layers, embeddings, the encoder-decoder and the LM, a factory,
and the inference-only form frozen for fast decoding (:func:`freeze`)."""

from transformer.model.attention import KVCache, MultiHeadAttention
from transformer.model.factory import build_model, count_parameters, describe
from transformer.model.transformer import DecoderCache, EncoderOut, Transformer, TransformerLM
from transformer.model.frozen import freeze  # after .transformer, which it builds on

__all__ = [
    "KVCache", "MultiHeadAttention", "build_model", "count_parameters", "describe",
    "DecoderCache", "EncoderOut", "Transformer", "TransformerLM", "freeze",
]
