"""PNG plots of the benchmark CSVs.

    meta_step.csv -> meta_step_<preset>_<model>_<targets>_r<rank>[_<dtype>][_<device>].png:
                     time per meta-step vs T and peak step memory vs T, one line per variant
                     (the latest row for each variant and T, of the newest commit in the CSV);
                     the dtype and device only where they are not float32 and cpu
    ops.csv       -> ops_<op>[_<device>].png: rate (GFLOP/s or GB/s) per shape and mode, one
                     bar per provider (the latest row of each)

Rows written before the ``dtype`` and ``device`` columns existed have them empty: float32 on
the CPU, what every run was then.

    python bench/plot.py                                   # bench/results/*.csv -> PNGs there
    python bench/plot.py --meta-step-csv m.csv --ops-csv o.csv --out-dir /tmp/plots
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest(rows: list[dict], key) -> list[dict]:
    """The most recent row (by timestamp, then file order) for every ``key(row)``."""
    best = {}
    for i, r in enumerate(rows):
        k = key(r)
        if k not in best or (r["timestamp"], i) >= best[k][0]:
            best[k] = ((r["timestamp"], i), r)
    return [r for _, r in best.values()]


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()


def dtype_of(row: dict) -> str:
    return row.get("dtype") or "float32"


def device_of(row: dict) -> str:
    return row.get("device") or "cpu"


def _num(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)   # pyplot holds on to every figure until it is closed
    return out


def plot_meta_step(path: Path, out_dir: Path) -> list[Path]:
    rows = read_rows(path)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["preset"], r["model"], r["targets"], r["rank"], dtype_of(r),
                device_of(r))].append(r)
    written = []
    for (preset, model, targets, rank, dtype, device), grp in sorted(groups.items()):
        # One commit of the code per plot (with or without uncommitted changes on top of it).
        def commit(r):
            return r["git_rev"].split("+")[0]
        newest = commit(max(grp, key=lambda r: r["timestamp"]))
        grp = [r for r in grp if commit(r) == newest]
        grp = latest(grp, lambda r: (r["variant"], int(r["num_tasks"])))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        # tab20: one colour per variant (the default cycle repeats after 10)
        colors = plt.get_cmap("tab20").colors
        for i, variant in enumerate(sorted({r["variant"] for r in grp})):
            style = dict(color=colors[i % len(colors)], label=variant)
            pts = sorted((int(r["num_tasks"]), r) for r in grp if r["variant"] == variant)
            T = [t for t, _ in pts]
            ax_t.plot(T, [float(r["median_s"]) for _, r in pts], "o-", **style)
            mem = [(t, _num(r["peak_rss_mb"])) for t, r in pts]
            mem = [(t, m) for t, m in mem if m is not None]
            if mem:
                ax_m.plot(*zip(*mem), "o-", **style)
        memory = ("peak step memory (MB allocated above pre-step)" if device == "cuda" else
                  "peak step memory (MB above pre-step RSS)")
        for ax, ylabel in ((ax_t, "median time per meta-step (s)"), (ax_m, memory)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tasks per meta-batch T")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        first = grp[0]
        where = (first["machine"] if device == "cuda" else
                 f"{first['machine']}, {first['threads']} threads")
        fig.suptitle(f"FOMAML meta-step, {preset}: {model} {dtype}, {targets} r{rank}, "
                     f"L={first['seq_len']}, K={first['inner_steps']}  ({where})", fontsize=9)
        suffix = ("" if dtype == "float32" else f"_{slug(dtype)}") + (
            "" if device == "cpu" else f"_{slug(device)}")
        written.append(_save(fig, out_dir / f"meta_step_{slug(preset)}_{slug(model)}_"
                                          f"{slug(targets)}_r{rank}{suffix}.png"))
    return written


def plot_ops(path: Path, out_dir: Path) -> list[Path]:
    rows = latest(read_rows(path), lambda r: (r["op"], r["config"], r["mode"], r["provider"],
                                              device_of(r)))
    written = []
    for op, device in sorted({(r["op"], device_of(r)) for r in rows}):
        grp = [r for r in rows if (r["op"], device_of(r)) == (op, device)]
        groups = list(dict.fromkeys((r["config"], r["mode"]) for r in grp))
        provs = list(dict.fromkeys(r["provider"] for r in grp))
        value = {(r["config"], r["mode"], r["provider"]): float(r["throughput"]) for r in grp}
        width = 0.8 / len(provs)
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4.5))
        for i, p in enumerate(provs):
            xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, [value.get((c, m, p), 0.0) for c, m in groups], width, label=p)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=7, rotation=20,
                           ha="right")
        ax.set_yscale("log")   # shapes and modes differ by orders of magnitude
        ax.set_ylabel(grp[0]["metric"])
        where = (grp[0]["machine"] if device == "cuda" else
                 f"{grp[0]['machine']}, {grp[0]['threads']} threads")
        ax.set_title(f"{op} ({where})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        suffix = "" if device == "cpu" else f"_{slug(device)}"
        written.append(_save(fig, out_dir / f"ops_{op}{suffix}.png"))
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta-step-csv", type=Path, default=RESULTS / "meta_step.csv")
    p.add_argument("--ops-csv", type=Path, default=RESULTS / "ops.csv")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    found = [f for f in (args.meta_step_csv, args.ops_csv) if f.exists()]
    if not found:
        raise SystemExit(f"no CSV to plot: neither {args.meta_step_csv} nor {args.ops_csv} "
                         f"exists (run bench/meta_step.py or bench/ops.py first)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if args.meta_step_csv.exists():
        written += plot_meta_step(args.meta_step_csv, args.out_dir)
    if args.ops_csv.exists():
        written += plot_ops(args.ops_csv, args.out_dir)
    for w in written:
        print(f"wrote {w}")


if __name__ == "__main__":
    main()
