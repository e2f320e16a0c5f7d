"""The report's metrics by epoch: inline SVG line charts (val and test score, top-1, loss) and the
table beside them, the val-picked best epoch marked in both. Plain strings, no script or CDN."""
from __future__ import annotations

import html
import math

VAL, TEST, TRAIN = "#1f6fd1", "#e07b00", "#777777"


def by_epoch_charts(rows: list[dict], test: dict[int, dict] | None, best: int) -> str:
    def series(column: str) -> list[tuple[int, float]]:
        return [(row["epoch"], row.get(column, math.nan)) for row in rows]

    def test_series(column: str) -> list[tuple[int, float]]:
        return sorted((epoch, m[column]) for epoch, m in (test or {}).items())
    charts = [
        line_chart("Competition score (0-1000)", {"val score": (VAL, series("score")),
                                                   "test score": (TEST, test_series("score"))},
                    best, (0.0, 1000.0)),
        line_chart("Top-1 hit rate", {"val top-1": (VAL, series("top1")),
                                       "test top-1": (TEST, test_series("top1"))},
                    best, (0.0, 1.0)),
        line_chart("Loss", {"train loss": (TRAIN, series("train_loss")),
                             "val loss": (VAL, series("val_loss"))}, best, None),
    ]
    return "<h2 id=\"by-epoch\">Metrics by epoch</h2>\n<div class=\"charts\">" + "".join(charts) + \
        "</div>"


def line_chart(title: str, lines: dict[str, tuple[str, list[tuple[int, float]]]], best: int,
                y_range: tuple[float, float] | None) -> str:
    """An SVG line chart: epochs across, one polyline per series (gaps where NaN), the best
    epoch as a dashed line; every point carries data-series/-epoch/-value (and a tooltip)."""
    width, height, left, right, top, bottom = 360, 250, 48, 12, 28, 52
    points = [(e, v) for _, data in lines.values() for e, v in data if not math.isnan(v)]
    epochs = sorted({e for _, data in lines.values() for e, _ in data} | {best})
    if y_range is None:
        values = [v for _, v in points] or [0.0, 1.0]
        low, high = min(values), max(values)
        y_range = (low, high if high > low else low + 1.0)
    x0, x1 = epochs[0], max(epochs[-1], epochs[0] + 1)

    def x(epoch: float) -> float:
        return left + (epoch - x0) / (x1 - x0) * (width - left - right)

    def y(value: float) -> float:
        share = (value - y_range[0]) / (y_range[1] - y_range[0])
        return top + (1 - share) * (height - top - bottom)
    parts = [f"<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" "
             f"height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\">"
             f"<title>{escape(title)}</title>"
             f"<text x=\"{left}\" y=\"16\" class=\"title\">{escape(title)}</text>"]
    for i in range(5):  # horizontal grid with labels
        value = y_range[0] + i * (y_range[1] - y_range[0]) / 4
        parts.append(f"<line x1=\"{left}\" x2=\"{width - right}\" y1=\"{y(value):.1f}\" "
                     f"y2=\"{y(value):.1f}\" class=\"grid\"/><text x=\"{left - 4}\" "
                     f"y=\"{y(value) + 4:.1f}\" class=\"tick\" text-anchor=\"end\">"
                     f"{tick(value)}</text>")
    step = max(1, math.ceil(len(epochs) / 12))
    for epoch in epochs[::step]:
        parts.append(f"<text x=\"{x(epoch):.1f}\" y=\"{height - bottom + 14}\" class=\"tick\" "
                     f"text-anchor=\"middle\">{epoch}</text>")
    parts.append(f"<text x=\"{(left + width - right) / 2}\" y=\"{height - bottom + 27}\" "
                 f"class=\"tick\" text-anchor=\"middle\">epoch</text>")
    right_half = x(best) > (left + width - right) / 2  # label on the side with room
    parts.append(f"<line x1=\"{x(best):.1f}\" x2=\"{x(best):.1f}\" y1=\"{top}\" "
                 f"y2=\"{height - bottom}\" class=\"best\" data-best-epoch=\"{best}\"/>"
                 f"<text x=\"{x(best) + (-4 if right_half else 4):.1f}\" y=\"{top + 10}\" "
                 f"class=\"best-label\" text-anchor=\"{'end' if right_half else 'start'}\">"
                 f"best epoch</text>")
    legend_x = left
    for name, (colour, data) in lines.items():
        runs = [[]]  # stretches without NaN: a gap in the data is a gap in the line
        for epoch, value in data:
            if math.isnan(value):
                runs.append([])
            else:
                runs[-1].append((epoch, value))
        runs = [run for run in runs if run]
        for run in runs:
            coords = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in run)
            parts.append(f"<polyline points=\"{coords}\" fill=\"none\" stroke=\"{colour}\" "
                         f"stroke-width=\"2\"/>")
        for epoch, value in (p for run in runs for p in run):
            parts.append(f"<circle cx=\"{x(epoch):.1f}\" cy=\"{y(value):.1f}\" r=\"3\" "
                         f"fill=\"{colour}\" data-series=\"{escape(name)}\" data-epoch=\"{epoch}\" "
                         f"data-value=\"{value!r}\"><title>{escape(name)}, epoch {epoch}: "
                         f"{value:.4g}</title></circle>")
        if runs:
            parts.append(f"<rect x=\"{legend_x}\" y=\"{height - 12}\" width=\"10\" height=\"4\" "
                         f"fill=\"{colour}\"/><text x=\"{legend_x + 14}\" y=\"{height - 7}\" "
                         f"class=\"tick\">{escape(name)}</text>")
            legend_x += 110
    return "".join(parts) + "</svg>"


def metrics_table(rows: list[dict], test: dict[int, dict] | None, best: int) -> str:
    columns = [("train loss", lambda r, t: fmt(r.get("train_loss"), 4)),
               ("val loss", lambda r, t: fmt(r.get("val_loss"), 4)),
               ("val score", lambda r, t: fmt(r["score"], 1)),
               ("val top-1", lambda r, t: fmt(r.get("top1"), 3))]
    if test:
        columns += [("test score", lambda r, t: fmt(t.get("score"), 1)),
                    ("test top-1", lambda r, t: fmt(t.get("top1"), 3)),
                    ("test top-5", lambda r, t: fmt(t.get("top5"), 3)),
                    ("test top-10", lambda r, t: fmt(t.get("top10"), 3)),
                    ("test mAP@k", lambda r, t: fmt(t.get("map_at_k"), 3))]
    head = "".join(f"<th>{name}</th>" for name, _ in columns)
    body = []
    for row in rows:
        measured = (test or {}).get(row["epoch"], {})
        cells = "".join(f"<td>{cell(row, measured)}</td>" for _, cell in columns)
        mark = " class=\"best\"" if row["epoch"] == best else ""
        body.append(f"<tr{mark} data-epoch=\"{row['epoch']}\"><td>{row['epoch']}</td>{cells}</tr>")
    return (f"<table id=\"metrics\"><tr><th>epoch</th>{head}</tr>" + "".join(body) + "</table>"
            "<p class=\"note\">Val: the val split of the train images, measured by the train "
            "stage; test: the query/gallery split, measured by the retrieve stage. The best epoch "
            "(highlighted) is picked on val only.</p>")


def fmt(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def tick(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2f}"


def escape(text: object) -> str:
    return html.escape(str(text))
