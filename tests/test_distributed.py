"""Two processes (gloo) give the same theta as one process on the same tasks."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakernels.checkpoint import latest_checkpoint, load_checkpoint
from metakernels.config import ConfigError, load_config
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


def test_a_frozen_process_is_named(tmp_path):
    # rank 1 stops answering (alive, not killed) at its second step: rank 0 must give up after
    # trainer.collective_timeout_s and name it, and the launcher then stops rank 1
    script = ("import os, sys, time\n"
              "from metakernels import train\n"
              "if os.environ['RANK'] == '1':\n"
              "    step = train.Trainer.train_step\n"
              "    def frozen(self):\n"
              "        if self.step == 1:\n"
              "            time.sleep(300)\n"
              "        return step(self)\n"
              "    train.Trainer.train_step = frozen\n"
              "sys.exit(train.main(sys.argv[1:]))\n")
    (tmp_path / "frozen.py").write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(tmp_path / "frozen.py"), *ARGS, "trainer.total_steps=3", "trainer.eval_every=0",
           "trainer.collective_timeout_s=3", f"trainer.output_dir={tmp_path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode != 0, _output(r)
    assert ("error: rank 0: rank 1 did not answer within trainer.collective_timeout_s=3 s"
            in r.stderr), _output(r)


# ------------------------------------------------- collectives on the device their group takes
# No GPU here: a fake torch.distributed world whose default group is NCCL checks that every
# collective gets what its backend takes: gloo host tensors, NCCL accelerator tensors, for
# which the meta device stands in (a CPU tensor given to NCCL is the failure being guarded).
ACCEL = "meta"


class StopAtCollective(Exception):
    """Raised by the fake all-reduce of a meta tensor: it has no values to read back."""


class FakeWorld:
    def __init__(self, monkeypatch):
        import torch.distributed as dist

        self.inits, self.groups, self.calls, self.devices = [], [], [], []
        self.initialized = False
        fake = {"is_available": lambda: True, "is_initialized": lambda: self.initialized,
                "init_process_group": self.init_process_group, "new_group": self.new_group,
                "get_backend": self.get_backend, "get_rank": lambda group=None: 0,
                "get_world_size": lambda group=None: 2, "all_reduce": self.all_reduce,
                "monitored_barrier": self.monitored_barrier, "barrier": self.barrier,
                "destroy_process_group": self.destroy}
        for name, fn in fake.items():
            monkeypatch.setattr(dist, name, fn)
        monkeypatch.setattr(torch.cuda, "set_device", self.devices.append)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "1")

    def init_process_group(self, backend, timeout=None, **kw):
        self.inits.append((backend, timeout))
        self.initialized = True

    def new_group(self, backend=None, timeout=None, **kw):
        group = ("group", backend, timeout)
        self.groups.append(group)
        return group

    def get_backend(self, group=None):
        return self.inits[-1][0] if group is None else group[1]

    def _check(self, op, t, group):
        backend = self.get_backend(group)
        want = {"gloo": "cpu", "nccl": ACCEL}[backend]
        assert t.device.type == want, f"{op} of a {t.device.type} tensor on {backend}"
        self.calls.append((op, backend, t.device.type, t.numel()))

    def all_reduce(self, t, op=None, group=None, async_op=False):
        self._check("all_reduce", t, group)
        if t.device.type == "meta":
            raise StopAtCollective

    def monitored_barrier(self, group=None, timeout=None, wait_all_ranks=False):
        assert self.get_backend(group) == "gloo", "monitored_barrier is gloo's only"
        self.calls.append(("monitored_barrier", "gloo", timeout, wait_all_ranks))

    def barrier(self, group=None, **kw):
        self.calls.append(("barrier", self.get_backend(group), None, 0))

    def destroy(self, group=None):
        self.initialized = False


def _step_result(device, T=3, P=7, K=2):
    from metakernels.meta.common import StepResult

    g = torch.Generator().manual_seed(0)
    return StepResult(torch.randn(P, generator=g).to(device),
                      torch.rand(K, T, generator=g).to(device),
                      torch.rand(T, generator=g).to(device),
                      torch.tensor([0.5, 0.0, 0.5]).to(device),
                      torch.tensor([False, True, False]).to(device))


def test_nccl_collectives_get_device_tensors_and_host_ones_go_to_gloo(monkeypatch):
    from metakernels import distributed as mdist

    world = FakeWorld(monkeypatch)
    cfg = load_config(None, ["trainer.device=cuda", "trainer.collective_timeout_s=7"])
    assert mdist.init_from_env(cfg) == (0, 2)
    assert world.devices == [1]                       # GPU LOCAL_RANK
    assert [(b, t.total_seconds()) for b, t in world.inits] == [("nccl", 7.0)]
    assert [(g[1], g[2].total_seconds()) for g in world.groups] == [("gloo", 7.0)]
    bank = type("Bank", (), {"num_params": 11})()
    mdist.check_same_config(cfg, bank)                # the config digest: host values on gloo
    assert world.calls[-1][:3] == ("all_reduce", "gloo", "cpu")
    with pytest.raises(StopAtCollective):             # the meta-gradient where it lives
        mdist.reduce_step(_step_result(ACCEL), first=2, num_tasks=5, world_size=2)
    assert world.calls[-2][:2] == ("monitored_barrier", "gloo")
    assert world.calls[-2][2].total_seconds() == 7.0
    assert world.calls[-1] == ("all_reduce", "nccl", ACCEL, 7 + 1 + 4 * 5)
    mdist.shutdown(barrier=True)
    assert not world.initialized


def test_gloo_needs_no_second_group(monkeypatch):
    from metakernels import distributed as mdist

    world = FakeWorld(monkeypatch)
    mdist.init_from_env(load_config(None, ["trainer.collective_timeout_s=2"]))
    assert [(b, t.total_seconds()) for b, t in world.inits] == [("gloo", 2.0)]
    assert world.groups == [] and world.devices == []
    mdist.reduce_step(_step_result("cpu"), first=0, num_tasks=3, world_size=2)
    assert [c[:2] for c in world.calls] == [("monitored_barrier", "gloo"), ("all_reduce", "gloo")]
    mdist.shutdown()


def test_reduce_step_makes_nothing_on_the_default_device():
    # Every tensor reduce_step makes is on the step's device, whatever the default device is
    # (a device-less torch.zeros lands on the default device: on a GPU run, the CPU)
    from metakernels.distributed import reduce_step

    res = _step_result("cpu")
    with torch.device("meta"):
        red = reduce_step(res, first=1, num_tasks=4, world_size=1)
    for t in (red.meta_grad, red.kept, red.query_losses, red.support_losses_first,
              red.support_losses_last):
        assert t.device.type == "cpu"
    assert red.num_kept == 2
    torch.testing.assert_close(red.meta_grad, res.meta_grad)
    torch.testing.assert_close(red.query_losses, torch.cat([torch.zeros(1), res.query_losses]))
    torch.testing.assert_close(red.support_losses_first,
                               torch.cat([torch.zeros(1), res.support_losses[0]]))
    torch.testing.assert_close(red.support_losses_last,
                               torch.cat([torch.zeros(1), res.support_losses[-1]]))
    assert red.kept.tolist() == [False, True, False, True]


def test_a_missing_rank_is_named(monkeypatch):
    import torch.distributed as dist

    from metakernels import distributed as mdist

    FakeWorld(monkeypatch)
    mdist.init_from_env(load_config(None, ["trainer.collective_timeout_s=4"]))

    def missing(group=None, timeout=None, wait_all_ranks=False):
        raise RuntimeError("[Rank 0]: Ranks 1, 3 failed to pass monitoredBarrier in 4000 ms")

    monkeypatch.setattr(dist, "monitored_barrier", missing)
    with pytest.raises(mdist.CollectiveTimeout, match=r"rank 0: rank 1, 3 did not answer within "
                                                      r"trainer.collective_timeout_s=4 s"):
        mdist.wait_for_all()
    mdist.shutdown()


def test_one_gpu_index_for_several_processes_of_a_node_is_a_clear_error(monkeypatch):
    from metakernels import distributed as mdist

    world = FakeWorld(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"trainer.device=cuda:1 with 2 processes on this node: "
                                          r".* give trainer.device=cuda"):
        mdist.init_from_env(load_config(None, ["trainer.device=cuda:1"]))
    assert world.inits == []


@pytest.mark.parametrize("value, message", [
    ("0", "trainer.collective_timeout_s: must be > 0, got 0.0"),
    ("inf", "trainer.collective_timeout_s: must be a finite number, got inf")])
def test_the_collective_timeout_is_a_positive_finite_number(value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"trainer.collective_timeout_s={value}"])
    assert str(e.value) == message
