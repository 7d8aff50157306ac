"""Multi-process meta-training under torchrun: tasks split across processes, one all-reduce.

Every process draws the same meta-batch (one seeded stream) and runs its contiguous share of
the tasks batched. What crosses processes per meta-step is ONE all-reduce of a flat fp32 buffer:

    [ sum over my kept tasks of w * g  (P) | my kept-task count (1) | per-task losses (4 T) ]

so the meta-gradient is the mean over the kept tasks of the whole meta-batch, whichever process
ran them, and every process applies the same outer step to the same theta.

With ``trainer.shard_base`` the frozen base is also sharded over the processes with FSDP2
(``shard_base``), the tasks still split: each process holds 1/N of the base's weights and
gathers a layer's weights around its forward and its backward (docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .cli import check_model_path
from .config import Config, ConfigError


# The group for the small host-side collectives (the config digest, the shard sizes, the
# monitored barrier): None (the default group) when that is gloo, else a gloo group over all
# processes made at init. NCCL takes only GPU tensors and has no monitored barrier, and these
# values live on the host: on gloo they need no device copy and no stream synchronisation.
_host_group = None
# trainer.collective_timeout_s of this run, for the monitored barrier
_timeout = timedelta(minutes=10)


def init_from_env(cfg: Config) -> tuple[int, int]:
    """Initialises torch.distributed from torchrun's environment; returns (rank, world_size).

    The default group has the training device's backend (gloo on the CPU, NCCL on GPUs) and
    carries the per-step all-reduce of the meta-gradient where it lives, and FSDP2's
    collectives; a gloo group carries the host-side collectives (``_host_group``). Every
    collective gives up after ``trainer.collective_timeout_s``."""
    global _host_group, _timeout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and re.fullmatch(r"cuda:\d+", cfg.trainer.device):
        raise ConfigError(f"trainer.device={cfg.trainer.device} with {local} processes on this "
                          f"node: all of them would run on that one GPU, which NCCL refuses; "
                          f"give trainer.device=cuda (process r of a node takes GPU LOCAL_RANK)")
    _timeout = timedelta(seconds=cfg.trainer.collective_timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if cfg.trainer.device.startswith("cuda") else "gloo"
        if cfg.trainer.device == "cuda":
            # One GPU per process, as torchrun numbers them on a node: "cuda" (the current
            # device) then names that GPU for the model, the bank, NCCL and the FSDP mesh;
            # otherwise every process would run on GPU 0, which NCCL refuses.
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=_timeout)
    # also where the caller made the default group itself, with whatever backend
    if _host_group is None and dist.get_backend() != "gloo":
        _host_group = dist.new_group(backend="gloo", timeout=_timeout)
    return dist.get_rank(), dist.get_world_size()


class CollectiveTimeout(RuntimeError):
    """A process did not reach a collective within ``trainer.collective_timeout_s``."""


def wait_for_all() -> None:
    """Returns when every process has reached this call; raises ``CollectiveTimeout`` naming
    the processes that did not within ``trainer.collective_timeout_s`` (one frozen, stopped or
    stuck). Rank 0 waits for each of the others and names every one missing; another rank
    waits for rank 0's answer, so it names rank 0 (whose own error names the culprit)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(group=_host_group, timeout=_timeout, wait_all_ranks=True)
    except RuntimeError as e:
        missing = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(e))
        who = (f"rank {missing.group(1).strip()}" if missing else
               "rank 0" if dist.get_rank() != 0 else "another process")
        raise CollectiveTimeout(
            f"rank {dist.get_rank()}: {who} did not answer within trainer.collective_timeout_s="
            f"{_timeout.total_seconds():g} s (a process frozen, stopped or stuck); if a process "
            f"legitimately lags the others by more, raise trainer.collective_timeout_s") from e


def shutdown(barrier: bool = False) -> None:
    """Destroys the process groups. ``barrier``: first wait for every process (where all of
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
    global _host_group
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
            if _host_group is not None:
                dist.barrier(group=_host_group)
        dist.destroy_process_group()
    _host_group = None


def _host_max(values: list[float]) -> torch.Tensor:
    """Elementwise max of ``values`` over the processes, on the host group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return t


