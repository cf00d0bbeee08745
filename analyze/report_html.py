"""The HTML of a self-contained report: escaped text, tables, embedded figures, sections, one page.

Everything is built from small functions of the standard library (:mod:`html` for escaping,
:class:`string.Template` for the page): no template engine, no JavaScript, no network. Every piece
of text that comes from a run (run, layer and option names, values) goes through :func:`esc`.
The page forbids scripts and every remote resource by its content security policy; figures are
PNG data URIs, the style sheet is inline. The same sections give the same bytes.
"""

from __future__ import annotations

import base64
import html
import math
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any

import numpy as np

__all__ = [
    "Anchors",
    "Figure",
    "Grid",
    "Section",
    "esc",
    "fmt_value",
    "ordered",
    "page",
    "paragraph",
    "plot_label",
    "png_size",
    "side_by_side",
    "table",
]

#: Figures wider than this (in pixels) take the full width of the page.
WIDE_FIGURE_PX = 900


def esc(value: Any) -> str:
    """``value`` as text safe in HTML content and in quoted attribute values.

    Examples
    --------
    >>> esc('<b class="x">A & B\\'s</b>')
    '&lt;b class=&quot;x&quot;&gt;A &amp; B&#x27;s&lt;/b&gt;'
    """
    return html.escape(str(value), quote=True)


def plot_label(name: Any) -> str:
    """A name as matplotlib text: a ``$`` would start mathtext, which a run or layer name must not do.

    Examples
    --------
    >>> print(plot_label("cost$ $x$"))
    cost\\$ \\$x\\$
    """
    return str(name).replace("$", r"\$")


def ordered(values: Iterable[Any], known: Sequence[Any]) -> list[str]:
    """The distinct ``values`` (as text) in the order of ``known``, then in first-seen order.

    Examples
    --------
    >>> ordered(["out", "x", "fc", "out"], ["fc", "conv", "out", "fc"])
    ['fc', 'out', 'x']
    """
    present = list(dict.fromkeys(str(v) for v in values))
    known_text = list(dict.fromkeys(str(k) for k in known))
    return [v for v in known_text if v in present] + [v for v in present if v not in known_text]


def fmt_value(value: Any) -> str:
    """A table cell for people: 4 significant digits, integers as integers, NaN as ``–``.

    Examples
    --------
    >>> [fmt_value(v) for v in (0.123456, 4.0, 12, float("nan"), float("-inf"), True, "a")]
    ['0.1235', '4', '12', '–', '-inf', 'yes', 'a']
    """
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "–"
        return format(v, ".4g")
    return "" if value is None else str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def paragraph(text: str, cls: str | None = None) -> str:
    """A ``<p>`` of plain (escaped) text."""
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<p{attr}>{esc(text)}</p>"


def table(caption: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A ``<table>`` with its ``<caption>``; the first cell of a row is its header.

    Numbers are formatted by :func:`fmt_value` and right-aligned; all text is escaped.

    Examples
    --------
    >>> print(table("a & b", ["layer", "lsat"], [["<fc>", 0.25]]))
    <div class="table-wrap"><table>
    <caption>a &amp; b</caption>
    <thead><tr><th scope="col">layer</th><th scope="col">lsat</th></tr></thead>
    <tbody>
    <tr><th scope="row">&lt;fc&gt;</th><td class="num">0.25</td></tr>
    </tbody>
    </table></div>
    """
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            tag = "th" if i == 0 else "td"
            attrs = ' scope="row"' if i == 0 else (' class="num"' if _is_number(value) else "")
            cells.append(f"<{tag}{attrs}>{esc(fmt_value(value))}</{tag}>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(
        [
            '<div class="table-wrap"><table>',
            f"<caption>{esc(caption)}</caption>",
            f"<thead><tr>{head}</tr></thead>",
            "<tbody>",
            *body,
            "</tbody>",
            "</table></div>",
        ]
    )


def side_by_side(parts: Sequence[str]) -> str:
    """Tables (or other blocks) next to each other where the screen is wide enough."""
    return '<div class="row">\n' + "\n".join(parts) + "\n</div>"


def png_size(png: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from a PNG's header.

    Examples
    --------
    >>> png_size(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\0\\0\\0\\rIHDR" + struct.pack(">II", 640, 480))
    (640, 480)
    """
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


@dataclass
class Figure:
    """A figure of the report: drawn on demand (``draw`` returns PNG bytes), embedded as a data URI."""

    draw: Callable[[], bytes]
    alt: str
    caption: str
    png: bytes | None = None

    def html(self) -> str:
        if self.png is None:
            self.png = self.draw()
        width, height = png_size(self.png)
        data = base64.b64encode(self.png).decode("ascii")
        wide = ' class="wide"' if width > WIDE_FIGURE_PX else ""
        return (
            f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{esc(self.alt)}" '
            f'width="{width}" height="{height}">'
            f"<figcaption>{esc(self.caption)}</figcaption></figure>"
        )


@dataclass
class Grid:
    """Figures side by side where the screen is wide enough, one under the other where not."""

    figures: list[Figure]

    def html(self) -> str:
        return '<div class="figs">\n' + "\n".join(f.html() for f in self.figures) + "\n</div>"


@dataclass
class Section:
    """A section of the page: its anchor, its title (plain text), its body and its subsections.

    ``body`` holds HTML fragments and :class:`Grid` s of figures.
    """

    anchor: str
    title: str
    body: list[str | Grid] = field(default_factory=list)
    children: list[Section] = field(default_factory=list)

    def figures(self) -> Iterator[Figure]:
        """Every figure of the section and its subsections, in page order."""
        for item in self.body:
            if isinstance(item, Grid):
                yield from item.figures
        for child in self.children:
            yield from child.figures()

    def html(self, level: int = 2) -> str:
        parts = [
            f'<section id="{esc(self.anchor)}">',
            f"<h{min(level, 6)}>{esc(self.title)}</h{min(level, 6)}>",
        ]
        parts += [item if isinstance(item, str) else item.html() for item in self.body]
        parts += [child.html(level + 1) for child in self.children]
        parts.append("</section>")
        return "\n".join(parts)


def toc(sections: Sequence[Section], depth: int = 2) -> str:
    """Nested ordered lists of links to the sections, ``depth`` levels deep."""
    if not sections or depth < 1:
        return ""
    items = []
    for s in sections:
        inner = toc(s.children, depth - 1)
        items.append(f'<li><a href="#{esc(s.anchor)}">{esc(s.title)}</a>{inner}</li>')
    return "<ol>" + "".join(items) + "</ol>"


class Anchors:
    """Unique, readable ``id`` values: a slug of the given parts, numbered on a collision.

    Examples
    --------
    >>> a = Anchors()
    >>> a.new("heatmap", "My Run", "<fc>"), a.new("heatmap", "my run", "fc"), a.new("", "&")
    ('heatmap-my-run-fc', 'heatmap-my-run-fc-2', 's')
    """

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, *parts: Any) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", "-".join(str(p) for p in parts).lower()).strip("-")[:60].strip("-")
        slug = slug or "s"
        anchor, n = slug, 1
        while anchor in self.used:
            n += 1
            anchor = f"{slug}-{n}"
        self.used.add(anchor)
        return anchor


