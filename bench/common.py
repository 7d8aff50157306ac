"""What the benchmark scripts share: run metadata, timing statistics, the machine's GEMM rates,
CSV output and a plain-text table."""
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


def run_metadata() -> dict:
    """The columns every result row carries: when, on what, with which code, and the 1-minute
    load average when it started (a loaded machine gives slow, noisy times)."""
    return {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_rev": git_revision(),
        "machine": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load1": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


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


def time_calls(fn: Callable[[], object], warmup: int, repeats: int,
               setup: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of ``fn`` (``time.perf_counter`` around the call alone), after
    ``warmup`` untimed calls; ``setup`` runs untimed before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _best_rate(fn, flops: float, min_seconds: float) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    iters = max(1, int(min_seconds / 7 / one))
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return flops / best


def gemm_rates(n: int, dtype=torch.float32, min_seconds: float = 0.2) -> dict[str, float]:
    """Best achieved FLOP/s of a square product of size ``n`` on this machine, now, by each GEMM
    library the cpu backend can use (``metakernels.gemm``): ATen's ``torch.mm`` ("blas") and,
    for fp32 where PyTorch has it, oneDNN's matmul ("onednn")."""
    from metakernels.gemm import onednn_available, onednn_linear
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    rates = {"blas": _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n ** 3, min_seconds)}
    if dtype == torch.float32 and onednn_available():
        rates["onednn"] = _best_rate(lambda: onednn_linear(a, b), 2.0 * n ** 3, min_seconds)
    return rates


def append_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (header written when the file is new). A file
    written with other columns is never mixed with these rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            raise SystemExit(f"{path} has columns {header}, this script writes {list(columns)}: "
                             f"pass --csv with another file (or move the old one away)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({c: _fmt(row.get(c)) for c in columns})


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