def check_same_config(cfg: Config, bank) -> None:
    """Raises on every process if the processes were started with different configs."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    blob = json.dumps(cfg.to_dict(), sort_keys=True) + f"|P={bank.num_params}"
    digest = float(int(hashlib.sha256(blob.encode()).hexdigest()[:12], 16))
    theirs = _host_max([digest, -digest])  # max of x and of -x: equal iff all agree
    if theirs[0] != digest or theirs[1] != -digest:
        raise ConfigError(f"rank {dist.get_rank()}: the processes were started with different "
                          f"configs (or models); every process must get the same config")


def check_shardable(cfg: Config, world_size: int) -> None:
    """Raises unless ``trainer.shard_base`` can run: several processes, and as many passes
    through the base per meta-step in each (``meta.task_chunk`` runs a process's share of the
    tasks in ceil(share / chunk) passes, so the shares must give equal counts)."""
    if world_size < 2:
        raise ConfigError("trainer.shard_base=true needs several processes: start the run with "
                          "torchrun --nproc_per_node=N, N >= 2")
    T, chunk = cfg.meta.meta_batch_size, cfg.meta.task_chunk
    shares = [T * (r + 1) // world_size - T * r // world_size for r in range(world_size)]
    passes = {-(-n // chunk) if 0 < chunk < n else 1 for n in shares}
    if len(passes) > 1:
        raise ConfigError(f"meta.task_chunk={chunk}: the processes' shares of the "
                          f"{T} tasks ({shares}) take different numbers of chunks "
                          f"({sorted(passes)}); with trainer.shard_base every process must run "
                          f"the same passes through the sharded base. Choose a task_chunk that "
                          f"splits every share into as many chunks, or 0")


def shard_base(model: torch.nn.Module, cfg: Config, world_size: int) -> dict[str, int]:
    """Shards the frozen base over the processes with FSDP2 (``trainer.shard_base``); returns
    ``{"param_bytes": ..., "local_param_bytes": ..., "max_local_param_bytes": ...}``: the base's
    parameters in all, this process's share and the largest share of any process.

    ``fully_shard`` is applied to each decoder layer (the model's ``_no_split_modules``) and then
    to ``model.base_model`` (embeddings and final norm), the root: every parameter of the base
    model becomes a dim-0 shard (a DTensor), all-gathered around its module's forward and again
    before its backward. Decoder layers free their gathered weights after the forward
    (``reshard_after_forward``): the autograd functions of ``multi_lora_linear`` and of
    ``metakernels.fused`` keep the gathered weight for the backward, and FSDP2 re-gathers into
    that same storage before the layer's backward (the pre-backward hook on the layer's outputs,
    which require grad through the adapters), so what they kept is valid again when used.

    Not sharded: the output layer, whose weight the loss (``segment_cross_entropy``) reads
    directly instead of calling the layer (FSDP2 gathers a module's parameters around its
    forward only), so a tied input embedding is left whole too; buffers (rotary frequencies); the
    adapter bank, which is no module of the model (its flat buffers stay whole in every process).

    Every process issues the same collectives in the same order whatever its share of the tasks:
    one all-gather per module per forward and one per decoder layer per backward, and each
    process runs the same passes per meta-step (K support steps and one query pass; the frozen
    parameters get no gradient, so nothing is reduce-scattered).
    """
    check_shardable(cfg, world_size)
    if not getattr(model, "_metakernels_sharded", False):   # else load_sharded_base did it
        _fully_shard(model, world_size, next(model.parameters()).device.type)
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # global shapes
    local = local_param_bytes(model)
    return {"param_bytes": total, "local_param_bytes": local,
            "max_local_param_bytes": int(_host_max([local])[0])}


def _fully_shard(model: torch.nn.Module, world_size: int, device_type: str) -> None:
    """``fully_shard`` on each decoder layer, then on ``model.base_model`` (see ``shard_base``),
    over a mesh of ``device_type`` (that of the training device, also for a model still on the
    ``meta`` device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = model.base_model
    mesh = init_device_mesh(device_type, (world_size,))
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"trainer.shard_base: found no decoder layers in {type(model).__name__} "
                         f"(no module of the classes {sorted(layer_types)} it names in "
                         f"_no_split_modules)")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    out = model.get_output_embeddings()
    tied = {out.weight} if out is not None and any(
        p is out.weight for p in base.parameters()) else None
    fully_shard(base, mesh=mesh, ignored_params=tied)
    model._metakernels_sharded = True


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the ``meta`` device (no memory), their
    buffers (rotary frequencies, computed at construction and not in the checkpoint) real.
    Each parameter is moved as it is registered, so building holds at most one at a time; one
    registered again (weight tying assigns the same parameter to a second module) is kept."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"),
                                                   requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _safetensors_keys(path: Path) -> dict[str, Path]:
    """Tensor name -> file of a Hugging Face checkpoint directory (one file or an index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"model.path={path}: trainer.shard_base loads safetensors "
                                f"checkpoints (model.safetensors or its index); found neither")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def load_sharded_base(cfg: Config, world_size: int) -> torch.nn.Module:
    """The base of ``model.path`` built and sharded without any process holding it whole.

    The model is built with its parameters on the ``meta`` device, the metakernels layers are
    switched in (``model.fused_layers``), ``fully_shard`` is applied as ``shard_base`` does, the
    shards are allocated on the device, and each process reads from the safetensors files only
    the rows of each weight it holds (``get_slice``; the files are memory-mapped). The unsharded
    parameters (the output layer, a tied embedding) are read whole. Same values as
    ``from_pretrained`` (the checkpoint's tensors cast to ``model.dtype``)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from .build import DTYPES

    check_shardable(cfg, world_size)
    m = cfg.model
    check_model_path(m.path)
    path = Path(m.path)
    files = _safetensors_keys(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code,
                                        local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code)
    if m.fused_layers:
        from .fused import apply_fused_layers

        apply_fused_layers(model)
    out = model.get_output_embeddings()
    tied = out is not None and any(p is out.weight for p in model.base_model.parameters())
    device = torch.device(cfg.trainer.device)
    _fully_shard(model, world_size, device.type)
    buffers = [(mod, name, b) for mod in model.modules() for name, b in mod._buffers.items()
               if b is not None]
    model.to_empty(device=device)       # uninitialised shards: every one is read below
    for mod, name, b in buffers:        # to_empty left the buffers uninitialised too
        mod._buffers[name] = b.to(device)
    if tied:
        model.tie_weights()             # to_empty gave the output layer a tensor of its own
    rank = dist.get_rank()
    prefix = model.base_model_prefix + "."
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name if name in files else name.removeprefix(prefix)
            if key not in files:
                raise KeyError(f"model.path={m.path}: the checkpoint has no tensor {name!r}")
            # A file opened per tensor: the pages of the mapping read so far count in the RSS
            # until it is closed, so a file kept open would add up to the process's whole share.
            with safe_open(str(files[key]), "pt") as f:
                rows = f.get_slice(key)
                if isinstance(p, DTensor):
                    local = p.to_local()
                    # FSDP2's dim-0 shards are torch.chunk's: ceil(n / N) rows each, the last
                    # fewer
                    first = rank * -(-p.shape[0] // world_size)
                    local.copy_(rows[first:first + local.shape[0]])
                else:
                    p.copy_(rows[:])
    return model.eval()


def describe_sharding(mem: dict[str, int], world_size: int) -> str:
    mib = 1 << 20
    return (f"shard_base: {mem['param_bytes'] / mib:.1f} MiB of base parameters sharded over "
            f"{world_size} processes: {mem['max_local_param_bytes'] / mib:.1f} MiB in the largest "
            f"share (this process {mem['local_param_bytes'] / mib:.1f} MiB)")


def local_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters held by this process: a sharded parameter's local shard,
    every other parameter whole."""
    from torch.distributed.tensor import DTensor

    n = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        n += t.numel() * t.element_size()
    return n


@dataclass
class Reduced:
    meta_grad: torch.Tensor            # [P], mean over the kept tasks of the whole meta-batch,
                                       # on the device of the step's meta-gradient
    num_kept: int
    kept: torch.Tensor                 # [T] bool, all tasks of the meta-batch (this and below
                                       # on the host)
    query_losses: torch.Tensor         # [T]
    support_losses_first: torch.Tensor  # [T] support loss at theta (first inner step)
    support_losses_last: torch.Tensor   # [T] support loss at the last inner step


def reduce_step(res, first: int, num_tasks: int, world_size: int) -> Reduced:
    """Combines the ``StepResult`` of this process's tasks ``first:first+T_local`` with the other
    processes' in one all-reduce, on the device of the meta-gradient (no copy of the [P] buffer
    to the host and back). The meta-gradient stays there; the kept count and the losses
    (4 T + 1 values) come back to the host in one copy. Before the all-reduce every process waits
    for the others at a monitored barrier (``wait_for_all``): a process that never comes is
    named, where the all-reduce itself would wait without saying for whom (NCCL's watchdog
    would abort the process)."""
    dev = res.meta_grad.device
    T_loc = res.query_losses.numel()
    P = res.meta_grad.numel()
    kept_loc = (res.task_weights > 0).to(dev)
    hist = res.support_losses
    if hist.numel():
        s_first, s_last = hist[0], hist[-1]
    else:
        s_first = s_last = torch.full((T_loc,), float("nan"), device=dev)
    T = num_tasks
    buf = torch.zeros(P + 1 + 4 * T, dtype=torch.float32, device=dev)
    n_loc = kept_loc.sum()
    buf[:P] = res.meta_grad.detach().float() * n_loc
    buf[P] = n_loc
    o = P + 1
    sl = slice(first, first + T_loc)
    buf[o:o + T][sl] = res.query_losses.detach().float()
    buf[o + T:o + 2 * T][sl] = s_first.detach().float()
    buf[o + 2 * T:o + 3 * T][sl] = s_last.detach().float()
    buf[o + 3 * T:o + 4 * T][sl] = kept_loc.float()
    if world_size > 1:
        wait_for_all()
        dist.all_reduce(buf)
    tail = buf[P:].cpu()
    n = int(round(float(tail[0])))
    o = 1
    return Reduced(buf[:P] / max(n, 1), n, tail[o + 3 * T:o + 4 * T] > 0.5,
                   tail[o:o + T], tail[o + T:o + 2 * T], tail[o + 2 * T:o + 3 * T])
