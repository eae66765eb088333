"""Frozen dataclass configs with YAML files, dotted CLI overrides, validation and presets.

A run is described by one :class:`Config` with four sections (``model``, ``data``, ``train``,
``decode``). It is read from YAML, overridden with ``section.field=value`` strings, validated across
fields, and saved resolved in the run directory.

    cfg = load_config("configs/bible_en_de.yaml", ["model.dropout=0.2", "train.max_steps=100"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from transformer.errors import TransformerError


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. Defaults are the paper's base model (Table 3)."""

    arch: str = "transformer"  # "transformer" (encoder-decoder) or "lm" (decoder-only)
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6  # ignored by "lm"
    n_decoder_layers: int = 6
    dropout: float = 0.1  # on embeddings+positions and every sub-layer output (P_drop)
    attention_dropout: float = 0.0  # on attention weights (the paper: none)
    activation_dropout: float = 0.0  # inside the feed-forward, after the activation
    activation: str = "relu"  # "relu" (the paper) or "gelu"
    norm_first: bool = False  # False = post-LayerNorm (the paper); True = pre-LayerNorm
    positional: str = "sinusoidal"  # "sinusoidal" (the paper) or "learned"
    max_positions: int = 1024
    tie_embeddings: bool = True  # share target embedding and output projection (and source, if joint vocab)
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (the paper, section 3.4)
    layer_norm_eps: float = 1e-5
    final_logits_bias: bool = False  # a learned bias on the logits (Marian has one)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    dataset: str = "bible"  # "bible", "multi30k", "files" (translation); "shakespeare", "text" (LM)
    src_lang: str = "en"
    tgt_lang: str = "de"
    path: Optional[str] = None  # folder (multi30k, files, text) or None for built-in offline data
    train_prefix: str = "train"  # "files": {path}/{train_prefix}.{src_lang}
    valid_prefix: str = "val"
    test_prefix: Optional[str] = "test_2017_flickr"
    vocab_size: int = 8000
    tokenizer_type: str = "bpe"  # "bpe" or "unigram" (SentencePiece)
    joint_vocab: bool = True  # one vocabulary for both sides (the paper); False = separate
    max_tokens: int = 4096  # tokens per batch, per side, padding included (as fairseq)
    max_len: int = 256  # longer examples (in subword tokens) are filtered, counted and reported
    max_chars: int = 2000  # longer lines (in characters) are filtered before tokenisation
    cache_dir: Optional[str] = None  # binary token cache; default: {run_dir}/data
    num_workers: int = 0  # encoding processes; 0 = all cores
    max_train_examples: Optional[int] = None  # take only the first N training examples (for quick runs)
    block_size: int = 256  # LM: tokens per training sequence
    src_translation: Optional[str] = None  # bible: a translation id from data/datasets.py (None = preferred)
    tgt_translation: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's (section 5)."""

    seed: int = 1
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1"
    lr_schedule: str = "noam"  # "noam" (the paper), "inverse_sqrt" (fairseq), "cosine", "constant"
    lr_scale: float = 1.0  # noam: lr = lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    lr: float = 5e-4  # peak rate for inverse_sqrt, cosine and constant
    min_lr: float = 0.0  # floor for cosine
    warmup_steps: int = 4000
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0 = no gradient clipping
    update_freq: int = 1  # gradient accumulation: batches per optimizer step
    max_steps: int = 100_000  # optimizer steps
    max_epochs: Optional[int] = None
    time_limit_minutes: Optional[float] = None  # stop (and save) after this much wall time
    precision: str = "fp32"  # "fp32", "bf16" (autocast), "fp16" (CUDA, with a grad scaler)
    compile: bool = False  # torch.compile the model
    keep_freed_memory: bool = True  # CPU, glibc: large blocks from the heap, freed memory kept (fewer page faults)
    log_every: int = 50
    valid_every: int = 1000
    save_every: int = 1000
    keep_last: int = 5
    patience: int = 0  # early stopping after this many validations without improvement; 0 = off
    best_metric: str = "loss"  # "loss" or "bleu"
    bleu_subset: int = 200  # validation sentences decoded greedily for BLEU; 0 = no BLEU
    max_bad_steps: int = 5  # consecutive NaN/inf losses before training stops
    average_last: int = 0  # average the last N checkpoints at the end; 0 = off


