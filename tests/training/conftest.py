import os

import torch

# Tiny models: one thread is fastest and avoids OpenMP spinning on a busy machine.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
