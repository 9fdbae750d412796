"""One self-contained report.html: every link points inside the report folder."""

__all__ = ["write_html", "Section"]

import dataclasses
import html
import json
from pathlib import Path

from ..fileio import utc_now, write_text
from .tables import read_csv_rows

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#555;font-size:.9em}pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}"""


@dataclasses.dataclass
class Section:
    title: str
    text: str = ""
    images: list = dataclasses.field(default_factory=list)    # paths relative to the report folder
    tables: list = dataclasses.field(default_factory=list)    # CSV paths relative to the report folder
    data: dict | None = None                                  # shown as JSON


def _table(path: Path, max_rows: int = 40) -> str:
    rows = read_csv_rows(path)
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows[:max_rows])
    more = f'<p class="note">{len(rows) - max_rows} more rows in {html.escape(path.name)}</p>' if len(rows) > max_rows else ""
    return f'<p class="note">{html.escape(path.name)}</p><table><tr>{head}</tr>{body}</table>{more}'


def write_html(out_dir, title: str, sections: list[Section]) -> Path:
    out_dir = Path(out_dir).resolve()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
             f"<p class='note'>misbench report, {utc_now()}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for image in s.images:
            target = (out_dir / image).resolve()
            assert out_dir in target.parents, f"image outside the report folder: {image}"
            parts.append(f"<img src='{html.escape(Path(image).as_posix())}' alt='{html.escape(Path(image).stem)}'>")
        for table in s.tables:
            target = (out_dir / table).resolve()
            assert out_dir in target.parents, f"table outside the report folder: {table}"
            parts.append(_table(target))
        if s.data is not None:
            parts.append(f"<pre>{html.escape(json.dumps(s.data, indent=1))}</pre>")
    parts.append("</body></html>")
    path = out_dir / "report.html"
    write_text(path, "\n".join(parts))
    return path
