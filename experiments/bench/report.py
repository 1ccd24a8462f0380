"""The outputs of a run: where and how it was measured, the headline against the targets, tables and plots."""
from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch_geometric

from experiments.bench import authors
from experiments.bench.cases import DEFAULT_MODE, HAS_MEMORY_EFFICIENT, LOGNORMAL_SIGMA, SKEWED, SOLVERS, Method, Plan

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX", "MALLOC_CONF")


def machine_info(device: torch.device, command: str, load_before: float) -> dict[str, str]:
    """The header of the README: where, when and how the numbers were made."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                if line.startswith("model name")), platform.processor())
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    tree = "unknown" if status is None else "dirty" if status else "clean"
    info = {
        "command": f"`{command}`",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "CPU": f"{cpu} ({os.cpu_count()} cores)",
        "threads": str(torch.get_num_threads()),
        # Other processes on the cores slow some operations more than others, which ratios cannot cancel.
        "load average (1 min) before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "torch / torch_geometric / python": f"{torch.__version__} / {torch_geometric.__version__} / "
                                            f"{platform.python_version()}",
        "commit": f"{commit or 'none (no commit yet)'}, tree {tree}",
        # glibc returns freed (N, D) temporaries to the OS and faults them in again on the next call; these
        # settings (or another allocator) change that, and with it the times of the methods that allocate most.
        "memory allocator": ", ".join(f"{name}={os.environ[name]}" for name in ALLOCATOR_ENV if name in os.environ)
        or "the C library's defaults (no MALLOC_* or LD_PRELOAD set)",
        "memory_efficient keyword": "present: UOT rows say efficient or autograd" if HAS_MEMORY_EFFICIENT
        else "absent: UOT rows run the library's only backward (autograd through the K iterations)",
    }
    if device.type == "cpu" and max(load_before, os.getloadavg()[0]) >= (os.cpu_count() or 1):
        info["warning"] = ("other processes kept the cores busy. A parallel operation then waits for a "
                           "descheduled thread, so times grow with the number of operations rather than "
                           "with the work, and ratios can be off by large factors even when their range is "
                           "narrow: rerun on an idle machine, or with --threads 1")
    return info


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "–" if value is None else str(value)


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a GitHub markdown table (``DataFrame.to_markdown`` would need ``tabulate``)."""
    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


# The targets of issues 4 and 13, by quantity: (solver, batch) where they depend on those.
EAGER_TARGETS = {("sinkhorn", SKEWED[0]): "<= 3.0 (13)", ("sinkhorn", SKEWED[1]): "<= 2.5 (13)",
                 ("badmm", SKEWED[0]): "<= 5 (13)", ("badmm", SKEWED[1]): "<= 5 (13)"}
MEMORY_TARGETS = {"sinkhorn": "<= 1.2 (4)", "badmm": "<= 2 (26)", "badmm_q": "<= 2 (26)"}  # lean backward only
SOLVER_MEMORY_TARGET = "<= 2 (26)"  # a BADMM's peak at the least K over Sinkhorn's, default allocator
TRAINING_TARGETS = {"uot": "<= 1.25 (13)", "uot_badmm": "<= 1.5 (13)"}


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """The issues' targets next to what this run measured (rows whose measurement is missing are left out)."""
    rows = []
    for batch in SKEWED:
        group = df[(df.section == "batch") & (df.config == batch.name)].set_index("method")
        for solver in SOLVERS:
            for label, quantity, target in (
                    (Method("padded UOT", solver, 4).label, f"padded / ours, {solver} K=4", ">= 30 (4)"),
                    (Method("UOT", solver, 4, DEFAULT_MODE).label,
                     f"ours ({solver} K=4) / SoftmaxAggregation(learn=True)", EAGER_TARGETS[solver, batch])):
                if label in group.index:
                    row = group.loc[label]
                    rows.append((f"{quantity}, fwd+bwd, {batch.name}", row.fwdbwd_ratio,
                                 f"{row.fwdbwd_ratio_min:.3g} to {row.fwdbwd_ratio_max:.3g}", target))
            compiled = df[(df.section == "compile") & (df.config == batch.name)].set_index("method")
            for method, how in ((Method("UOT", solver, 4, DEFAULT_MODE, kernels=True), "compile=True"),
                                (Method("UOT", solver, 4, DEFAULT_MODE, compiled=True), "torch.compile")):
                if method.label in compiled.index and not np.isnan(compiled.loc[method.label].fwdbwd_ratio):
                    row = compiled.loc[method.label]
                    rows.append((f"ours ({solver} K=4, {how}) / SoftmaxAggregation(learn=True) eager, fwd+bwd, "
                                 f"{batch.name}", row.fwdbwd_ratio,
                                 f"{row.fwdbwd_ratio_min:.3g} to {row.fwdbwd_ratio_max:.3g}", "<= 3 (4)"))
    rows += authors.headline_rows(df)
    rows += _memory_headline(df[df.section == "memory"])
    training = df[df.section == "training"]
    for row in training[training.method.isin(list(TRAINING_TARGETS))].itertuples():
        rows.append((f"seconds per training epoch, {row.method} / {row.baseline}, {row.config}", row.epoch_ratio,
                     row.note.split(" over ")[0].removeprefix("ratio "), TRAINING_TARGETS[row.method]))
    return pd.DataFrame(rows, columns=["quantity", "measured", "range over repeats", "target (issue)"])


