import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_helpers import copy_task, ddp_config
from transformer.data.batching import sampler_for
from transformer.training import train

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_update_freq_2(tmp_path):
    """2 processes x update_freq 1 == 1 process x update_freq 2 on the same batches (losses to 1e-5).

    Rank r takes batches r, r+2, ... of the shuffled epoch; one process with update_freq=2 takes the same
    two batches per update. The loss is normalised by the tokens of both in each case.
    """
    data = copy_task()
    assert len(sampler_for(data.train, 48)) >= 12  # 6 updates x 2 batches stay inside the first epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "ddp_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "losses.json").read_text())

    single = train(ddp_config(tmp_path / "single", update_freq=2), data=data)
    assert len(ddp["losses"]) == len(single.losses) == 6
    for a, b in zip(ddp["losses"], single.losses):
        assert a == pytest.approx(b, abs=1e-5)
    assert ddp["valid"] == pytest.approx(single.valid[-1]["loss"], abs=1e-5)
    # only rank 0 wrote the run directory
    assert (tmp_path / "run/checkpoints/step_00000006").is_dir()


def test_each_process_takes_the_gpu_of_its_local_rank_and_too_few_gpus_are_named(monkeypatch):
    from transformer.errors import TransformerError
    from transformer.training.distributed import DistInfo, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    second = DistInfo(rank=1, world_size=2, local_rank=1)
    assert resolve_device("cuda", second) == torch.device("cuda:1")
    assert resolve_device("auto", second) == torch.device("cuda:1")
    assert resolve_device("cuda:0", second) == torch.device("cuda:0")  # a named GPU is kept
    assert resolve_device("cpu", second) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TransformerError, match=r"train.device.*process 1 sees 1 CUDA device.*--nproc-per-node"):
        resolve_device("auto", second)
