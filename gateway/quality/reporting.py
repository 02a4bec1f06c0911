"""Building blocks of the self-contained HTML reports (`eval run`, `eval report`, `report ops`).

A report is one `.html` file that opens anywhere, offline, and can be mailed or attached to a
ticket: plots are PNGs embedded as `data:image/png;base64,...` URIs, the style is one inline
`<style>` block, and there are no scripts, fonts, links or other external resources. The text
is the same Markdown the `.md` reports hold, rendered with markdown-it-py (CommonMark plus
tables; raw HTML in the Markdown is escaped, never passed through).

Figures use matplotlib's object API on the Agg canvas (no pyplot, no display, no global state).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MISSING", "change_count", "change_points", "change_value", "figure", "local_time",
           "tz_name", "figure_html", "html_page", "markdown_html", "png_bytes", "png_data_uri"]

MISSING = "undefined"
"""How every quality report and CLI table spells a metric that cannot be computed (a precision
with no predictions, a kappa of one class, a percentile of nothing): one word, everywhere, so a
reader (or a script) never has to know that `n/a`, `-` and `undefined` meant the same thing."""

_CSS = """
body { font-family: -apple-system, "Segoe UI", "Noto Sans", "Noto Sans CJK SC", Helvetica, Arial,
       sans-serif; margin: 2rem auto; max-width: 1180px; padding: 0 1rem; color: #1d1d1f;
       line-height: 1.45; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #4c72b0; padding-bottom: .3rem; }
h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; }
h4 { font-size: 1rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .85rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .5rem; vertical-align: top; }
th { background: #f2f4f8; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 .2rem; border-radius: 3px; font-size: .9em; }
blockquote { border-left: 4px solid #dd8452; margin: 1rem 0; padding: .2rem 1rem;
             background: #fff6ee; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85rem; color: #555; }
nav { background: #f7f7f9; padding: .5rem 1rem; border-radius: 4px; font-size: .9rem; }
nav a { margin-right: 1rem; }
.meta { color: #555; font-size: .85rem; }
"""


def tz_name(tz: tzinfo) -> str:
    """The IANA name of *tz* (`Asia/Shanghai`), or `UTC`."""
    return str(getattr(tz, "key", None) or tz.tzname(None) or "UTC")


def local_time(ts: datetime, tz: tzinfo = UTC, *, seconds: bool = False) -> str:
    """*ts* on the wall clock of *tz*, e.g. `2025-03-01 08:00` (the zone is said once, in the
    heading of what lists the times)."""
    return ts.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def change_count(now: int, before: int | None) -> str:
    """`+4 (+66.7%)`: a count against the previous period's."""
    if before is None:
        return MISSING
    diff = now - before
    rel = f" ({diff / before:+.1%})" if before else ""
    return f"{diff:+d}{rel}"


def change_points(now: float | None, before: float | None) -> str:
    """`+5.0 pp`: a share against the previous period's, in percentage points."""
    if now is None or before is None:
        return MISSING
    return f"{100 * (now - before):+.1f} pp"


def change_value(now: float | None, before: float | None, digits: int = 2) -> str:
    """`-0.10`: a metric in [0, 1] against the previous period's."""
    if now is None or before is None:
        return MISSING
    return f"{now - before:+.{digits}f}"


def figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on the Agg canvas, with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_html(png: bytes, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="{png_data_uri(png)}" alt="{html.escape(alt, quote=True)}">'
            f"{cap}</figure>")


def markdown_html(text: str, *, shift_headings: int = 0) -> str:
    """Render our Markdown (CommonMark + tables) to HTML; `shift_headings=1` turns # into <h2>."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    if shift_headings:
        for tok in tokens:
            if tok.type in ("heading_open", "heading_close"):
                level = min(6, int(tok.tag[1]) + shift_headings)
                tok.tag = f"h{level}"
    out: str = md.renderer.render(tokens, md.options, {})
    return out


def html_page(title: str, body: str, *, nav: Sequence[tuple[str, str]] = ()) -> str:
    """A complete HTML document titled *title* (also its <h1>), with links to the *nav*
    anchors, then *body*: inline style, no scripts, no external resources."""
    links = ""
    if nav:
        links = "<nav>" + "".join(f'<a href="#{html.escape(anchor, quote=True)}">'
                                  f"{html.escape(text)}</a>" for anchor, text in nav) + "</nav>\n"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{links}{body}\n</body>\n</html>\n")