_STYLE = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--alt:#f6f8fa;--accent:#0a58a8}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:#fff}
.layout{display:grid;grid-template-columns:15rem minmax(0,1fr);max-width:1680px;margin:0 auto}
nav.toc{position:sticky;top:0;align-self:start;max-height:100vh;overflow:auto;padding:1.2rem 1rem;
border-right:1px solid var(--line);font-size:.88rem}
nav.toc h2{font-size:1rem;margin:0 0 .5rem;border:0;padding:0}
nav.toc ol{list-style:none;margin:.15rem 0;padding-left:.9rem}
nav.toc>ol{padding-left:0}
nav.toc li{margin:.15rem 0}
main{padding:1.2rem 2rem 4rem;min-width:0}
@media (max-width:1000px){.layout{display:block}
nav.toc{position:static;max-height:none;border-right:0;border-bottom:1px solid var(--line)}
main{padding:1rem}}
header p{margin:.2rem 0;color:var(--muted)}
h1{font-size:1.6rem;margin:.2rem 0 .4rem}
h2{font-size:1.35rem;margin:2.4rem 0 .6rem;padding-bottom:.25rem;border-bottom:1px solid var(--line)}
h3{font-size:1.12rem;margin:1.8rem 0 .5rem}
h4,h5,h6{font-size:1rem;margin:1.4rem 0 .4rem}
a{color:var(--accent);text-decoration:none}
a:hover{text-decoration:underline}
.table-wrap{overflow-x:auto;margin:.8rem 0 1.2rem;max-width:100%}
.row{display:flex;flex-wrap:wrap;gap:0 2.5rem;align-items:flex-start}
table{border-collapse:collapse;font-size:.86rem}
caption{caption-side:top;text-align:left;font-weight:600;padding:.2rem 0 .35rem;white-space:nowrap}
th,td{border:1px solid var(--line);padding:.22rem .55rem;text-align:left;vertical-align:top}
thead th{background:var(--alt)}
tbody th{font-weight:600}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,28rem),1fr));gap:1.1rem;
align-items:start;margin:.8rem 0 1.2rem}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:.5rem;background:#fff}
figure.wide{grid-column:1/-1}
figure img{display:block;max-width:100%;height:auto;margin:0 auto}
figcaption{font-size:.85rem;color:var(--muted);margin-top:.3rem}
.note{color:var(--muted)}
.warn{border-left:4px solid #bf8700;background:#fff8c5;padding:.5rem .8rem}
@media print{nav.toc{display:none}.layout{display:block}figure{break-inside:avoid}}
"""

_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="generator" content="$generator">
<title>$title</title>
<style>$style</style>
</head>
<body>
<div class="layout">
<nav class="toc" aria-label="Contents">
<h2>Contents</h2>
$toc
</nav>
<main>
<header>
<h1>$title</h1>
$header
</header>
$body
</main>
</div>
</body>
</html>
"""
)


def page(title: str, header: Sequence[str], sections: Sequence[Section], generator: str) -> str:
    """The whole page: ``title``, header lines (HTML), a table of contents and the sections."""
    return _PAGE.substitute(
        title=esc(title),
        generator=esc(generator),
        style=_STYLE.strip(),
        toc=toc(sections),
        header="\n".join(header),
        body="\n".join(s.html() for s in sections),
    )
