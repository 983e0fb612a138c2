"""Bar charts as inline SVG, drawn on the server: no chart library, no script."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from markupsafe import Markup, escape


def _money(amount: Decimal) -> str:
    return f"${amount:.4f}" if amount < 1 else f"${amount:,.2f}"


def column_chart(points: Sequence[tuple[str, Decimal]], title: str) -> Markup:
    """Vertical bars, one per label (days), scaled to the largest value."""
    width, height, top, bottom, left = 640, 220, 24, 40, 8
    if not points:
        return _empty(title)
    peak = max(value for _, value in points) or Decimal(1)
    slot = (width - 2 * left) / len(points)
    bar = max(2.0, min(48.0, slot * 0.7))
    parts = [_open(width, height, title)]
    for i, (label, value) in enumerate(points):
        h = float(value / peak) * (height - top - bottom)
        x = left + i * slot + (slot - bar) / 2
        y = height - bottom - h
        tip = f"{label}: {_money(value)}"
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}">'
            f"<title>{escape(tip)}</title></rect>"
        )
        if len(points) <= 16 or i % max(1, len(points) // 8) == 0:
            cx = x + bar / 2
            parts.append(
                f'<text class="label" x="{cx:.1f}" y="{height - bottom + 14}" '
                f'text-anchor="middle">{escape(label[5:] if len(label) == 10 else label)}</text>'
            )
        parts.append(
            f'<text class="value" x="{x + bar / 2:.1f}" y="{max(y - 4, 12):.1f}" '
            f'text-anchor="middle">{escape(_money(value))}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  (every interpolated text is escaped)


def bar_chart(points: Sequence[tuple[str, Decimal]], title: str) -> Markup:
    """Horizontal bars, one per label (models, agents, runs), largest first as given."""
    width, row, label_w, top = 640, 26, 200, 8
    if not points:
        return _empty(title)
    height = top * 2 + row * len(points)
    peak = max(value for _, value in points) or Decimal(1)
    span = width - label_w - 90
    parts = [_open(width, height, title)]
    for i, (label, value) in enumerate(points):
        y = top + i * row
        w = max(1.0, float(value / peak) * span)
        short = label if len(label) <= 28 else label[:27] + "…"
        parts.append(
            f'<text class="label" x="{label_w - 8}" y="{y + 17}" text-anchor="end">'
            f"{escape(short)}<title>{escape(label)}</title></text>"
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row - 8}">'
            f"<title>{escape(label)}: {escape(_money(value))}</title></rect>"
            f'<text class="value" x="{label_w + w + 6:.1f}" y="{y + 17}">'
            f"{escape(_money(value))}</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  (every interpolated text is escaped)


def _open(width: int, height: int, title: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
    )


def _empty(title: str) -> Markup:
    return Markup('<p class="muted">{}: no charges yet.</p>').format(title)
