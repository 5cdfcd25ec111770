"""Sweep plots for the parent MLflow run (PNG, matplotlib Agg): ASR-vs-capability Pareto front, objective over trials.

Input rows are the sweep's results table: dicts with ``trial_id``, ``status`` and, for trials that reported,
``objective``, ``objectives/asr`` and ``objectives/capability``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

ASR, CAPABILITY = "objectives/asr", "objectives/capability"


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (asr, capability) that no other point beats: lower ASR and higher capability."""
    front = []
    for i, (a, c) in enumerate(points):
        dominated = any(a2 <= a and c2 >= c and (a2 < a or c2 > c) for j, (a2, c2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Scatter of ASR vs capability per trial, the Pareto front joined and labelled by trial index."""
    plt = _pyplot()
    pts = [(r, _num(r, ASR), _num(r, CAPABILITY)) for r in rows]
    pts = [(r, a, c) for r, a, c in pts if a is not None and c is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        ax.scatter([a for _, a, _ in pts], [c for _, _, c in pts], color="tab:gray", label="trials")
        front = sorted((pts[i] for i in pareto_front([(a, c) for _, a, c in pts])), key=lambda p: p[1])
        ax.plot([a for _, a, _ in front], [c for _, _, c in front], "o-", color="tab:red", label="Pareto front")
        for r, a, c in front:
            ax.annotate(str(r.get("trial_index", r["trial_id"])), (a, c), textcoords="offset points", xytext=(4, 4))
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported ASR and capability", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, ax, path, "ASR (lower is safer)", "capability (higher is better)", "ASR vs capability")


def plot_objective(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Objective of each trial in trial order, with the best-so-far line."""
    plt = _pyplot()
    pts = [(int(r.get("trial_index", i)), _num(r, "objective")) for i, r in enumerate(rows)]
    pts = sorted((i, v) for i, v in pts if v is not None)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        xs, ys = [i for i, _ in pts], [v for _, v in pts]
        best, running = [], -math.inf
        for v in ys:
            running = max(running, v)
            best.append(running)
        ax.plot(xs, ys, "o", color="tab:blue", label="trial")
        ax.step(xs, best, where="post", color="tab:green", label="best so far")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported an objective", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, ax, path, "trial", "objective (higher is better)", "objective over trials")
