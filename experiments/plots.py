"""Figures of an experiment (matplotlib, no display): cumulative regret (realized and luck-free)
and traffic split."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd


def plot_regret(
    curves: Mapping[str, pd.Series],
    path: Path,
    title: str,
    ylabel: str = "cumulative regret (utility)",
) -> Path:
    """Cumulative regret vs the oracle over event minutes, one line per policy."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        ax.plot(curve.index, curve.to_numpy(), label=name)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="event minute", ylabel=ylabel, title=title)
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_split(split: pd.DataFrame, path: Path, title: str) -> Path:
    """Each carrier's share of first attempts over event minutes (stacked)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.stackplot(split.index, split.T.to_numpy(), labels=list(split.columns), step="post")
    ax.set(xlabel="event minute", ylabel="share of traffic", ylim=(0, 1), title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
