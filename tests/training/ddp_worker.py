"""Run by test_distributed.py under ``python -m torch.distributed.run --nproc-per-node 2``."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from training_helpers import copy_task, ddp_config  # noqa: E402

from transformer.training import train  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
result = train(ddp_config(out / "run", update_freq=1), data=copy_task())
if torch.distributed.is_initialized():
    raise SystemExit("the process group should be destroyed when train() returns")
import os  # noqa: E402

if os.environ.get("RANK") == "0":
    (out / "losses.json").write_text(json.dumps({"losses": result.losses, "valid": result.valid[-1]["loss"]}))
