"""One place that turns a :class:`ModelConfig` into a model, and describes it."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from transformer.config import ModelConfig
from transformer.model.transformer import Transformer, TransformerLM

Model = Union[Transformer, TransformerLM]


def build_model(
    cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: Optional[int] = None, shared_vocab: Optional[bool] = None
) -> Model:
    """A ``Transformer`` (``cfg.arch == "transformer"``) or a ``TransformerLM`` (``"lm"``, uses ``src_vocab_size``)."""
    if cfg.arch == "lm":
        return TransformerLM(cfg, src_vocab_size)
    return Transformer(cfg, src_vocab_size, tgt_vocab_size or src_vocab_size, shared_vocab)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: nn.Module, cfg: ModelConfig) -> str:
    """A readable summary: the config, the module tree, and parameter counts by part."""
    seen: set[int] = set()

    def unique(module: nn.Module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    lines = [f"{type(model).__name__}: {cfg}", ""]
    parts = [(name, unique(child)) for name, child in model.named_children()]
    for name, n in parts:
        lines.append(f"  {name:<10} {n:>14,d} parameters")
    lines.append(f"  {'total':<10} {count_parameters(model):>14,d} parameters ({count_parameters(model) / 1e6:.1f}M)")
    return "\n".join(lines)
