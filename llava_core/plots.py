"""The run's plots, each built as a matplotlib figure (what tests read: titles, axes, lines) and saved as PNG bytes.

`prepare/lengths.png`: tokens per sample of each dataset, `prepare.max_length` marked. `instruct/loss_curves.png`: each
training stage's loss per step on a log scale, the raw values faint behind a moving average: a loss that falls from
6.5 to 0.05 is a flat line for most of its steps on a linear scale.
"""
from __future__ import annotations

import io

import numpy as np


def pyplot():
    """pyplot without a display (workers and CI have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


def moving_average(values, window: int) -> np.ndarray:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    values = np.asarray(values, dtype=float)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_figure(histories: dict[str, list[dict]]):
    """Each stage's loss per optimizer step, side by side; the window of the average is a twentieth of the points."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(histories), 1), figsize=(5 * max(len(histories), 1), 3.5), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items()):
        steps, losses = [r["step"] for r in history], [r["loss"] for r in history]
        window = max(1, len(losses) // 20)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="logged")
        ax.plot(steps, moving_average(losses, window), color="tab:blue", label=f"mean of {window} logged")
        ax.set_yscale("log")
        ax.set(title=f"{stage}: training loss", xlabel="optimizer step", ylabel="loss (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def lengths_figure(all_lengths: dict, max_length: int):
    """A histogram of tokens per written row for each dataset, `max_length` as a vertical line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, lengths in all_lengths.items():
        ax.hist(lengths, bins=40, alpha=0.6, label=f"{name} ({len(lengths)} rows)")
    ax.axvline(max_length, color="tab:red", linestyle="--", label=f"prepare.max_length = {max_length}")
    ax.set(title="Tokens per sample by dataset", xlabel="tokens per sample (image tokens included)", ylabel="rows")
    ax.legend()
    return fig
