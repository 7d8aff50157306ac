"""Multi-process meta-training under torchrun: tasks split across processes, one all-reduce.

Every process draws the same meta-batch (one seeded stream) and runs its contiguous share of
the tasks batched. What crosses processes per meta-step is ONE all-reduce of a flat fp32 buffer:

    [ sum over my kept tasks of w * g  (P) | my kept-task count (1) | per-task losses (4 T) ]

so the meta-gradient is the mean over the kept tasks of the whole meta-batch, whichever process
ran them, and every process applies the same outer step to the same theta.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError


def init_from_env(cfg: Config) -> tuple[int, int]:
    """Initialises torch.distributed from torchrun's environment; returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if cfg.trainer.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shutdown(barrier: bool = False) -> None:
    """Destroys the process group. ``barrier``: first wait for every process (where all of
    them end: the normal end of a run, or a stop on the all-reduced gradient; not after an error
    of one process, while the others may wait in another collective).

    Why the barrier: Gloo's worker thread drops its reference to a finished collective after
    the caller has returned. When the caller's tensor is gone by then, that drop frees a
    Python object and needs the GIL; if the interpreter is already finalizing, the thread
    exits inside a C++ frame and the process aborts ("terminate called without an active
    exception", pytorch/pytorch#190489). A process with nothing to do after the last all-reduce
    (every rank but 0) exits fast enough to hit this. The barrier is queued behind the
    all-reduce, so the worker has dropped the all-reduce before the barrier returns, while the
    interpreter is alive; the barrier's own tensors are not Python's."""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def check_same_config(cfg: Config, bank) -> None:
    """Raises on every process if the processes were started with different configs."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    blob = json.dumps(cfg.to_dict(), sort_keys=True) + f"|P={bank.num_params}"
    digest = int(hashlib.sha256(blob.encode()).hexdigest()[:12], 16)
    mine = torch.tensor([digest, -digest], dtype=torch.float64)
    theirs = mine.clone()
    dist.all_reduce(theirs, op=dist.ReduceOp.MAX)  # max of x and of -x: equal iff all agree
    if theirs[0] != mine[0] or theirs[1] != mine[1]:
        raise ConfigError(f"rank {dist.get_rank()}: the processes were started with different "
                          f"configs (or models); every process must get the same config")


@dataclass
class Reduced:
    meta_grad: torch.Tensor            # [P], mean over the kept tasks of the whole meta-batch
    num_kept: int
    kept: torch.Tensor                 # [T] bool, all tasks of the meta-batch
    query_losses: torch.Tensor         # [T]
    support_losses_first: torch.Tensor  # [T] support loss at theta (first inner step)
    support_losses_last: torch.Tensor   # [T] support loss at the last inner step


def reduce_step(res, first: int, num_tasks: int, world_size: int) -> Reduced:
    """Combines the ``StepResult`` of this process's tasks ``first:first+T_local`` with the other
    processes' in one all-reduce."""
    T_loc = res.query_losses.numel()
    P = res.meta_grad.numel()
    kept_loc = res.task_weights > 0
    n_loc = int(kept_loc.sum())
    hist = res.support_losses
    if hist.numel():
        s_first, s_last = hist[0], hist[-1]
    else:
        s_first = s_last = torch.full((T_loc,), float("nan"))
    T = num_tasks
    buf = torch.zeros(P + 1 + 4 * T, dtype=torch.float32)
    buf[:P] = res.meta_grad.detach().float().cpu() * n_loc
    buf[P] = n_loc
    o = P + 1
    sl = slice(first, first + T_loc)
    buf[o:o + T][sl] = res.query_losses.detach().float().cpu()
    buf[o + T:o + 2 * T][sl] = s_first.float().cpu()
    buf[o + 2 * T:o + 3 * T][sl] = s_last.float().cpu()
    buf[o + 3 * T:o + 4 * T][sl] = kept_loc.float().cpu()
    if world_size > 1:
        dist.all_reduce(buf)
    n = int(round(float(buf[P])))
    meta_grad = buf[:P] / max(n, 1)
    return Reduced(meta_grad.to(res.meta_grad.device), n, buf[o + 3 * T:o + 4 * T] > 0.5,
                   buf[o:o + T], buf[o + T:o + 2 * T], buf[o + 2 * T:o + 3 * T])
