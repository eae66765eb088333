"""The Transformer: attention (+ KV cache), layers, embeddings, the encoder-decoder and the LM, a factory."""

from transformer.model.attention import KVCache, MultiHeadAttention
from transformer.model.factory import build_model, count_parameters, describe
from transformer.model.transformer import DecoderCache, EncoderOut, Transformer, TransformerLM

__all__ = [
    "KVCache", "MultiHeadAttention", "build_model", "count_parameters", "describe",
    "DecoderCache", "EncoderOut", "Transformer", "TransformerLM",
]