# the values of decode.length_penalty_form (see DecodeConfig), one list for the config's check, the searches
# (decoding.common.length_penalty) and the CLI's choices
LENGTH_PENALTY_FORMS = ("gnmt", "power")


@dataclass(frozen=True)
class DecodeConfig:
    """Search and sampling settings. Defaults are the paper's (section 6.1)."""

    beam: int = 4
    length_penalty: float = 0.6  # alpha, the length penalty's exponent
    # "gnmt": ((5 + len) / 6) ** alpha, the paper's; "power": len ** alpha (fairseq, Hugging Face, CTranslate2)
    length_penalty_form: str = "gnmt"
    max_len_a: float = 1.0  # maximum output length = a * source length + b
    max_len_b: int = 50
    nbest: int = 1
    max_tokens: int = 4096  # source tokens per batch when translating a file
    max_input_len: Optional[int] = None  # longer inputs: truncated, with a warning (None = model limit)
    long_input: str = "truncate"  # inputs over the limit: "truncate" (with a warning) or "error"
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 200
    keep_freed_memory: bool = True  # CPU, glibc: large blocks from the heap, freed memory kept (fewer page faults)


@dataclass(frozen=True)
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    run_dir: str = "runs/default"
    preset: Optional[str] = None  # a model preset applied before the model section's own fields


# --- presets ----------------------------------------------------------------------------------------

