"""PNG plots of the report page, drawn with matplotlib's Agg canvas from the figure data alone.

`draw(fig)` takes one figure dict of `report_page.figures()` and returns PNG bytes. No pyplot:
figures are built and dropped here, nothing global is configured. Text from the model (layer
names) is drawn literally: `$` would otherwise start matplotlib's math mode.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

WIDTH = 13.0  # inches at 100 dpi: fits the page's 1320 px column
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def draw(fig: dict) -> bytes:
    """PNG bytes of one figure of `report_page.figures()`."""
    return {
        "layer_bits": _layer_bits,
        "layer_sqnr": _layer_sqnr,
        "bytes_share": _bytes_share,
        "rate_fidelity": _rate_fidelity,
        "layers_compared": _layers_compared,
    }[fig["kind"]](fig)


def _text(value, limit: int = 0) -> str:
    text = str(value)
    if limit and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _arr(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _new(height: float, rows: int = 1, cols: int = 1, width: float = WIDTH, **kw):
    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False, **kw)
    return figure, axes


def _layer_axis(ax, n: int) -> None:
    ax.set_xlabel("layer # (table order)")
    ax.set_xlim(-0.7, n - 0.3)
    if n <= 48:
        ax.set_xticks(range(n))
        ax.tick_params(axis="x", labelsize=7 if n > 24 else 9)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=40, integer=True))
    ax.grid(axis="y", alpha=0.3)


def _cap(kept: np.ndarray, *series: np.ndarray) -> float:
    """Top of a bits axis: the quantized layers set the scale; float layers (32 bits) are drawn off scale."""
    values = np.concatenate([np.where(kept, np.nan, s) for s in series] + [[1.0]])
    return float(np.nanmax(values)) * 1.25


def _layer_bits(fig: dict) -> bytes:
    figure, axes = _new(3.4)
    ax = axes[0, 0]
    x = np.array(fig["layers"])
    kept = np.array(fig["kept_float"], dtype=bool)
    stored, nominal, bound = _arr(fig["stored"]), _arr(fig["nominal"]), _arr(fig["bound"])
    cap = _cap(kept, stored, nominal, bound)
    handles = [ax.bar(x[~kept], stored[~kept], width=0.75, color=COLORS[0], label="stored (codes, steps, bases)")]
    if kept.any():
        handles.append(ax.bar(x[kept], cap, width=0.75, color="#bbb", label="kept in float (32 bits, off scale)"))
    if np.isfinite(nominal).any():
        handles.append(
            ax.scatter(
                x, nominal, marker="_", s=90, linewidths=2, color=COLORS[1], zorder=3, label="nominal (code bits)"
            )
        )
    if np.isfinite(bound).any():
        handles.append(
            ax.scatter(
                x,
                bound,
                marker="v",
                s=26,
                color=COLORS[3],
                zorder=3,
                label="Gaussian R-D bound at the distortion reached",
            )
        )
    else:
        ax.text(
            0.995,
            0.97,
            "no rate-distortion bound in this report (tq gives one)",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="#666",
        )
    ax.set_ylabel("bits per weight")
    ax.set_title(_text(fig["title"], 150), fontsize=10, loc="left")
    _layer_axis(ax, len(x))
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncols=4, framealpha=0.85)
    ax.set_ylim(0, cap * 1.1)
    return _png(figure)


def _layer_sqnr(fig: dict) -> bytes:
    figure, axes = _new(3.2)
    ax = axes[0, 0]
    x = np.array(fig["layers"])
    out, weight = _arr(fig["output_sqnr_db"]), _arr(fig["weight_sqnr_db"])
    handles = [ax.bar(x, out, width=0.75, color=COLORS[2], label="layer output SQNR")]
    if np.isfinite(weight).any():
        handles.append(
            ax.scatter(x, weight, marker="_", s=90, linewidths=2, color="#222", zorder=3, label="weight SQNR")
        )
    for i, kept in zip(x, fig["kept_float"]):
        if kept:  # no error to measure: the weight stayed in float
            handles.append(ax.axvspan(i - 0.4, i + 0.4, color="#ddd", label="kept in float"))
    ax.axhline(0, color="#444", linewidth=0.6)
    ax.set_ylabel("dB")
    ax.set_title(_text(fig["title"], 150), fontsize=10, loc="left")
    _layer_axis(ax, len(x))
    ax.legend(handles=handles[:3], fontsize=8, loc="upper left", ncols=3, framealpha=0.85)
    top = np.nanmax(np.concatenate([out, weight, [1.0]]))
    ax.set_ylim(min(0.0, np.nanmin(np.concatenate([out, [0.0]]))) * 1.1, top * 1.2)
    return _png(figure)


def _bytes_share(fig: dict) -> bytes:
    bars = fig["bars"]
    figure, axes = _new(0.9 + 0.24 * len(bars), width=WIDTH * 0.56)  # beside the pass notes on the page
    ax = axes[0, 0]
    y = np.arange(len(bars))
    share = np.array([100 * (b["share"] or 0.0) for b in bars])
    colors = [COLORS[0]] * len(bars)
    colors[-1] = COLORS[7]  # the rest of the file: graph, biases, float tensors
    ax.barh(y, share, color=colors, height=0.7)
    ax.set_yticks(y, [_text(b["label"], 60) for b in bars], fontsize=8)
    ax.invert_yaxis()
    for yi, s, b in zip(y, share, bars):
        ax.text(s, yi, f" {s:.1f}%  {b['bytes'] / 1e3:,.1f} KB", va="center", fontsize=7.5)
    ax.set_xlim(0, max(share.max(), 1.0) * 1.25)
    ax.set_xlabel(f"% of the file's {fig['file_bytes']:,d} bytes")
    ax.set_title(_text(fig["title"], 150), fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)
    return _png(figure)


def _rate_fidelity(fig: dict) -> bytes:
    figure, axes = _new(4.4, 1, 2, sharey=True)
    for ax, key, xlabel in (
        (axes[0, 0], "bytes", "deployable file size (MB)"),
        (axes[0, 1], "bits_per_weight", "bits per weight (codes, steps, bases; float weights at 32)"),
    ):
        scale = 1e6 if key == "bytes" else 1.0
        drawn = [
            [(p[key] / scale, p["sqnr_db"], p) for p in s["points"] if p["sqnr_db"] is not None and p[key] is not None]
            for s in fig["series"]
        ]
        every = np.array([(x, y) for pts in drawn for x, y, _ in pts] or [(0.0, 0.0)])
        span = np.ptp(every, axis=0) + 1e-9
        placed: list[tuple[float, float]] = []
        right = every[:, 0].max()
        for i, (series, pts) in enumerate(zip(fig["series"], drawn)):
            color = COLORS[i % len(COLORS)]
            xs, ys = [x for x, _, _ in pts], [y for _, y, _ in pts]
            ax.plot(xs, ys, "o-", color=color, label=_text(series["label"], 60), markersize=5)
            for xv, yv, p in pts:
                # points on (almost) the same spot get their labels stacked downwards instead of overprinted
                near = sum(abs(xv - a) < 0.04 * span[0] and abs(yv - b) < 0.04 * span[1] for a, b in placed)
                placed.append((xv, yv))
                text = ax.annotate(
                    _text(p["label"], 32),
                    (xv, yv),
                    textcoords="offset points",
                    xytext=(-5 if xv > 0.85 * right else 5, 4 - 11 * near),
                    ha="right" if xv > 0.85 * right else "left",  # labels of the rightmost points stay inside
                    fontsize=8.5,
                    color=color,
                )
                text.set_in_layout(False)  # a long label must not shrink the axes
        ax.set_xlabel(xlabel)
        ax.set_xlim(0, right * 1.05 + 1e-9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("worst output SQNR (dB)")
    axes[0, 0].legend(fontsize=8, loc="best")
    figure.suptitle(_text(fig["title"], 150), fontsize=10, x=0.01, ha="left")
    return _png(figure)


def _layers_compared(fig: dict) -> bytes:
    figure, axes = _new(6.0, 2, 1, sharex=True)
    x = np.array(fig["layers"])
    for i, series in enumerate(fig["series"]):
        color = COLORS[i % len(COLORS)]
        label = _text(series["label"], 48)
        stored = np.where(np.array(series["kept_float"], dtype=bool), np.nan, _arr(series["stored"]))
        axes[0, 0].plot(x, stored, ".-", color=color, linewidth=1, markersize=5, label=label)
        axes[1, 0].plot(x, _arr(series["output_sqnr_db"]), ".-", color=color, linewidth=1, markersize=5)
    kept = np.array([any(f) for f in zip(*(s["kept_float"] for s in fig["series"]))], dtype=bool)
    if kept.any():  # float layers at 32 bits would flatten the rest: marked at the top instead
        top = _cap(
            np.zeros_like(kept),
            *(np.where(np.array(s["kept_float"]), np.nan, _arr(s["stored"])) for s in fig["series"]),
        )
        axes[0, 0].scatter(
            x[kept],
            np.full(kept.sum(), top),
            marker="s",
            s=30,
            color="#999",
            label="kept in float by some run (32 bits)",
        )
        axes[0, 0].set_ylim(0, top * 1.08)
    axes[0, 0].set_ylabel("stored bits per weight")
    axes[1, 0].set_ylabel("layer output SQNR (dB)")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    axes[0, 0].set_title(_text(fig["title"], 150), fontsize=10, loc="left")
    for ax in axes[:, 0]:
        _layer_axis(ax, len(x))
    axes[0, 0].set_xlabel("")
    return _png(figure)
