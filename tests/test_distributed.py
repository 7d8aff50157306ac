"""Two processes (gloo) give the same theta as one process on the same tasks."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.config import load_config
from metakernels.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
        "meta.meta_batch_size=5", "data.support_size=2", "data.query_size=3",
        "meta.num_inner_steps=2", "trainer.total_steps=2", "trainer.save_every=2",
        "trainer.progress_bar=false", "trainer.loggers=[jsonl]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m",
           "metakernels.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _output(r: subprocess.CompletedProcess) -> str:
    """A failed run's exit code and whole output: the first rank's traceback may come long
    before the launcher's own report of the failure at the end of stderr."""
    return f"exit code {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_two_processes_equal_one(tmp_path, algorithm):
    # 5 tasks over 2 processes: uneven shares (2 + 3)
    args = ARGS + [f"meta.algorithm={algorithm}", f"trainer.output_dir={tmp_path}"]
    r = _torchrun(2, args + ["trainer.experiment_name=two"])
    assert r.returncode == 0, _output(r)
    one = Trainer(load_config(None, args + ["trainer.experiment_name=one"]))
    one.train()
    two = load_checkpoint(latest_checkpoint(tmp_path / "two"))[0]["theta"]
    ref = one.bank.theta.detach()
    assert float((two - ref).norm() / ref.norm()) < 1e-5


def test_more_processes_than_tasks_is_a_clear_error(tmp_path):
    r = _torchrun(2, ARGS + ["meta.meta_batch_size=1", f"trainer.output_dir={tmp_path}"])
    assert r.returncode != 0
    assert "meta.meta_batch_size=1 is smaller than the 2 processes" in r.stderr


def test_processes_with_different_configs_fail(tmp_path):
    script = ("import os, sys\n"
              "from metakernels import train\n"
              "lr = '0.1' if os.environ['RANK'] == '0' else '0.2'\n"
              "sys.exit(train.main(sys.argv[1:] + ['meta.inner_lr=' + lr]))\n")
    (tmp_path / "mismatch.py").write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(tmp_path / "mismatch.py"), *ARGS, f"trainer.output_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "started with different configs" in r.stderr