PRESETS: dict[str, ModelConfig] = {
    # "Attention Is All You Need", Table 3.
    "base": ModelConfig(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "big": ModelConfig(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    # CPU-friendly sizes.
    "small": ModelConfig(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1),
    "tiny": ModelConfig(d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1),
}


def preset(name: str) -> ModelConfig:
    """The named model preset (``base``, ``big``, ``small``, ``tiny``)."""
    if name not in PRESETS:
        raise TransformerError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# --- validation -------------------------------------------------------------------------------------

_CHOICES = {
    "model.arch": ("transformer", "lm"),
    "model.activation": ("relu", "gelu"),
    "model.positional": ("sinusoidal", "learned"),
    "data.dataset": ("bible", "multi30k", "files", "shakespeare", "text"),
    "data.tokenizer_type": ("bpe", "unigram"),
    "train.lr_schedule": ("noam", "inverse_sqrt", "cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.best_metric": ("loss", "bleu"),
    "decode.long_input": ("truncate", "error"),
    "decode.length_penalty_form": LENGTH_PENALTY_FORMS,
}


def validate(cfg: Config) -> Config:
    """Check values within and across fields; raise :class:`TransformerError` naming the field."""
    m, d, t, dec = cfg.model, cfg.data, cfg.train, cfg.decode
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise TransformerError(f"config field {key}: {value!r} is not one of {', '.join(choices)}")
    positive = {
        "model.d_model": m.d_model, "model.n_heads": m.n_heads, "model.d_ff": m.d_ff,
        "model.n_decoder_layers": m.n_decoder_layers, "model.max_positions": m.max_positions,
        "data.vocab_size": d.vocab_size, "data.max_tokens": d.max_tokens, "data.max_len": d.max_len,
        "data.max_chars": d.max_chars, "data.block_size": d.block_size,
        "train.update_freq": t.update_freq, "train.max_steps": t.max_steps, "train.log_every": t.log_every,
        "train.valid_every": t.valid_every, "train.save_every": t.save_every, "train.keep_last": t.keep_last,
        "train.max_bad_steps": t.max_bad_steps, "decode.beam": dec.beam, "decode.nbest": dec.nbest,
        "decode.max_tokens": dec.max_tokens, "decode.max_new_tokens": dec.max_new_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise TransformerError(f"config field {key}: must be positive, got {value}")
    if m.arch == "transformer" and m.n_encoder_layers <= 0:
        raise TransformerError(f"config field model.n_encoder_layers: must be positive, got {m.n_encoder_layers}")
    if m.d_model % m.n_heads:
        raise TransformerError(
            f"config field model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}"
        )
    if m.positional == "sinusoidal" and m.d_model % 2:
        raise TransformerError(f"config field model.d_model: sinusoidal positions need an even width, got {m.d_model}")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        value = getattr(m, key)
        if not 0.0 <= value < 1.0:
            raise TransformerError(f"config field model.{key}: must be in [0, 1), got {value}")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise TransformerError(f"config field train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    if t.warmup_steps < 0:
        raise TransformerError(f"config field train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.lr_schedule == "noam" and t.warmup_steps == 0:
        raise TransformerError("config field train.warmup_steps: the noam schedule needs warmup_steps > 0")
    if t.lr <= 0 or t.lr_scale <= 0:
        raise TransformerError("config fields train.lr and train.lr_scale must be positive")
    if not (0.0 <= t.adam_betas[0] < 1.0 and 0.0 <= t.adam_betas[1] < 1.0):
        raise TransformerError(f"config field train.adam_betas: each must be in [0, 1), got {t.adam_betas}")
    if dec.nbest > dec.beam:
        raise TransformerError(f"config field decode.nbest: {dec.nbest} is larger than decode.beam={dec.beam}")
    if not 0.0 < dec.top_p <= 1.0:
        raise TransformerError(f"config field decode.top_p: must be in (0, 1], got {dec.top_p}")
    if dec.temperature <= 0:
        raise TransformerError(f"config field decode.temperature: must be positive, got {dec.temperature}")
    if d.dataset in ("shakespeare", "text") and m.arch != "lm":
        raise TransformerError(
            f"config field data.dataset: {d.dataset!r} is monolingual text; it needs model.arch=lm"
        )
    if d.dataset in ("bible", "multi30k", "files") and m.arch != "transformer":
        raise TransformerError(
            f"config field data.dataset: {d.dataset!r} is parallel text; it needs model.arch=transformer"
        )
    if m.arch == "lm" and d.block_size > m.max_positions:
        raise TransformerError(
            f"config field data.block_size: {d.block_size} exceeds model.max_positions={m.max_positions}"
        )
    return cfg


# --- dict / YAML conversion -------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (as a string-free type), converting where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except TransformerError as exc:
                errors.append(str(exc))
        raise TransformerError(errors[0] if errors else f"config field {where}: bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise TransformerError(f"config field {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TransformerError(f"config field {where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TransformerError(f"config field {where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TransformerError(f"config field {where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TransformerError(f"config field {where}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, where: str = "") -> Any:
    if not isinstance(data, dict):
        raise TransformerError(f"config section {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise TransformerError(f"unknown config field {name!r}; known fields here: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists), ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: to_dict(getattr(cfg, f.name)) if dataclasses.is_dataclass(getattr(cfg, f.name)) else plain(getattr(cfg, f.name))
        for f in fields(cfg)
    }


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a nested dict (a preset, if named, fills the model first)."""
    data = dict(data or {})
    preset_name = data.get("preset")
    if preset_name is not None:
        base = to_dict(preset(str(preset_name)))
        base.update(data.get("model") or {})
        data["model"] = base
    return validate(_from_dict(Config, data))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.max_steps=100"`` -> (["train", "max_steps"], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise TransformerError(f"override {text!r} is not of the form section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``section.field=value`` overrides to a nested dict, in order."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TransformerError(f"override {text!r}: {part!r} is not a config section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise TransformerError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TransformerError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TransformerError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate.

    Raises:
        TransformerError: missing file, invalid YAML, unknown field, wrong type, impossible value.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return config_from_dict(data)
    except TransformerError as exc:
        if path is not None:
            raise TransformerError(f"{path}: {exc}") from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


__all__ = [
    "Config", "ModelConfig", "DataConfig", "TrainConfig", "DecodeConfig", "PRESETS", "preset",
    "validate", "load_config", "save_config", "config_from_dict", "to_dict", "apply_overrides", "replace",
]
