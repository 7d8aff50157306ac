"""What the benchmark scripts share: run metadata, the device and dtype flags, timing (the host
clock on the CPU, CUDA events on a GPU), timing statistics, the machine's GEMM rates, CSV output
and a plain-text table."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# The scripts benchmark the checkout they live in, installed or not.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str:
    """Short commit of the checkout, with ``+dirty`` when the working tree's code has changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30)
    try:
        rev = git("rev-parse", "--short", "HEAD")
        if rev.returncode != 0:
            return "unknown"
        # The results the benchmarks append to, and the docs, do not make the code dirty.
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)bench/results", ":(exclude)*.md").stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")


def usage_error(message: str) -> None:
    """Exits with status 2 after one line ``error: <message>`` (a flag or file to fix)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_device(device: str) -> None:
    """Exits with one line unless ``device`` can run here."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device here (torch {torch.__version__}, built "
                         f"with CUDA {torch.version.cuda or 'no'}); run on a machine with a GPU "
                         f"or use --device cpu")


def machine_name(device: str = "cpu") -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def run_metadata(device: str = "cpu") -> dict:
    """The columns every result row carries: when, on what (the CPU, or the GPU for
    ``device="cuda"``), with which code, and the 1-minute load average of the host when it
    started (a loaded machine gives slow, noisy times)."""
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_rev": git_revision(),
        "machine": machine_name(device),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load1": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def settle_run_args(p, args, *, warmup: tuple[int, int], repeats: tuple[int, int]) -> None:
    """The scripts' shared run flags: ``--warmup`` and ``--repeats`` filled where not given
    ((default, with --quick)) and checked, then ``--threads`` (1 with ``--quick``, where the
    timing is not the point) applied to torch. ``p``: the parser, for its error exit."""
    if args.warmup is None:
        args.warmup = warmup[1] if args.quick else warmup[0]
    if args.repeats is None:
        args.repeats = repeats[1] if args.quick else repeats[0]
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80), Liger-Kernel's quantiles, by linear interpolation."""
    xs = sorted(times)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(p):
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
    return statistics.median(xs), q(0.2), q(0.8)


def timer(device: str = "cpu") -> Callable[[Callable[[], object]], float]:
    """A function that calls ``fn`` once and returns the seconds it took: ``time.perf_counter``
    around the call on the CPU; on a GPU, CUDA events recorded around it after the work queued
    before it has finished (kernels run asynchronously: the host clock would time their
    launches), read after the work it queued has finished."""
    if device != "cuda":
        def host(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return host

    def events(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return events


def time_calls(fn: Callable[[], object], warmup: int, repeats: int,
               setup: Callable[[], object] | None = None, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn`` (``timer(device)`` around the call alone), after ``warmup``
    untimed calls; ``setup`` runs untimed before every call."""
    clock = timer(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        times.append(clock(fn))
    return times


def _best_rate(fn, flops: float, min_seconds: float, device: str = "cpu") -> float:
    """``flops`` over the best mean time of ``fn`` in 7 batches of about ``min_seconds`` / 7."""
    clock = timer(device)
    for _ in range(3):
        fn()
    one = max(clock(fn), 1e-7)
    iters = max(1, int(min_seconds / 7 / one))

    def batch():
        for _ in range(iters):
            fn()
    return flops / min(clock(batch) / iters for _ in range(7))


def gemm_functions(n: int, dtype=torch.float32, device: str = "cpu") -> dict[str, Callable]:
    """Square ``n`` x ``n`` products in ``dtype`` on ``device`` by each GEMM library the step
    can use, as functions that return ``a @ b.T`` for their (random) operands ``a`` and ``b``
    (attributes of each function, for checking it):

    - CPU: ATen's ``torch.mm`` ("blas": MKL for fp32, oneDNN's bf16 kernels behind ATen for
      bf16) and oneDNN's linear ``torch.ops.mkldnn._linear_pointwise`` ("onednn": what
      ``metakernels.gemm`` runs the frozen base's fp32 GEMMs on; in bf16 where this CPU has
      oneDNN's bf16 support, AVX512-BF16 or AMX);
    - CUDA: ``torch.mm`` ("cublas"), fp32 without TF32 unless PyTorch was told to allow it."""
    dev = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    bt = b.t()
    fns = {}
    if dev.type == "cuda":
        out = torch.empty(n, n, dtype=dtype, device=dev)
        fns["cublas"] = lambda: torch.mm(a, bt, out=out)
    else:
        out = torch.empty(n, n, dtype=dtype)
        fns["blas"] = lambda: torch.mm(a, bt, out=out)
        if _onednn_linear_available(dtype):
            fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    for f in fns.values():
        f.a, f.b = a, b
    return fns


def _onednn_linear_available(dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        from metakernels.gemm import onednn_available
        return onednn_available()
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def gemm_rates(n: int, dtype=torch.float32, min_seconds: float = 0.2,
               device: str = "cpu") -> dict[str, float]:
    """Best achieved FLOP/s of a square product of size ``n`` in ``dtype`` on ``device``, now,
    by each library of ``gemm_functions``."""
    return {lib: _best_rate(f, 2.0 * n ** 3, min_seconds, device)
            for lib, f in gemm_functions(n, dtype, device).items()}


def append_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (header written when the file is new). A file
    written by an earlier version, whose columns are the first of ``columns``, is first
    rewritten with the new columns appended, empty in its old rows; a file written with other
    columns is never mixed with these rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns) and header == list(columns)[:len(header)]:
            _add_columns(path, columns)
        elif header != list(columns):
            raise SystemExit(f"{path} has columns {header}, this script writes {list(columns)}: "
                             f"pass --csv with another file (or move the old one away)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({c: _fmt(row.get(c)) for c in columns})


def _add_columns(path: Path, columns: Sequence[str]) -> None:
    """Rewrites the CSV at ``path`` with ``columns``, a superset of its own, the new ones
    empty; through a temporary file, so that an interruption leaves the old file whole."""
    with open(path, newline="") as f:
        old = list(csv.DictReader(f))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), restval="")
        w.writeheader()
        w.writerows(old)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Prints ``rows`` as an aligned table; ``columns`` are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            v = row.get(key)
            line.append("-" if v is None or v == "" else format(v, spec) if spec else str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i and j else c.ljust(w)
                        for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
