"""The comparison plots: ``loss/epoch``, smoothed ``loss/current`` and ``lr/d*lr``, overlaid.

One colour per variant; the baseline is black and thicker, its seed repeats black and dashed,
so the eye finds the reference first and sees the noise between identical settings. Drawn with
matplotlib's Agg renderer (no display needed, no pyplot) into PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from loralab.sweep.report.collect import RunReport

BASELINE_COLOUR = "black"
FIGURE_SIZE = (8.0, 3.6)  # inches, at DPI below: 800 x 360 px, readable inline and when zoomed
DPI = 100
# loss/current is noisy (every step draws new noise and timesteps): smoothed over a window of
# about a 25th of the run, at least 5 steps, like TensorBoard's smoothing slider set to match.
SMOOTHING_FRACTION = 1 / 25
MIN_SMOOTHING_WINDOW = 5


@dataclass(frozen=True)
class PlotSpec:
    """What one plot shows."""

    tag: str
    title: str
    x_label: str
    y_label: str
    smooth: bool = False
    fallback_tag: str | None = None  # drawn for runs without ``tag`` (marked in the legend)


PLOTS = (
    PlotSpec("loss/epoch", "loss/epoch (mean loss of each epoch)", "epoch", "loss"),
    PlotSpec("loss/current", "loss/current, smoothed", "step", "loss", smooth=True),
    PlotSpec(
        "lr/d*lr",
        "lr/d*lr (effective learning rate; lr/unet for optimizers without D-adaptation)",
        "step",
        "learning rate",
        fallback_tag="lr/unet",
    ),
)


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing) with weight ``1 - 1/window``.

    Non-finite values are passed through without entering the average, so one NaN step does not
    erase the rest of the curve.
    """
    weight = 1.0 - 1.0 / max(1, window)
    average, correction, out = 0.0, 0.0, []
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        average = weight * average + (1.0 - weight) * value
        correction = weight * correction + (1.0 - weight)
        out.append(average / correction)
    return out


def run_styles(runs: Sequence[RunReport]) -> dict[str, dict[str, object]]:
    """matplotlib line style per run name: baseline black (repeats dashed), variants coloured."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    styles: dict[str, dict[str, object]] = {}
    variant = 0
    for run in runs:
        if run.is_baseline:
            dashed = (run.seed_repeat or 1) > 1
            styles[run.name] = {
                "color": BASELINE_COLOUR,
                "linewidth": 2.4,
                "linestyle": "--" if dashed else "-",
                "zorder": 3,
            }
        else:
            styles[run.name] = {
                "color": palette[variant % len(palette)],
                "linewidth": 1.4,
                "linestyle": "-",
                "zorder": 2,
            }
            variant += 1
    return styles


def plot_png(spec: PlotSpec, runs: Sequence[RunReport]) -> bytes | None:
    """The plot of ``spec`` over ``runs`` as PNG bytes, or None when no run logged its tag."""
    # A bare Figure renders with Agg and touches no global pyplot state (safe in a long process).
    from matplotlib.figure import Figure

    styles = run_styles(runs)
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.add_subplot()
    drawn = 0
    for run in runs:
        tag = spec.tag if spec.tag in run.scalars else spec.fallback_tag
        series = run.scalars.get(tag) if tag else None
        if not series:
            continue
        steps = [step for step, _ in series]
        values = [value for _, value in series]
        if spec.smooth:
            values = smoothed(values, max(MIN_SMOOTHING_WINDOW, round(len(values) * SMOOTHING_FRACTION)))
        label = run.display_name + ("" if tag == spec.tag else f" ({tag})")
        marker = "o" if len(series) <= 30 else None  # epochs: few points, show each
        axes.plot(steps, values, label=label, marker=marker, markersize=3, **styles[run.name])
        drawn += 1
    if not drawn:
        return None
    axes.set_title(spec.title, fontsize=10)
    axes.set_xlabel(spec.x_label)
    axes.set_ylabel(spec.y_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
