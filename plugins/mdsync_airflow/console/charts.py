"""Inline SVG bar charts (the console works offline: no chart library, no CDN)."""

from __future__ import annotations

from html import escape

#: series colours (Marketo purple, Dynamics blue, records green)
COLOURS = {"records": "#2e7d32", "calls_marketo": "#5c4ee5", "calls_dynamics": "#0078d4"}


def bars(points: list[dict], keys: list[str], labels: dict[str, str], title: str, *, width: int = 640,
         height: int = 200) -> str:
    """A bar chart of ``points`` (dicts with ``at`` and the ``keys``), bars of one point side by side.

    Each bar has a ``<title>`` (its time, series and value) so hovering shows the number.
    """
    pad_l, pad_b, pad_t = 52, 24, 44
    inner_w, inner_h = width - pad_l - 8, height - pad_b - pad_t
    top = max([int(p.get(k) or 0) for p in points for k in keys] + [1])
    slot = inner_w / max(len(points), 1)
    bar_w = min(max(slot / (len(keys) + 0.5), 1.0), 28.0)  # a few runs: bars, not slabs
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
             f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{pad_l}" y="17" class="chart-title">{escape(title)}</text>',
             f'<line x1="{pad_l}" y1="{pad_t + inner_h}" x2="{width - 8}" y2="{pad_t + inner_h}" stroke="#999"/>',
             f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end" class="axis">{top:,}</text>',
             f'<text x="{pad_l - 4}" y="{pad_t + inner_h}" text-anchor="end" class="axis">0</text>']
    for i, point in enumerate(points):
        for j, key in enumerate(keys):
            value = int(point.get(key) or 0)
            h = inner_h * value / top
            x = pad_l + i * slot + j * bar_w
            tip = f"{point.get('at', '')[:16].replace('T', ' ')} UTC · {labels[key]}: {value:,}"
            if point.get("run_id"):
                tip += f" · run {point['run_id']}"
            parts.append(f'<rect x="{x:.1f}" y="{pad_t + inner_h - h:.1f}" width="{max(bar_w - 1, 0.6):.1f}" '
                         f'height="{h:.1f}" fill="{COLOURS.get(key, "#777")}"><title>{escape(tip)}</title></rect>')
    if points:
        first, last = points[0].get("at", "")[:16].replace("T", " "), points[-1].get("at", "")[:16].replace("T", " ")
        parts.append(f'<text x="{pad_l}" y="{height - 6}" class="axis">{escape(first)}</text>')
        parts.append(f'<text x="{width - 8}" y="{height - 6}" text-anchor="end" class="axis">{escape(last)} UTC</text>')
    else:
        parts.append(f'<text x="{pad_l + 8}" y="{pad_t + inner_h / 2}" class="axis">no runs in this period</text>')
    x = pad_l  # the legend: a line under the title
    for key in keys:
        parts.append(f'<rect x="{x}" y="25" width="11" height="11" fill="{COLOURS.get(key, "#777")}"/>'
                     f'<text x="{x + 15}" y="35" class="axis">{escape(labels[key])}</text>')
        x += 15 + 7 * len(labels[key]) + 18
    parts.append("</svg>")
    return "".join(parts)
