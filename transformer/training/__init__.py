"""Training: the loss, optimiser and schedules, the loop, checkpoints, metric logging, DDP."""

from transformer.training.checkpoint import average_checkpoints, load_model
from transformer.training.loss import label_smoothed_nll_loss
from transformer.training.optim import build_optimizer, lr_at
from transformer.training.trainer import TrainResult, train

__all__ = ["train", "TrainResult", "label_smoothed_nll_loss", "lr_at", "build_optimizer", "load_model",
           "average_checkpoints"]
