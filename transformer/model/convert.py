"""Exact conversion between Hugging Face's ``MarianMTModel`` and our :class:`Transformer`.

Marian (as ported to ``transformers``) is the paper's post-LN encoder-decoder with three differences
that matter for an exact port:

* its sinusoidal table is laid out ``[sin of every frequency | cos of every frequency]``, where the
  paper (and :func:`~transformer.model.embeddings.sinusoidal_table`) interleaves ``sin, cos, sin, ...``;
* a ``final_logits_bias`` is added to the logits;
* its defaults differ (``swish`` activation, no embedding scale, Marian's own special-token ids).

Positions, the design choice: the two tables hold the same numbers in a different column order, so
they differ by a fixed permutation P of the model width D. Every part of the network treats the D
channels of the residual stream symmetrically (LayerNorm statistics are sums over channels; every
Linear reading or writing the stream can have its columns or rows permuted), so permuting the
residual stream's channels everywhere gives the same function. :func:`from_marian` therefore rewrites
Marian's weights into the paper's channel order and the converted model uses our ordinary
``positional="sinusoidal"`` encoding: no extra flag, no trained position table, and the model can run
past Marian's ``max_position_embeddings`` if its config is changed. The same permutation, inverted, lets
:func:`to_marian` export a model we trained with the paper's encoding to Marian, whose saved checkpoints
always rebuild Marian's own table. (CTranslate2's converter also wants a Marian tokenizer beside the
weights for its vocabulary; that is not provided here.) ``positional="learned"``
instead copies Marian's table as it is into a learned table, with no permutation (bit-for-bit the same
weights, but the table becomes a trained parameter).

``transformers`` is an optional extra (``pip install .[hf]``) and is imported only inside functions.

    model, cfg = from_marian(MarianMTModel(marian_config))   # ours, same logits
    hf = to_marian(model)                                     # back again
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from transformer.config import ModelConfig
from transformer.data.vocab import BOS_ID, EOS_ID, PAD_ID
from transformer.errors import TransformerError
from transformer.model.embeddings import sinusoidal_table
from transformer.model.transformer import Transformer

if TYPE_CHECKING:  # pragma: no cover
    from transformers import MarianConfig, MarianMTModel

_ACTIVATIONS = ("relu", "gelu")  # names shared by ModelConfig.activation and transformers' ACT2FN

# How a tensor touches the residual stream, i.e. how the channel permutation applies to it.
_IN = "in"  # (.., D) input side: Linear weights reading the stream, embeddings, lm_head, position tables
_OUT = "out"  # (D, ..) or (D,) output side: Linear weights/biases writing the stream, LayerNorm weight/bias
_NONE = "none"  # untouched: q/k/v/fc1 biases, the logits bias


def marian_channel_order(d_model: int) -> Tensor:
    """Indices ``perm`` (D,) with ``paper_table == marian_table[:, perm]``.

    Marian keeps sin(frequency i) in column i and cos(frequency i) in column D/2 + i; the paper keeps
    them in columns 2i and 2i + 1.
    """
    if d_model % 2:
        raise TransformerError(f"Marian conversion needs an even d_model, got {d_model}")
    half = d_model // 2
    perm = torch.empty(d_model, dtype=torch.long)
    perm[0::2] = torch.arange(half)
    perm[1::2] = torch.arange(half, d_model)
    return perm


def _permute(t: Tensor, kind: str, perm: Optional[Tensor]) -> Tensor:
    """Express ``t`` in the channel order ``perm`` (None = keep the order)."""
    if perm is None or kind == _NONE:
        return t
    perm = perm.to(t.device)  # the model may live on a GPU
    if kind == _IN:
        return t.index_select(-1, perm)
    return t.index_select(0, perm)


def _attention_keys(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    keys = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        keys += [
            (f"{ours}.{proj}.weight", f"{theirs}.{proj}.weight", _IN),
            (f"{ours}.{proj}.bias", f"{theirs}.{proj}.bias", _NONE),
        ]
    keys += [
        (f"{ours}.out_proj.weight", f"{theirs}.out_proj.weight", _OUT),
        (f"{ours}.out_proj.bias", f"{theirs}.out_proj.bias", _OUT),
    ]
    return keys


def _norm_keys(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [(f"{ours}.weight", f"{theirs}.weight", _OUT), (f"{ours}.bias", f"{theirs}.bias", _OUT)]


def _ffn_keys(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [
        (f"{ours}.ffn.fc1.weight", f"{theirs}.fc1.weight", _IN),
        (f"{ours}.ffn.fc1.bias", f"{theirs}.fc1.bias", _NONE),
        (f"{ours}.ffn.fc2.weight", f"{theirs}.fc2.weight", _OUT),
        (f"{ours}.ffn.fc2.bias", f"{theirs}.fc2.bias", _OUT),
    ]


def _key_map(cfg: ModelConfig, learned_positions: bool) -> list[tuple[str, str, str]]:
    """(our state-dict key, MarianMTModel state-dict key, kind) for every tensor we hold."""
    keys = [
        ("encoder.embed_tokens.weight", "model.encoder.embed_tokens.weight", _IN),
        ("decoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", _IN),
        ("output.lm_head.weight", "lm_head.weight", _IN),
    ]
    if learned_positions:
        keys += [
            ("encoder.embed_positions.weight", "model.encoder.embed_positions.weight", _IN),
            ("decoder.embed_positions.weight", "model.decoder.embed_positions.weight", _IN),
        ]
    for i in range(cfg.n_encoder_layers):
        o, t = f"encoder.layers.{i}", f"model.encoder.layers.{i}"
        keys += _attention_keys(f"{o}.self_attn", f"{t}.self_attn")
        keys += _norm_keys(f"{o}.self_attn_norm", f"{t}.self_attn_layer_norm")
        keys += _ffn_keys(o, t) + _norm_keys(f"{o}.ffn_norm", f"{t}.final_layer_norm")
    for i in range(cfg.n_decoder_layers):
        o, t = f"decoder.layers.{i}", f"model.decoder.layers.{i}"
        keys += _attention_keys(f"{o}.self_attn", f"{t}.self_attn")
        keys += _norm_keys(f"{o}.self_attn_norm", f"{t}.self_attn_layer_norm")
        keys += _attention_keys(f"{o}.cross_attn", f"{t}.encoder_attn")
        keys += _norm_keys(f"{o}.cross_attn_norm", f"{t}.encoder_attn_layer_norm")
        keys += _ffn_keys(o, t) + _norm_keys(f"{o}.ffn_norm", f"{t}.final_layer_norm")
    return keys


def model_config_from_marian(hf_config: "MarianConfig", positional: str = "sinusoidal") -> ModelConfig:
    """Our :class:`ModelConfig` for a ``MarianConfig``.

    Raises:
        TransformerError: for what our model cannot express.
    """
    c = hf_config
    if positional not in ("sinusoidal", "learned"):
        raise TransformerError(f"positional must be 'sinusoidal' or 'learned', got {positional!r}")
    if c.encoder_attention_heads != c.decoder_attention_heads or c.encoder_ffn_dim != c.decoder_ffn_dim:
        raise TransformerError(
            "Marian conversion: encoder and decoder must have the same heads and ffn width, got "
            f"heads {c.encoder_attention_heads}/{c.decoder_attention_heads}, "
            f"ffn {c.encoder_ffn_dim}/{c.decoder_ffn_dim}"
        )
    if c.activation_function not in _ACTIVATIONS:
        raise TransformerError(
            f"Marian conversion: activation_function {c.activation_function!r} is not supported; "
            f"our model has {', '.join(_ACTIVATIONS)}"
        )
    ids = {
        "pad_token_id": (c.pad_token_id, PAD_ID),
        "eos_token_id": (c.eos_token_id, EOS_ID),
        "decoder_start_token_id": (c.decoder_start_token_id, BOS_ID),
    }
    for name, (theirs, ours) in ids.items():
        if theirs != ours:
            raise TransformerError(
                f"Marian conversion: {name} is {theirs!r} but our vocabulary uses {ours} "
                "(PAD=0, UNK=1, BOS=2, EOS=3); remap the vocabulary first"
            )
    return ModelConfig(
        arch="transformer",
        d_model=c.d_model,
        n_heads=c.encoder_attention_heads,
        d_ff=c.encoder_ffn_dim,
        n_encoder_layers=c.encoder_layers,
        n_decoder_layers=c.decoder_layers,
        dropout=float(c.dropout),
        attention_dropout=float(c.attention_dropout),
        activation_dropout=float(c.activation_dropout),
        activation=c.activation_function,
        norm_first=False,
        positional=positional,
        max_positions=c.max_position_embeddings,
        tie_embeddings=bool(c.tie_word_embeddings),
        scale_embeddings=bool(c.scale_embedding),
        layer_norm_eps=1e-5,  # Marian's nn.LayerNorm default
        final_logits_bias=True,
    )


@torch.no_grad()
def from_marian(hf_model: "MarianMTModel", positional: str = "sinusoidal") -> tuple[Transformer, ModelConfig]:
    """Convert a ``MarianMTModel`` into our :class:`Transformer` computing the same function.

    Args:
        hf_model: a ``transformers.MarianMTModel`` whose special ids are ours (pad 0, eos 3, decoder start 2).
        positional: ``"sinusoidal"`` (default) permutes the model-width channels so that Marian's
            ``[sin | cos]`` table becomes the paper's interleaved one; ``"learned"`` copies Marian's
            table into a learned table unchanged.

    Returns:
        (model in eval mode, its ModelConfig). Weights sharing follows Marian's: source/target
        embeddings shared when ``share_encoder_decoder_embeddings`` and ``lm_head`` tied when
        ``tie_word_embeddings``.

    Raises:
        TransformerError: a Marian feature we do not have (activation, unequal encoder/decoder widths,
            other special-token ids, a position table that is not Marian's sinusoid).
    """
    c = hf_model.config
    cfg = model_config_from_marian(c, positional)
    shared = bool(c.share_encoder_decoder_embeddings)
    src_vocab, tgt_vocab = c.vocab_size, (c.vocab_size if shared else c.decoder_vocab_size)
    model = Transformer(cfg, src_vocab, tgt_vocab, shared_vocab=shared)
    theirs = hf_model.state_dict()
    learned = positional == "learned"
    perm = None
    if not learned:
        perm = marian_channel_order(cfg.d_model)
        for side in ("encoder", "decoder"):
            table = theirs[f"model.{side}.embed_positions.weight"].float().index_select(-1, perm)
            expected = sinusoidal_table(table.size(0), cfg.d_model)
            if not torch.allclose(table, expected, atol=1e-5):
                raise TransformerError(
                    f"Marian conversion: the {side}'s position table is not Marian's sinusoid; use positional='learned'"
                )
    ours = model.state_dict()
    for our_key, their_key, kind in _key_map(cfg, learned):
        ours[our_key].copy_(_permute(theirs[their_key], kind, perm))
    ours["output.final_logits_bias"].copy_(theirs["final_logits_bias"].reshape(-1))
    return model.to(next(hf_model.parameters()).dtype).eval(), cfg


def marian_config(
    cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, shared: bool, tied: bool
) -> "MarianConfig":
    """The ``MarianConfig`` for our architecture, with our special ids (needs ``transformers``)."""
    from transformers import MarianConfig

    if cfg.arch != "transformer":
        raise TransformerError("Marian export: only the encoder-decoder (model.arch=transformer) has a Marian form")
    if cfg.norm_first:
        raise TransformerError(
            "Marian export: Marian is post-LayerNorm; a model.norm_first=true model cannot be exported"
        )
    if cfg.layer_norm_eps != 1e-5:
        raise TransformerError(f"Marian export: Marian's LayerNorm eps is 1e-5, the model has {cfg.layer_norm_eps}")
    return MarianConfig(
        vocab_size=src_vocab_size,
        decoder_vocab_size=tgt_vocab_size,
        share_encoder_decoder_embeddings=shared,
        tie_word_embeddings=tied,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function=cfg.activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout,
        max_position_embeddings=cfg.max_positions,
        scale_embedding=cfg.scale_embeddings,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        decoder_start_token_id=BOS_ID,
        forced_eos_token_id=None,
    )


@torch.no_grad()
def to_marian(model: Transformer, cfg: Optional[ModelConfig] = None) -> "MarianMTModel":
    """Export our :class:`Transformer` to a ``transformers.MarianMTModel`` computing the same function.

    Sinusoidal models are permuted into Marian's channel order (see the module docstring), so the
    result survives ``save_pretrained`` / ``from_pretrained``. A model with
    learned positions has its table copied into Marian's position embeddings: exact in memory, but
    ``save_pretrained`` does not save that table (Marian rebuilds its sinusoid on load).

    Raises:
        TransformerError: pre-LN, a decoder-only model, a LayerNorm eps other than 1e-5, or source and
            target embeddings shared while ``lm_head`` is not tied (a layout Marian lacks).
    """
    from transformers import MarianMTModel

    if not isinstance(model, Transformer):
        raise TransformerError("Marian export: only the encoder-decoder (model.arch=transformer) has a Marian form")
    cfg = cfg or model.cfg
    enc_emb = model.encoder.embed_tokens.weight
    dec_emb = model.decoder.embed_tokens.weight
    shared = enc_emb is dec_emb
    tied = model.output.lm_head.weight is dec_emb
    if shared and not tied:
        raise TransformerError("Marian export: shared source/target embeddings need a tied lm_head in Marian")
    hf_cfg = marian_config(cfg, enc_emb.size(0), dec_emb.size(0), shared, tied)
    hf_model = MarianMTModel(hf_cfg).eval()
    theirs = hf_model.state_dict()
    ours = model.state_dict()
    learned = cfg.positional == "learned"
    perm = None if learned else torch.argsort(marian_channel_order(cfg.d_model))  # ours -> Marian's order
    for our_key, their_key, kind in _key_map(cfg, learned):
        theirs[their_key].copy_(_permute(ours[our_key].float(), kind, perm))
    if shared:
        theirs["model.shared.weight"].copy_(_permute(ours["encoder.embed_tokens.weight"].float(), _IN, perm))
    bias = ours.get("output.final_logits_bias")
    if bias is not None:
        theirs["final_logits_bias"].copy_(bias.reshape(1, -1))
    else:
        theirs["final_logits_bias"].zero_()
    return hf_model.to(enc_emb.dtype)


__all__ = ["from_marian", "to_marian", "model_config_from_marian", "marian_config", "marian_channel_order"]
