"""Horizontal bar charts as SVG, with no plotting library to install."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

ROW, LABEL_WIDTH, BAR_WIDTH, MARGIN = 26, 290, 360, 12


def bar_chart(path: Path, title: str, bars: Sequence[tuple[str, float]], unit: str,
              target: float | None = None, target_label: str = "target",
              cap: float | None = None) -> None:
    """One bar per (label, value); an optional dashed line at `target`; bars
    longer than `cap` are cut there (their number is still printed)."""
    top = cap or max([value for _, value in bars] + [target or 0]) or 1
    height = 2 * MARGIN + 30 + ROW * len(bars) + (18 if target is not None else 0)
    width = LABEL_WIDTH + BAR_WIDTH + 110
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="13">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{MARGIN}" y="{MARGIN + 14}" font-weight="bold">{escape(title)}</text>']
    for row, (label, value) in enumerate(bars):
        y = MARGIN + 30 + row * ROW
        length = BAR_WIDTH * min(value, top) / top
        parts += [f'<text x="{LABEL_WIDTH - 8}" y="{y + 15}" text-anchor="end">'
                  f'{escape(label)}</text>',
                  f'<rect x="{LABEL_WIDTH}" y="{y + 3}" width="{length:.1f}" height="{ROW - 8}" '
                  f'fill="{"#d62728" if "tcpstates" in label or "node_exporter" in label else "#1f77b4"}"/>',
                  f'<text x="{LABEL_WIDTH + length + 6:.1f}" y="{y + 15}">'
                  f'{_number(value)} {escape(unit)}{" (cut)" if value > top else ""}</text>']
    if target is not None:
        x = LABEL_WIDTH + BAR_WIDTH * target / top
        bottom = MARGIN + 30 + ROW * len(bars)
        parts += [f'<line x1="{x:.1f}" y1="{MARGIN + 24}" x2="{x:.1f}" y2="{bottom}" '
                  f'stroke="black" stroke-dasharray="4,3"/>',
                  f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">'
                  f'{escape(target_label)} {_number(target)}</text>']
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"