def _memory_headline(memory: pd.DataFrame) -> list[tuple[str, float, str, str]]:
    """Per allocator setting: each method's peak at the largest K over its least K, and each other solver's
    memory-lean peak at the least K over Sinkhorn's."""
    rows = []
    for allocator, group in memory.groupby("allocator", sort=False):
        where = f"N={group.N.iloc[0]}, D={group.D.iloc[0]}, B={group.B.iloc[0]}, allocator: {allocator}"
        for row in group[group.K == group.K.max()].itertuples():
            target = MEMORY_TARGETS[row.solver] if row.memory_efficient is not False else "none: plain autograd"
            rows.append((f"peak memory K={row.K} / K={group.K.min()}, {row.method}, {where}", row.peak_ratio,
                         "one measurement each", target))
        lean = group[(group.K == group.K.min()) & (group.memory_efficient != False)].set_index("solver")  # noqa: E712
        for solver in lean.index.drop("sinkhorn", errors="ignore"):
            if "sinkhorn" in lean.index:
                rows.append((f"peak memory {solver} / sinkhorn, K={group.K.min()} efficient, {where}",
                             lean.peak_mb[solver] / lean.peak_mb["sinkhorn"], "one measurement each",
                             SOLVER_MEMORY_TARGET if allocator == "default" else "none"))
    return rows


TABLE_COLUMNS = ["method", "fwd_ms", "fwdbwd_ms", "fwdbwd_fresh_mb", "peak_mb", "baseline", "fwd_ratio", "fwdbwd_ratio",
                 "fwdbwd_ratio_min", "fwdbwd_ratio_max", "peak_ratio", "note"]
CURVES = {"scaling N": ("N", "total nodes N"), "scaling D": ("D", "features D"),
          "scaling K": ("K", "iterations K")}  # section: (the column it varies, its axis label)


def _section_table(df: pd.DataFrame, first: Sequence[str] = ()) -> str:
    table = df[[*first, *TABLE_COLUMNS]].dropna(axis=1, how="all")
    return markdown_table(table.loc[:, (table != "").any()])  # drops an empty note column


