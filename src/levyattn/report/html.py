"""One self-contained HTML page: headings, text, tables and PNG figures (embedded).

Figures are embedded as base64 so the page can be moved or mailed on its own.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from levyattn.io import atomic_write_text

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.note{color:#555;font-size:.9em}
"""


@dataclass
class Section:
    """A heading with optional paragraphs, one table (header + rows) and figures (PNG paths)."""

    title: str
    text: Sequence[str] = ()
    header: Sequence[str] = ()
    rows: Sequence[Sequence[object]] = ()
    figures: Sequence[str | os.PathLike] = field(default_factory=list)


# A number, possibly signed, with a spread or an interval ("0.9657 ± 0.0058", "+0.01 to +0.20").
_NUMERIC = re.compile(r"^[+\-]?(\d+\.?\d*|\.\d+)(e[+\-]?\d+)?(\s*(±|to)\s*[+\-]?(\d+\.?\d*|\.\d+)(e[+\-]?\d+)?)?$")


def _cell(value: object) -> str:
    """One ``<td>``: numbers right-aligned (floats to 4 significant digits), text left."""
    if isinstance(value, float):
        return f"<td class='num'>{value:.4g}</td>"
    text = str(value)
    numeric = isinstance(value, int) or _NUMERIC.match(text.strip()) is not None
    return f"<td class='num'>{html.escape(text)}</td>" if numeric else f"<td>{html.escape(text)}</td>"


def render(title: str, sections: Sequence[Section], note: str = "") -> str:
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style><h1>{html.escape(title)}</h1>",
    ]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        parts.extend(f"<p>{html.escape(t)}</p>" for t in sec.text)
        if sec.rows:
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in sec.header)
            body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in sec.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        for fig in sec.figures:
            data = base64.b64encode(Path(fig).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(Path(fig).stem)}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts) + "\n"


def write_html_report(path: str | os.PathLike, title: str, sections: Sequence[Section], note: str = "") -> Path:
    """Write the page atomically and return its path."""
    return atomic_write_text(path, render(title, sections, note))
