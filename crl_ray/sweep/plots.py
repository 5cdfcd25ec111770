"""Sweep plots for the parent MLflow run (PNG, matplotlib Agg): ASR-vs-capability Pareto front, objective over trials.

Input rows are the sweep's results table: dicts with ``trial_id``, ``status`` and, for trials that reported,
``objective``, ``objectives/asr``, ``objectives/capability`` and ``feasible``. Trials outside
``objective.constraints`` (``feasible`` False) are drawn as hollow grey markers and take no part in the Pareto
front or the best-so-far line; a row without the flag counts as feasible.
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


def _feasible(row: dict[str, Any]) -> bool:
    return row.get("feasible") is not False


def feasible_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feasible rows on the ASR-vs-capability Pareto front, by increasing ASR (infeasible rows never are)."""
    pts = [(r, _num(r, ASR), _num(r, CAPABILITY)) for r in rows if _feasible(r)]
    pts = [(r, a, c) for r, a, c in pts if a is not None and c is not None]
    front = [pts[i] for i in pareto_front([(a, c) for _, a, c in pts])]
    return [r for r, _, _ in sorted(front, key=lambda p: (p[1], -p[2]))]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    if xlabel == "trial":  # trial numbers, not fractions
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _scatter(ax, pts: Sequence[tuple[float, float]], feasible: bool) -> None:
    if not pts:
        return
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    if feasible:
        ax.scatter(xs, ys, color="tab:blue", label="feasible trial")
    else:
        ax.scatter(xs, ys, facecolors="none", edgecolors="tab:gray", label="infeasible (outside constraints)")


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Scatter of ASR vs capability per trial (infeasible ones hollow), the feasible Pareto front joined and
    labelled by trial index."""
    plt = _pyplot()
    pts = [(r, _num(r, ASR), _num(r, CAPABILITY)) for r in rows]
    pts = [(r, a, c) for r, a, c in pts if a is not None and c is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        _scatter(ax, [(a, c) for r, a, c in pts if _feasible(r)], feasible=True)
        _scatter(ax, [(a, c) for r, a, c in pts if not _feasible(r)], feasible=False)
        front = [(r, _num(r, ASR), _num(r, CAPABILITY)) for r in feasible_front(rows)]
        if front:
            ax.plot([a for _, a, _ in front], [c for _, _, c in front], "o-", color="tab:red", label="Pareto front")
        else:
            ax.text(0.5, 0.95, "no feasible trial: no Pareto front", ha="center", va="top", transform=ax.transAxes)
        for r, a, c in front:
            ax.annotate(str(r.get("trial_index", r["trial_id"])), (a, c), textcoords="offset points", xytext=(4, 4))
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported ASR and capability", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, ax, path, "ASR (lower is safer)", "capability (higher is better)", "ASR vs capability")


def best_so_far(rows: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """(trial index, best objective of the feasible trials up to it), from the first feasible trial on."""
    pts = sorted(((int(r.get("trial_index", i)), _num(r, "objective")) for i, r in enumerate(rows) if _feasible(r)),
                 key=lambda p: p[0])
    out: list[tuple[int, float]] = []
    running = -math.inf
    for i, v in pts:
        if v is not None:
            running = max(running, v)
        if running > -math.inf:
            out.append((i, running))
    return out


def plot_objective(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Objective of each trial in trial order (infeasible ones hollow), with the best-so-far line of the feasible
    ones."""
    plt = _pyplot()
    pts = [(r, int(r.get("trial_index", i)), _num(r, "objective")) for i, r in enumerate(rows)]
    pts = [(r, i, v) for r, i, v in pts if v is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if pts:
        _scatter(ax, [(i, v) for r, i, v in pts if _feasible(r)], feasible=True)
        _scatter(ax, [(i, v) for r, i, v in pts if not _feasible(r)], feasible=False)
        best = best_so_far(rows)
        if best:
            ax.step([i for i, _ in best], [v for _, v in best], where="post", color="tab:green",
                    label="best feasible so far")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no trial reported an objective", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, ax, path, "trial", "objective (higher is better)", "objective over trials")
