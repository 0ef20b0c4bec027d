"""A drain's timeline as one self-contained HTML page: inline SVG and CSS, nothing fetched.

Pure: a `timeline.Timeline` in, the page's text out.
"""

from __future__ import annotations

import datetime
from html import escape

from hostmaint.coordinator.timeline import Lane, Timeline

WIDTH = 1100
LABEL_W = 190
LANE_H = 30
AXIS_H = 26
LINK_H = 150

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.meta { color: #555; font-size: 13px; margin-bottom: 12px; }
svg text { font-size: 11px; fill: #333; }
.lane-label { font-size: 12px; }
.grid { stroke: #e4e4e4; }
.bar.planned { fill: #c9ced6; }
.bar.actual.completed { fill: #2e7d32; } .bar.actual.failed { fill: #c62828; }
.bar.actual.migrating, .bar.actual.queued { fill: #1565c0; }
.bar.actual.skipped, .bar.actual.unmovable { fill: #9e9e9e; }
.burst { fill: #ff9800; opacity: 0.75; }
.round { stroke: #fff; stroke-width: 1; opacity: 0.8; }
.tune { fill: #6a1b9a; } .abort, .retry { fill: #c62828; }
.postcopy { fill: #00838f; } .switchover { fill: #000; }
.link { fill: none; stroke: #1565c0; stroke-width: 1.5; }
.link-area { fill: #1565c0; opacity: 0.15; }
.capacity { stroke: #c62828; stroke-dasharray: 4 3; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 14px; height: 10px; margin-right: 4px; }
"""


def _x(t: float, span_s: float) -> float:
    return LABEL_W + (WIDTH - LABEL_W - 10) * (t / span_s)


def _ticks(span_s: float) -> list[float]:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span_s / step <= 12:
            break
    return [i * step for i in range(int(span_s // step) + 1)]


def _tick_label(x: float, y: float, tick: float) -> str:
    """A tick's label right of its line, or left of it at the right edge (not cut off)."""
    if x > WIDTH - 50:
        return f'<text x="{x - 2:.1f}" y="{y}" text-anchor="end">{tick:g} s</text>'
    return f'<text x="{x + 2:.1f}" y="{y}">{tick:g} s</text>'


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.0f} Mbit/s"


def _title(text: str) -> str:
    return f"<title>{escape(text)}</title>"


def _lane(lane: Lane, y: float, span_s: float) -> list[str]:
    where = lane.target or "?"
    out = [
        f'<text class="lane-label" x="4" y="{y + 19}">{escape(lane.name[:26])}'
        f"{_title(f'{lane.name} {lane.vm_uuid} -> {where}')}</text>"
    ]
    bars = (
        ("bar planned", lane.planned, 3, 8, lane.predicted_downtime_ms, "planned"),
        (f"bar actual {lane.state}", lane.actual, 13, 14, lane.actual_downtime_ms, lane.state),
    )
    for cls, span, dy, height, down_ms, what in bars:
        if span is None:
            continue
        a, b = span
        out.append(
            f'<rect class="{cls}" data-vm="{lane.vm_uuid}" x="{_x(a, span_s):.1f}" '
            f'y="{y + dy}" width="{max(1.0, _x(b, span_s) - _x(a, span_s)):.1f}" '
            f'height="{height}">{_title(f"{what}: {a:.1f}-{b:.1f} s, {down_ms:.0f} ms down")}'
            "</rect>"
        )
    for a, b in lane.bursts:
        out.append(
            f'<rect class="burst" x="{_x(a, span_s):.1f}" y="{y + 13}" '
            f'width="{max(2.0, _x(b, span_s) - _x(a, span_s)):.1f}" height="14">'
            f"{_title(f'burst: holds the link {a:.1f}-{b:.1f} s')}</rect>"
        )
    for m in lane.marks:
        x = _x(m.at_s, span_s)
        if m.kind == "round":
            out.append(
                f'<line class="round" x1="{x:.1f}" x2="{x:.1f}" y1="{y + 13}" y2="{y + 27}">'
                f"{_title(f'{m.label} at {m.at_s:.1f} s')}</line>"
            )
        elif m.kind == "switchover":
            down_w = 3.0
            out.append(
                f'<rect class="switchover" x="{x - down_w:.1f}" y="{y + 11}" width="{down_w}" '
                f'height="18">{_title(f"{m.label} at {m.at_s:.1f} s")}</rect>'
            )
        else:
            out.append(
                f'<path class="{m.kind}" d="M{x:.1f},{y + 12} l-4,-7 h8 z">'
                f"{_title(f'{m.kind}: {m.label} at {m.at_s:.1f} s')}</path>"
            )
    return out


def _gantt(t: Timeline) -> str:
    height = AXIS_H + LANE_H * max(1, len(t.lanes)) + 6
    parts = [
        f'<svg id="gantt" width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for tick in _ticks(t.span_s):
        x = _x(tick, t.span_s)
        parts.append(
            f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{AXIS_H - 6}" y2="{height}"/>'
        )
        parts.append(_tick_label(x, AXIS_H - 10, tick))
    for i, lane in enumerate(t.lanes):
        parts.extend(_lane(lane, AXIS_H + i * LANE_H, t.span_s))
    parts.append("</svg>")
    return "\n".join(parts)


def _link(t: Timeline) -> str:
    if not t.link:
        return '<p class="meta">No migration progress was kept for this drain.</p>'
    top = max([t.link_bytes_per_s, *(u for _, u in t.link)]) or 1.0
    bottom = LINK_H - 20

    def y(v: float) -> float:
        return 10 + (bottom - 10) * (1 - v / top)

    width = t.span_s / len(t.link)
    points = " ".join(f"{_x(a + width / 2, t.span_s):.1f},{y(u):.1f}" for a, u in t.link)
    first, last = _x(width / 2, t.span_s), _x(t.span_s - width / 2, t.span_s)
    parts = [
        f'<svg id="link" width="{WIDTH}" height="{LINK_H}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for tick in _ticks(t.span_s):
        x = _x(tick, t.span_s)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="10" y2="{bottom}"/>')
        parts.append(_tick_label(x, LINK_H - 6, tick))
    parts.append(f'<text x="4" y="{y(top) + 10:.1f}">{_rate(top)}</text>')
    parts.append(f'<text x="4" y="{bottom:.1f}">0</text>')
    parts.append(
        f'<polygon class="link-area" points="{first:.1f},{bottom} {points} {last:.1f},{bottom}"/>'
    )
    parts.append(f'<polyline class="link" points="{points}"/>')
    if t.link_bytes_per_s:
        yc = y(t.link_bytes_per_s)
        parts.append(
            f'<line class="capacity" x1="{LABEL_W}" x2="{WIDTH - 10}" y1="{yc:.1f}" y2="{yc:.1f}">'
            f"{_title(f'the link: {_rate(t.link_bytes_per_s)}')}</line>"
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _table(t: Timeline) -> str:
    head = (
        "<tr><th class='l'>VM</th><th class='l'>target</th><th class='l'>state</th>"
        "<th>planned s</th><th>actual s</th><th>downtime ms planned</th><th>actual</th>"
        "<th>attempts</th><th class='l'>tuning</th><th class='l'>error</th></tr>"
    )
    rows = []
    for lane in t.lanes:
        planned = f"{lane.planned[1] - lane.planned[0]:.1f}" if lane.planned else ""
        actual = f"{lane.actual[1] - lane.actual[0]:.1f}" if lane.actual else ""
        tuning = ", ".join([lane.tuning, *lane.tuning_applied]) if lane.planned else ""
        rows.append(
            f"<tr class='vm'><td class='l'>{escape(lane.name)}</td>"
            f"<td class='l'>{escape(lane.target)}</td><td class='l'>{lane.state}</td>"
            f"<td>{planned}</td><td>{actual}</td><td>{lane.predicted_downtime_ms:.0f}</td>"
            f"<td>{lane.actual_downtime_ms:.0f}</td><td>{lane.attempts}</td>"
            f"<td class='l'>{escape(tuning)}</td><td class='l'>{escape(lane.error)}</td></tr>"
        )
    return f"<table id='vms'>{head}{''.join(rows)}</table>"


def render(t: Timeline) -> str:
    started = datetime.datetime.fromtimestamp(t.started_at, datetime.UTC)
    summary = " · ".join(f"{k}: {escape(v)}" for k, v in t.summary.items())
    legend = (
        "<div class='legend'><span><i style='background:#c9ced6'></i>planned</span>"
        "<span><i style='background:#2e7d32'></i>migrated</span>"
        "<span><i style='background:#c62828'></i>failed</span>"
        "<span><i style='background:#ff9800'></i>burst (holds the link)</span>"
        "<span><i style='background:#6a1b9a'></i>tuning</span>"
        "<span><i style='background:#000'></i>switch-over</span>"
        "<span>white ticks: rounds</span></div>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>hostmaint drain {escape(t.drain_id)} of {escape(t.host)}</title>
<style>{CSS}</style></head>
<body>
<h1>Drain of {escape(t.host)}: {escape(t.state)}</h1>
<div class="meta">drain {escape(t.drain_id)} · started {started:%Y-%m-%d %H:%M:%S} UTC ·
makespan predicted {_seconds(t.predicted_makespan_s)}, actual {_seconds(t.actual_makespan_s)} ·
{summary}</div>
<h2>Migrations: plan against actual</h2>
{legend}
{_gantt(t)}
<h2>The link</h2>
{_link(t)}
<h2>Summary</h2>
{_table(t)}
</body></html>
"""