def plot_curve(df: pd.DataFrame, section: str, path: Path) -> None:
    """Forward and forward+backward time against the curve's variable, one line per method."""
    column, xlabel = CURVES[section]
    data = df[df.section == section].assign(curve=lambda d: d.method.str.replace(r" K=\d+", "", regex=True))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (key, title) in zip(axes, (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward"))):
        for name, line in data.groupby("curve", sort=False):
            if (line[column] > 0).all():
                ax.plot(line[column], line[key], marker="o", label=name)
            else:  # a method without iterations, in the K curve: the median over its measurements
                ax.axhline(line[key].median(), color="tab:green", linestyle="--", label=name)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)", title=title)
        if column != "N":  # few values: label each
            ticks = sorted(data[column][data[column] > 0].unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xticks([], minor=True)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    varied = {"N": "B=", "D": "D="}.get(column, "K=")  # N varies through the number of sets
    fixed = [t for t in f"{data.config.iloc[0]} K={data.K.max()}".split() if not t.startswith(varied)]
    fig.suptitle(f"{section}: {' '.join(fixed)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(df: pd.DataFrame, out: Path, info: dict[str, str], plan: Plan) -> None:
    """``results.csv``, ``README.md`` and one PNG per scaling curve in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "results.csv", index=False)
    cpu = info["device"] == "cpu"
    memory_how = ("on the CPU, which has no allocator counter, the peak resident set size (`VmHWM`, "
                  "reset just before) minus the RSS just before, each measurement in a fresh process after "
                  "a warm-up on a small batch; `ru_maxrss` is not used because it carries the parent's peak "
                  "over fork+exec. Resolution: a few MB (pages, allocator caches)"
                  if cpu else "`torch.cuda.max_memory_allocated()` minus the memory allocated before")
    parts = [
        "# UOT-Pooling: speed and memory",
        f"Written by {info['command']}; do not edit by hand, rerun the command.",
        markdown_table(pd.DataFrame(list(info.items()), columns=["", "value"])),
        f"**How.** Medians over {plan.repeats} repeats after {plan.warmup} warm-up round(s); within a repeat "
        "the methods of a table run round-robin, so load noise hits them alike. `fwd`: forward under "
        "`torch.no_grad()`; `fwdbwd`: forward, then `.sum().backward()` into `x` and the parameters. A "
        "ratio is the median over repeats of (time / the baseline's time in the same repeat); its baseline "
        "is named in the row: PyG's `SoftmaxAggregation(learn=True)` for the aggregations, ours at the same "
        "solver and K for the padded implementation (so its ratio is how many times slower padding is); "
        "compiled methods are divided by eager Softmax too. `fwdbwd_fresh_mb` (CPU): the memory that one "
        "forward+backward took fresh from the system (minor page faults times the page size, median over "
        "repeats), which the C library did not serve from memory it already held; each fresh page costs a page "
        "fault, which a timing includes. Peak memory (`peak_mb`) is the extra memory of "
        f"forward+backward: {memory_how}. "
        f"Set sizes: `uniform` = every set has the mean size; `lognormal` = sigma {LOGNORMAL_SIGMA} in "
        "log-size, mean as given. `max_set` is the largest set, to which padding pads every set.",
        "## Headline",
        markdown_table(headline(df)),
        "## Batches",
    ]
    for config, group in df[df.section == "batch"].groupby("config", sort=False):
        first = group.iloc[0]
        parts += [f"### {config}: N={first.N}, largest set {first.max_set} (padding stores "
                  f"{first.B * first.max_set / first.N:.1f}x the nodes)", _section_table(group)]
    parts += authors.section_parts(df, _section_table, plan.authors)
    memory = df[df.section == "memory"]
    if len(memory):
        parts += [f"## Memory: {memory.config.iloc[0]}, N={memory.N.iloc[0]}",
                  "Each allocator setting in its own fresh processes: `default` is the C library's defaults, what "
                  "a user's process has; `mmap 64 KiB` fixes glibc's mmap threshold (mallopt), so freed blocks go "
                  "back to the system and the peak does not depend on heap fragmentation.",
                  _section_table(memory, ["allocator"])]
    for config, group in df[df.section == "compile"].groupby("config", sort=False):
        parts += [f"## torch.compile: {config}",
                  "`compiled kernels`: the layer eager with `compile=True` (Sinkhorn only; BADMM runs eager), its "
                  "solver's iterations and their adjoints compiled; `compiled`: the whole module through "
                  "`torch.compile`. The note is the first calls' compile and warm-up time; the kernels are compiled "
                  "once per process (with dynamic shapes), so a later table's note is mostly warm-up.",
                  _section_table(group)]
    for config, group in df[df.section == "structure"].groupby("config", sort=False):
        parts += [f"## Structure term (ROT-Pooling): {config}",
                  "The same layer with `gw > 0` (proximal Sinkhorn: `K` outer steps of `inner_iters = 4` Sinkhorn "
                  "iterations each; BADMM: the term in both blocks), each divided by itself at `gw = 0`.",
                  _section_table(group)]
    training = df[df.section == "training"]
    if len(training):
        parts += [f"## Training: {training.config.iloc[0]}",
                  "Seconds per training epoch (`epoch_s`, median) on the first fold's training graphs, the poolings "
                  "taking turns epoch by epoch; `epoch_ratio` is the median per-epoch ratio to the baseline.",
                  markdown_table(training[["method", "K", "N", "epoch_s", "baseline", "epoch_ratio", "note"]])]
    gpu = df[df.section == "gpu target"]
    if len(gpu):
        parts += [f"## GPU target: {gpu.config.iloc[0]}, N={gpu.N.iloc[0]}", _section_table(gpu)]
    for section, (column, _) in CURVES.items():
        curve = df[df.section == section]
        if len(curve):
            png = f"{section.replace(' ', '_')}.png"
            plot_curve(df, section, out / png)
            parts += [f"## Scaling in {column}", f"![{section}]({png})",
                      _section_table(curve, [] if column == "K" else [column])]
    (out / "README.md").write_text("\n\n".join(parts) + "\n")

