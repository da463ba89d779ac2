"""SLO attainment against request rate, with the target and the goodput marked (matplotlib).

matplotlib is optional (``pip install distserve[bench]``): it is imported only when a plot is
asked for, and its absence is a clear error, not an import failure of the bench.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from distserve.bench.report import Goodput, RateResult


def plot_attainment(
    results: Sequence[RateResult],
    target: float,
    goodput: Goodput,
    path: str | Path,
    title: str = "",
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    points = sorted(
        (r.rate_per_s, r.slo_attainment)
        for r in results
        if r.slo_attainment is not None and math.isfinite(r.rate_per_s)
    )
    if not points:
        raise RuntimeError("--plot needs --ttft-slo/--tpot-slo and at least one finite rate")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="SLO attainment")
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
    if goodput.rate_per_s is not None:
        ax.axvline(
            goodput.rate_per_s,
            color="green",
            linestyle=":",
            label=f"goodput {goodput.rate_per_s:.2f} req/s",
        )
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "SLO attainment vs rate")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
