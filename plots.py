"""The PNG figures of eval.py: scores by mode and by evidence position, the needle grid, cost
against input length, and the gate heatmap. Matplotlib only; no model code here."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")                 # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def plot_results(groups: dict[str, list[dict]], out: Path) -> None:
    names = list(groups)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
    ax.bar(range(len(names)), [sum(r["contains"] for r in groups[n]) / len(groups[n]) for n in names], color="#4a7ab5")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("answer contained")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "score_by_mode.png", dpi=110)
    plt.close(fig)

    bins = 5
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for n in names:
        rs = [r for r in groups[n] if r.get("evidence_pos") is not None and r.get("depth") is None]
        if not rs:
            continue
        xs, ys = [], []
        for b in range(bins):
            sel = [r for r in rs if b / bins <= r["evidence_pos"] < (b + 1) / bins]
            if sel:
                xs.append((b + 0.5) / bins)
                ys.append(sum(r["contains"] for r in sel) / len(sel))
        ax.plot(xs, ys, marker="o", label=n)
    ax.set_xlabel("evidence position in the document (fraction)")
    ax.set_ylabel("answer contained")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_by_position.png", dpi=110)
    plt.close(fig)

    needle = {n: [r for r in groups[n] if r.get("depth") is not None] for n in names}
    needle = {n: rs for n, rs in needle.items() if rs}
    if needle:
        fig, axes = plt.subplots(1, len(needle), figsize=(3.2 * len(needle), 3), squeeze=False)
        for ax, (n, rs) in zip(axes[0], needle.items()):
            lengths, depths = sorted({r["doc_tokens"] for r in rs}), sorted({r["depth"] for r in rs})
            grid = torch.full((len(depths), len(lengths)), float("nan"))
            for r in rs:
                grid[depths.index(r["depth"]), lengths.index(r["doc_tokens"])] = r["contains"]
            ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(n, fontsize=8)
            ax.set_xlabel("haystack tokens")
        axes[0][0].set_ylabel("needle depth")
        fig.tight_layout()
        fig.savefig(out / "needle_grid.png", dpi=110)
        plt.close(fig)


def plot_cost(ok: dict, fits: dict, cross, measured_max: int, out: Path) -> None:
    """Measured seconds against input length, with ICL's quadratic and LIFT's linear fit."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = np.linspace(0, max(measured_max, (cross or 0) * 1.1), 200)
    for m, color in (("icl", "#c0504d"), ("lift", "#4a7ab5")):
        ax.scatter([r["tokens"] for r in ok[m]], [r["seconds"] for r in ok[m]], color=color, label=f"{m} measured")
        coef = fits[m]["quadratic"] if m == "icl" else fits[m]["linear"]
        ax.plot(xs, np.polyval(coef, xs), color=color, alpha=0.6, label=f"{m} fit ({'quadratic' if m == 'icl' else 'linear'})")
    ax.set_xlabel("input tokens")
    ax.set_ylabel("seconds (input + one answer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "cost.png", dpi=110)
    plt.close(fig)


def plot_gates(maps: dict[str, torch.Tensor], out: Path) -> None:
    """Heatmaps (layers × heads) of the mean gate for each question, and their difference."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    diff = maps["about the document"] - maps["unrelated"]
    for ax, (title, m) in zip(axes, [*maps.items(), ("difference", diff)]):
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis" if title != "difference" else "coolwarm",
                       vmin=None if title != "difference" else -diff.abs().max().item(),
                       vmax=None if title != "difference" else diff.abs().max().item())
        ax.set_title(f"{title}\nmean g = {m.mean():.3f}", fontsize=9)
        ax.set_xlabel("head")
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(out / "gates.png", dpi=110)
    plt.close(fig)


def plot_gate_trace(trace: dict, path: Path) -> None:
    """How the gate and the memory's share of the output move during LIFT, on each probe: mean
    over layers against the optimizer step, and per layer at the end of training."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    steps = trace["steps"]
    for name, per_step in trace["gate_per_layer"].items():
        g = torch.tensor(per_step)                                   # (recorded steps, layers)
        share = torch.tensor(trace["memory_share_per_layer"][name])
        line, = axes[0].plot(steps, g.mean(1), label=name)
        axes[1].plot(steps, share.mean(1), color=line.get_color())
        axes[2].plot(range(g.shape[1]), g[-1], color=line.get_color())
    axes[0].set(xlabel="optimizer step", ylabel="mean gate g", title="gate, mean over layers")
    axes[1].set(xlabel="optimizer step", ylabel="|g·m| / (|(1−g)·attn| + |g·m|)", title="memory's share of the output")
    axes[2].set(xlabel="layer", ylabel="mean gate g", title=f"gate per layer after step {steps[-1]}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_storage(records: dict[str, dict], path: Path) -> None:
    """storage.py's learning curves: the share of facts stored against epochs, per run, solid
    where asked as trained, dashed in the other form (with or without the document), dotted in
    the held-out phrasing (storage.REWORDED), where the record has it."""
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    for i, (name, rec) in enumerate(records.items()):
        color = f"C{i}"
        for form, style, said in (("alone", "-", "without the document"), ("in_context", "--", "with the document"),
                                  ("reworded", ":", "in a new phrasing")):
            pts = [(p["epoch"], p[form]) for p in rec["curve"] if form in p]
            if pts:
                ax.plot(*zip(*pts), style, color=color, marker={"-": ".", "--": "x", ":": "^"}[style],
                        label=f"{name}: asked {said}")
    ax.set_xlabel("epochs (one step per question)")
    ax.set_ylabel("facts stored (greedy, word for word)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))   # beside the curves, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
