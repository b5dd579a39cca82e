"""Figures for run reports, drawn off-screen with the Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, StrMethodFormatter

Series = Sequence[tuple[int, float]]

TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#d62728"


def figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (no pyplot state), laid out as every report plot is."""
    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes (what every report and benchmark plot returns)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (shrinking at the ends, NaNs skipped).

    Centred rather than an EMA so the smoothed train curve does not lag the validation points.
    """
    half = window // 2
    sums, counts = [0.0], [0]  # prefix sums over the finite values
    for v in values:
        finite = not math.isnan(v)
        sums.append(sums[-1] + (v if finite else 0.0))
        counts.append(counts[-1] + finite)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        n = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / n if n else math.nan)
    return out


def _xy(series: Series) -> tuple[list[int], list[float]]:
    steps = [int(s) for s, _ in series]
    values = [math.nan if v is None else float(v) for _, v in series]
    return steps, values


def _plain_log_labels(ax: Axes, ratio: float) -> None:
    """Label a log y-axis 0.1, 1, 10 rather than 10^-1; within a short range also 2, 3, 5 × 10^k."""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    if ratio < 30:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))


def loss_curve(
    history: Mapping[str, Series],
    title: str,
    *,
    train_key: str = "train/loss",
    val_key: str = "val/loss",
    log_y: bool = False,
    ylabel: str = "loss",
    smooth_after: int = 50,
) -> bytes:
    """PNG bytes of train and validation loss against optimizer step on one axes.

    history: metric name -> [(step, value), ...]; only `train_key` and `val_key` are drawn.
    The train loss is drawn raw (faint) and, past `smooth_after` points, also as a centred moving
    mean; the validation loss as markers joined by a line. `log_y` is honoured only when every
    finite value is positive. Empty or single-point series still give a valid figure.
    """
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot()
    finite: list[float] = []

    train = history.get(train_key) or []
    if train:
        steps, values = _xy(train)
        finite += [v for v in values if math.isfinite(v)]
        many = len(train) > smooth_after
        ax.plot(steps, values, color=TRAIN_COLOR, lw=1.0, alpha=0.3 if many else 0.9,
                marker="." if len(train) == 1 else None, label="train" if not many else "train (raw)")
        if many:
            window = max(5, len(train) // 50) | 1
            ax.plot(steps, rolling_mean(values, window), color=TRAIN_COLOR, lw=1.8,
                    label=f"train (moving mean of {window} points)")

    val = history.get(val_key) or []
    if val:
        steps, values = _xy(val)
        finite += [v for v in values if math.isfinite(v)]
        ax.plot(steps, values, color=VAL_COLOR, lw=1.5, marker="o", ms=4.5, label="validation", zorder=3)

    if not finite:
        ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")
    elif log_y and min(finite) > 0:
        ax.set_yscale("log")
        _plain_log_labels(ax, max(finite) / min(finite))
        ylabel += " (log scale)"
    all_steps = {int(s) for series in (train, val) for s, _ in series}
    if len(all_steps) == 1:  # a single step: widen so integer ticks exist around it
        (only,) = all_steps
        ax.set_xlim(only - 1, only + 1)
    ax.set_title(title, fontsize=11, wrap=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False)

    return png(fig)


def loss_curves(histories: Mapping[str, Mapping[str, Series]], title: str = "Loss curves", smooth_after: int = 50) -> bytes:
    """PNG bytes of several runs' losses on one axes: run label -> its history.

    Each run has one colour: its train loss as a line (a centred moving mean past `smooth_after`
    points) and its validation loss as markers.
    """
    fig = figure(8, 4.8)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(histories))]
    drawn = False
    for color, (label, history) in zip(colors, histories.items()):
        train = history.get("train/loss") or []
        if train:
            steps, values = _xy(train)
            if len(values) > smooth_after:
                values = rolling_mean(values, max(5, len(values) // 50) | 1)
            ax.plot(steps, values, color=color, lw=1.5, label=f"{label} train")
            drawn = True
        val = history.get("val/loss") or []
        if val:
            steps, values = _xy(val)
            ax.plot(steps, values, color=color, lw=0, marker="o", ms=5, label=f"{label} validation")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no loss recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(frameon=False, fontsize=8)
    return png(fig)


def grouped_bars(series: Mapping[str, Mapping[str, float]], ylabel: str, title: str) -> bytes:
    """PNG bytes of a grouped bar chart: group (a source) -> bar name (a case) -> value."""
    names = list(dict.fromkeys(name for values in series.values() for name in values))
    fig = figure(max(6.0, 1.2 * len(names) * max(1, len(series)) ** 0.5 + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (group, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, name in enumerate(names) if name in values]
        ys = [values[name] for name in names if name in values]
        bars = ax.bar(xs, ys, width, label=group, color=f"C{i % 10}")
        ax.bar_label(bars, labels=[f"{y:,.0f}" if y >= 100 else f"{y:.3g}" for y in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return png(fig)


def reward_kl(history: Mapping[str, Series], title: str, kl_target: float | None = None,
              reward_keys: Sequence[str] = ("ppo/true_reward", "ppo/score"), kl_key: str = "ppo/kl",
              val_reward_key: str = "val/true_reward", val_kl_key: str = "val/kl", smooth_after: int = 30) -> bytes:
    """PNG bytes of an RL run: rewards (left) and KL(pi || ref) per sequence (right) against the step.

    Per-iteration series are drawn faint and, past `smooth_after` points, as a centred moving mean;
    validation points (held-out prompts) as markers; the controller's KL target as a dashed line.
    """
    fig = figure(11, 4.2)
    left, right = fig.subplots(1, 2)
    colors = ("#2ca02c", "#9467bd", "#8c564b")

    def draw(ax: Axes, key: str, color: str, label: str) -> None:
        series = history.get(key) or []
        if not series:
            return
        steps, values = _xy(series)
        many = len(series) > smooth_after
        ax.plot(steps, values, color=color, lw=1.0, alpha=0.3 if many else 0.9, label=label if not many else None)
        if many:
            ax.plot(steps, rolling_mean(values, max(5, len(series) // 30) | 1), color=color, lw=1.8, label=f"{label} (moving mean)")

    for key, color in zip(reward_keys, colors):
        draw(left, key, color, key.split("/")[-1].replace("_", " "))
    draw(right, kl_key, colors[0], "KL, rollouts")
    for ax, key, label in ((left, val_reward_key, "true reward, held-out prompts"), (right, val_kl_key, "KL, held-out prompts")):
        series = history.get(key) or []
        if series:
            steps, values = _xy(series)
            ax.plot(steps, values, color=VAL_COLOR, lw=1.5, marker="o", ms=4.5, label=label, zorder=3)
    if kl_target is not None:
        right.axhline(kl_target, color="black", ls="--", lw=1.0, label=f"KL target ({kl_target:g})")
    left.set(xlabel="PPO iteration", ylabel="reward", title="reward")
    right.set(xlabel="PPO iteration", ylabel="nats per sequence", title="KL(policy || reference)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return png(fig)


def frontier_plot(points: Mapping[str, Mapping[str, object]], title: str) -> bytes:
    """PNG bytes of reward against KL(pi || ref): one marker per arm, DPO and PPO each joined in order of KL
    (the paper's Fig. 2 left), other arms and the base as labelled markers.

    points: arm name -> {"kind": "DPO" | "PPO" | "base" | ..., "kl", "reward", "reward_se"}.
    """
    fig = figure(7.5, 4.8)
    ax = fig.add_subplot()
    styles = {"DPO": ("#d62728", "o"), "PPO": ("#1f77b4", "s"), "base": ("black", "*")}
    others = iter(("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"))
    for kind in dict.fromkeys(str(p["kind"]) for p in points.values()):
        group = sorted(((name, p) for name, p in points.items() if p["kind"] == kind), key=lambda item: float(item[1]["kl"]))
        color, marker = styles.get(kind, (next(others, "gray"), "D"))
        kls = [float(p["kl"]) for _, p in group]
        rewards = [float(p["reward"]) for _, p in group]
        errors = [float(p.get("reward_se", 0.0)) for _, p in group]
        ax.errorbar(kls, rewards, yerr=errors, color=color, marker=marker, ms=6, lw=1.5 if kind in ("DPO", "PPO") else 0,
                    elinewidth=0.8, capsize=2, label=kind)
        for name, p in group:
            ax.annotate(name, (float(p["kl"]), float(p["reward"])), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.set(xlabel="KL(policy || reference), nats per sequence", ylabel="mean true reward (VADER)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def expert_load_heatmap(loads: Mapping[str, Sequence[Sequence[Sequence[float]]]], title: str, bins: int = 50) -> bytes:
    """PNG bytes of each arm's expert load over training: arm -> per step, per MoE layer, slots per expert.

    One panel per arm: experts down, training across (steps averaged into `bins` columns), colour the
    expert's share of the slots relative to an even split (1 = balanced), averaged over layers, on
    one log colour scale for every panel, so a collapsed router shows as a few bright rows.
    """
    arms = [name for name, steps in loads.items() if steps]
    fig = figure(8, 1.2 + 1.6 * max(1, len(arms)))
    if not arms:
        fig.add_subplot().text(0.5, 0.5, "no expert loads recorded", ha="center", va="center", color="0.4")
    grids = {}
    for name in arms:
        steps = loads[name]
        experts = len(steps[0][0])
        relative = []  # per step, per expert: share x experts, averaged over layers
        for layers in steps:
            row = [0.0] * experts
            for load in layers:
                total = sum(load) or 1.0
                for i, count in enumerate(load):
                    row[i] += count / total * experts / len(layers)
            relative.append(row)
        width = max(1, math.ceil(len(relative) / bins))
        columns = [[sum(r[i] for r in relative[c : c + width]) / len(relative[c : c + width]) for i in range(experts)]
                   for c in range(0, len(relative), width)]
        grids[name] = ([list(col) for col in zip(*columns)], width)
    values = [v for grid, _ in grids.values() for row in grid for v in row if v > 0]
    norm = LogNorm(vmin=max(min(values, default=0.1), 0.05), vmax=max(max(values, default=10.0), 1.5))
    image = None
    for index, name in enumerate(arms):
        ax = fig.add_subplot(len(arms), 1, index + 1)
        grid, width = grids[name]
        image = ax.imshow([[max(v, norm.vmin) for v in row] for row in grid], aspect="auto", cmap="magma", norm=norm,
                          interpolation="nearest", extent=(0, len(grid[0]) * width, len(grid) - 0.5, -0.5))
        ax.set_ylabel(f"{name}\nexpert", fontsize=7)
        ax.tick_params(labelsize=7)
        if index == len(arms) - 1:
            ax.set_xlabel("optimizer step")
    if image is not None:
        fig.colorbar(image, ax=fig.axes, label="load / even share (layer mean)", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return png(fig)


def metric_curves(series: Mapping[str, Series], ylabel: str, title: str, smooth: int = 25) -> bytes:
    """PNG bytes of one metric per arm against the step (a centred moving mean over `smooth` steps)."""
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    for index, (name, points) in enumerate(series.items()):
        if points:
            steps, values = _xy(points)
            ax.plot(steps, rolling_mean(values, smooth) if len(values) > smooth else values, color=f"C{index % 10}", lw=1.5,
                    label=name)
    ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)
    return png(fig)


def context_curves(series: Mapping[str, Series], ylabel: str, title: str,
                   computed: Mapping[str, Series] | None = None) -> bytes:
    """PNG bytes of one measured value per arm against context length (log-log, markers); `computed` adds,
    per arm, a dashed line of the same value from a formula, to see measurement and theory agree."""
    fig = figure(8, 4.2)
    ax = fig.add_subplot()
    for index, (name, points) in enumerate(series.items()):
        color = f"C{index % 10}"
        if computed and computed.get(name):
            ax.plot(*_xy(computed[name]), color=color, lw=1, ls="--", alpha=0.7)
        if points:
            ax.plot(*_xy(points), color=color, lw=1.5, marker="o", ms=4, label=name)
    ax.set(xlabel="context length (tokens)", ylabel=ylabel, title=title, xscale="log", yscale="log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8, title="measured (computed dashed)" if computed else None, title_fontsize=8)
    return png(fig)
