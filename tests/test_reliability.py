"""Non-finite numbers and interrupted checkpoint writes do not cost the run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakernels import train
from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.lora import inject
from metakernels.meta import InnerConfig, fomaml_step
from metakernels.meta.common import task_losses
from metakernels.models import build_tiny_model

from conftest import MODEL_SUMS, assert_close, random_batch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
         "meta.meta_batch_size=3", "data.support_size=2", "data.query_size=2",
         "meta.num_inner_steps=2", "trainer.progress_bar=false", "trainer.loggers=[jsonl]"]


def test_a_task_with_non_finite_loss_is_dropped():
    model = build_tiny_model("llama", vocab_size=41, hidden_size=32, num_layers=1, num_heads=4)
    bank = inject(model, ["q_proj", "v_proj"], rank=2, alpha=4, num_tasks=3)
    with torch.no_grad():
        bank.theta.add_(torch.randn_like(bank.theta) * 0.1)
    support, query = random_batch([2, 3, 2], 41, seed=1), random_batch([2, 2, 1], 41, seed=2)
    cfg = InnerConfig(lr=0.1, num_steps=2)
    poison = torch.tensor([1.0, float("nan"), 1.0])
    got = fomaml_step(model, bank, support, query, cfg,
                      loss_fn=lambda *a: task_losses(*a) * poison)
    assert got.dropped.tolist() == [False, True, False]
    assert torch.isfinite(got.meta_grad).all()
    # the same as running the two healthy tasks alone
    s2 = support.select(0, 1), support.select(2, 3)
    q2 = query.select(0, 1), query.select(2, 3)
    parts = [fomaml_step(model, bank, s, q, cfg).meta_grad for s, q in zip(s2, q2)]
    assert_close(got.meta_grad, (parts[0] + parts[1]) / 2, reduction=MODEL_SUMS)


def test_non_finite_meta_gradients_skip_steps_then_stop_with_the_checkpoint_intact(
        tmp_path, monkeypatch):
    real = train.Trainer._local_step

    def poisoned(self, support, query):
        res = real(self, support, query)
        if self.step >= 2:
            res.meta_grad = res.meta_grad * float("nan")
        return res

    monkeypatch.setattr(train.Trainer, "_local_step", poisoned)
    args = SMALL + [f"trainer.output_dir={tmp_path}", "trainer.total_steps=20",
                    "trainer.save_every=2", "trainer.max_nonfinite_steps=3"]
    with pytest.warns(UserWarning, match="non-finite meta-gradient"):
        assert train.main(args) == 1
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path / "default"))
    assert torch.isfinite(tensors["theta"]).all()
    # steps 2..5 were skipped; theta stayed what it was after step 1
    assert meta["step"] in (4, 6)
    ckpts = sorted((tmp_path / "default" / "checkpoints").glob("step_*"))
    thetas = [load_checkpoint(c)[0]["theta"] for c in ckpts]
    assert all(torch.equal(t, thetas[0]) for t in thetas)


KILL_DURING_SAVE = """
import os, sys
import metakernels.checkpoint as ck
real = ck.save_file
def dying_save(tensors, path, metadata=None):
    if '{step}' in path:
        with open(path, 'wb') as f:
            f.write(b'partial')   # half a file, then the process is killed
        os._exit(9)
    return real(tensors, path, metadata=metadata)
ck.save_file = dying_save
from metakernels import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_then_resume(tmp_path):
    args = SMALL + [f"trainer.output_dir={tmp_path}", "trainer.total_steps=6",
                    "trainer.save_every=2"]
    assert train.main(args + ["trainer.experiment_name=full"]) == 0
    script = tmp_path / "dying.py"
    script.write_text(KILL_DURING_SAVE.replace("{step}", "step_00000004"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(script), *args, "trainer.experiment_name=broken"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 9, r.stderr[-2000:]
    run = tmp_path / "broken"
    assert latest_checkpoint(run).name == "step_00000002"  # the torn write is not picked up
    assert train.main(args + ["trainer.experiment_name=broken", "trainer.resume=true"]) == 0
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))[0]["theta"]
    b = load_checkpoint(latest_checkpoint(run))[0]["theta"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_rows_is_isfinite_all(dtype):
    """finite_rows says exactly what isfinite(x).all(1) says: NaN, +inf and -inf anywhere in a
    row, alone or together, make it False; rows of the largest finite values (whose sums
    overflow, in any dtype) and zeros keep it True; a row of no values is finite."""
    from metakernels.meta.common import finite_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1001, generator=g, dtype=dtype)
    big = torch.finfo(dtype).max
    x[1, 17] = float("nan")
    x[2, 1000] = float("inf")
    x[3, 0] = -float("inf")
    x[4] = big
    x[5, ::2] = -big
    x[6] = 0.0
    x[7, 3], x[7, 4] = float("inf"), -float("inf")
    assert finite_rows(x).tolist() == torch.isfinite(x).all(dim=1).tolist() == [
        True, False, False, False, True, True, True, False, True]
    assert finite_rows(x[:, :0]).tolist() == [True] * 9
