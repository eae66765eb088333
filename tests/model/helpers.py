"""What the model tests share: a small encoder-decoder with non-zero biases (frozen and static decoding)."""

import torch

from transformer.config import ModelConfig
from transformer.model import Transformer


def biased_transformer(cfg: ModelConfig, vocab: int, device: str = "cpu") -> Transformer:
    """A seeded ``Transformer`` in eval mode with biases drawn from N(0, 0.1): a dropped or misplaced bias shows."""
    torch.manual_seed(0)
    model = Transformer(cfg, vocab, vocab).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(device)
