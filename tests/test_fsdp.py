"""``trainer.shard_base``: the frozen base sharded with FSDP2 over 2 gloo processes gives the
same theta as 1 process, and each process holds half of the base's parameters.

Run as a script under torchrun, this file measures one process's memory for the base
(docs/distributed.md)::

    torchrun --nproc_per_node=2 tests/test_fsdp.py trainer.shard_base=true model.hidden_size=512 ...
"""
import os
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from metakernels.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from metakernels.config import ConfigError, load_config  # noqa: E402
from metakernels.distributed import check_shardable  # noqa: E402
from metakernels.train import Trainer  # noqa: E402
from test_distributed import _output, _torchrun  # noqa: E402

# two decoder layers, so that a layer's gathered weights are freed after its forward and
# gathered again for its backward while the other layer runs
ARGS = ["model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64",
        "meta.meta_batch_size=5", "data.support_size=2", "data.query_size=3",
        "meta.num_inner_steps=2", "trainer.total_steps=3", "trainer.save_every=3",
        "trainer.eval_every=0", "trainer.progress_bar=false", "trainer.loggers=[jsonl]"]
MEASURE = ["model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
           "meta.meta_batch_size=2", "data.support_size=2", "data.query_size=2",
           "meta.num_inner_steps=1", "trainer.total_steps=1", "trainer.eval_every=0",
           "trainer.progress_bar=false", "trainer.loggers=[]"]


def _equal_to_one_process(tmp_path, args):
    """Runs ``args`` on 2 processes with the sharded base and in this process unsharded; the
    thetas after the run must agree."""
    args = args + [f"trainer.output_dir={tmp_path}"]
    r = _torchrun(2, args + ["trainer.experiment_name=two", "trainer.shard_base=true"])
    assert r.returncode == 0, _output(r)
    assert "shard_base:" in r.stdout, _output(r)
    one = Trainer(load_config(None, args + ["trainer.experiment_name=one"]))
    theta0 = one.bank.theta.detach().clone()
    one.train()
    two = load_checkpoint(latest_checkpoint(tmp_path / "two"))[0]["theta"]
    ref = one.bank.theta.detach()
    assert float((ref - theta0).norm()) > 0
    assert float((two - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_sharded_base_two_processes_equal_one(tmp_path, algorithm):
    # 5 tasks over 2 processes: uneven shares (2 + 3), the same passes through the base
    _equal_to_one_process(tmp_path, ARGS + [f"meta.algorithm={algorithm}"])


# gpt2: Conv1D layers and an input embedding tied to the output layer (left whole)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sharded_load_equals_whole_load(tmp_path, family):
    # model.path with shard_base: each process reads only its rows of the checkpoint; the one
    # process of the reference loads it with from_pretrained
    from metakernels.data.tokenizer import load_tokenizer
    from metakernels.models import build_tiny_model

    tok = load_tokenizer(None)
    ckpt = tmp_path / "ckpt"
    build_tiny_model(family, seed=3, vocab_size=len(tok), hidden_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, intermediate_size=64,
                     initializer_range=0.1).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    _equal_to_one_process(tmp_path, ARGS + [f"model.path={ckpt}"])


def _measured(stdout: str) -> dict[int, dict[str, int]]:
    rows = {}
    for m in re.finditer(r"rank (\d+): (.*)", stdout):
        rows[int(m.group(1))] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return rows


def test_sharded_base_halves_the_parameters_per_process(tmp_path):
    runs = {}
    for n, extra in ((1, []), (2, ["trainer.shard_base=true"])):
        r = _torchrun_script(n, MEASURE + extra + [f"trainer.output_dir={tmp_path / str(n)}"])
        assert r.returncode == 0, _output(r)
        runs[n] = _measured(r.stdout)
        assert sorted(runs[n]) == list(range(n)), _output(r)
    whole = runs[1][0]["local_param_bytes"]
    # every parameter of the base model cut in two along dim 0 (the first share takes the odd
    # row); the output layer whole in every process (the loss reads its weight directly)
    model = Trainer(load_config(None, MEASURE + [f"trainer.output_dir={tmp_path / 'ref'}"])).model
    out = model.get_output_embeddings().weight
    first = sum(p.element_size() * (p.numel() if p is out else
                                    -(-p.shape[0] // 2) * (p.numel() // p.shape[0]))
                for p in model.parameters())
    assert runs[2][0]["local_param_bytes"] == first
    assert runs[2][1]["local_param_bytes"] <= first
    assert first < 0.6 * whole
    for n, rows in runs.items():
        for rank, row in rows.items():
            print(f"{n} process(es), rank {rank}: base parameters "
                  f"{row['local_param_bytes'] / 2**20:.2f} MiB, RSS added by building the "
                  f"trainer {row['build_rss_bytes'] / 2**20:.1f} MiB, peak RSS in training "
                  f"{row['train_peak_rss_bytes'] / 2**20:.1f} MiB")


def test_shard_base_needs_equal_passes_per_process():
    cfg = load_config(None, ["meta.meta_batch_size=5", "meta.task_chunk=2",
                             "trainer.shard_base=true"])
    with pytest.raises(ConfigError, match="different numbers of chunks"):
        check_shardable(cfg, 2)        # shares 2 and 3: one chunk and two
    check_shardable(load_config(None, ["meta.meta_batch_size=6", "meta.task_chunk=2",
                                       "trainer.shard_base=true"]), 2)
    with pytest.raises(ConfigError, match="needs several processes"):
        check_shardable(cfg, 1)
    with pytest.raises(ConfigError, match="fomaml and reptile"):
        load_config(None, ["meta.algorithm=maml", "trainer.shard_base=true"])


def _torchrun_script(nproc: int, args: list[str]):
    import subprocess

    from test_distributed import _free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------------------ measurement
def _status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (Linux) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(overrides: list[str]) -> None:
    """One process of a run: prints ``rank R: local_param_bytes=.. build_peak_rss_bytes=..
    build_rss_bytes=.. train_start_rss_bytes=.. train_peak_rss_bytes=.. last_step_us=..``: the
    base's parameters this process holds; the peak RSS while building the trainer (tokenizer,
    tasks, base, adapters; sharding or the sharded load) and the RSS it added, both above the RSS
    before; the RSS when training starts and its peak in training (the high-water mark reset
    once the trainer is built); the last meta-step's time."""
    import gc

    # imports and the process group are not the base's: set up before the first reading
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from metakernels import distributed as dist
    from metakernels import fused  # noqa: F401

    cfg = load_config(None, overrides)
    dist.init_from_env(cfg)
    rss0 = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    trainer = Trainer(cfg)
    build_peak = _status_bytes("VmHWM") - rss0
    gc.collect()
    built = _status_bytes("VmRSS") - rss0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM := VmRSS: the peak from here on
    start = _status_bytes("VmRSS")
    trainer.train()
    peak = _status_bytes("VmHWM")
    print(f"rank {trainer.rank}: local_param_bytes={dist.local_param_bytes(trainer.model)} "
          f"build_peak_rss_bytes={build_peak} build_rss_bytes={built} "
          f"train_start_rss_bytes={start} train_peak_rss_bytes={peak} "
          f"last_step_us={int(trainer.history[-1]['time_per_step'] * 1e6)}", flush=True)
    dist.shutdown(barrier=True)


if __name__ == "__main__":
    measure(sys.argv[1:])
