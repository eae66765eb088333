"""Suite-wide settings: the tests run tiny models, where one intra-op thread is fastest, and far faster on
a busy 2-core machine (OpenMP threads spin when the cores are shared); no progress bars in test output."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
