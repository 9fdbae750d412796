"""One self-contained report.html: a settings header, a table of contents, sections of figures and tables,
and links to every CSV; every link points inside the report folder."""

__all__ = ["write_html", "render_html", "Section", "Figure"]

import dataclasses
import html
from pathlib import Path

from ..runtime.fileio import utc_now, write_text
from .tables import read_csv_rows

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}
.note{color:#555;font-size:.9em}.warning{background:#fff3cd;border:1px solid #e0c060;padding:.5em}
.facts td{text-align:left}figure{margin:.8em 0;flex:1 1 480px}figcaption{color:#555;font-size:.85em}nav ol{columns:2}
.figures{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}table.csv{display:block;overflow-x:auto;max-width:100%}"""


@dataclasses.dataclass(frozen=True)
class Figure:
    path: str              # PNG relative to the report folder; its SVG twin sits beside it
    caption: str = ""
    css_class: str = ""


@dataclasses.dataclass
class Section:
    title: str
    text: str = ""
    figures: list = dataclasses.field(default_factory=list)   # Figure, or a bare relative PNG path
    tables: list = dataclasses.field(default_factory=list)    # CSV paths relative to the report folder
    facts: list = dataclasses.field(default_factory=list)     # (label, value) rows shown as a two-column table
    columns: tuple | None = None                              # which CSV columns the tables show (None: all)
    css_id: str = ""


def _inside(out_dir: Path, rel) -> Path:
    target = (out_dir / rel).resolve()
    if out_dir not in target.parents:
        raise ValueError(f"report file outside the report folder: {rel}")
    return target


def _fmt_cell(value: str) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return html.escape(value if number.is_integer() and "." not in value else f"{number:.4g}")


def _table(path: Path, rel: str, columns, max_rows: int = 40) -> str:
    rows = read_csv_rows(path)
    if not rows:
        return f'<p class="note"><a href="{html.escape(rel)}">{html.escape(rel)}</a> (no rows)</p>'
    cols = [c for c in (columns or rows[0]) if c in rows[0]]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt_cell(r[c])}</td>" for c in cols) + "</tr>" for r in rows[:max_rows])
    more = f", first {max_rows} of {len(rows)} rows" if len(rows) > max_rows else ""
    return (f'<table class="csv" data-csv="{html.escape(rel)}"><tr>{head}</tr>{body}</table>'
            f'<p class="note">from <a href="{html.escape(rel)}">{html.escape(rel)}</a>{more}</p>')


def _facts(rows) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='facts'>{body}</table>"


def _figure(out_dir: Path, fig) -> str:
    fig = fig if isinstance(fig, Figure) else Figure(fig)
    _inside(out_dir, fig.path)
    rel = Path(fig.path).as_posix()
    svg = Path(rel).with_suffix(".svg").as_posix()
    link = f' (<a href="{html.escape(svg)}">SVG</a>)' if (out_dir / svg).exists() else ""
    cls = f" class='{html.escape(fig.css_class)}'" if fig.css_class else ""
    return (f"<figure><img{cls} src='{html.escape(rel)}' alt='{html.escape(fig.caption or Path(rel).stem)}'>"
            f"<figcaption>{html.escape(fig.caption)}{link}</figcaption></figure>")


def _anchor(k: int, section: Section) -> str:
    return section.css_id or f"s{k}"


def render_html(out_dir, title: str, sections: list[Section], header: list | None = None,
                warnings: list[str] = ()) -> str:
    """The page as a string: header (settings table and warnings), table of contents, sections, then
    links to every CSV under out_dir."""
    out_dir = Path(out_dir).resolve()
    csvs = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.csv"))
    files = Section("All tables (CSV)", css_id="files")
    toc = "".join(f"<li><a href='#{_anchor(k, s)}'>{html.escape(s.title)}</a></li>"
                  for k, s in enumerate([*sections, files]))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<link rel='icon' href='data:,'>"
             f"<style>{STYLE}</style></head><body><header id='header'><h1>{html.escape(title)}</h1>"
             f"<p class='note'>misbench report, {utc_now()}</p>"]
    if header:
        parts.append(_facts(header))
    parts += [f"<p class='warning'>warning: {html.escape(w)}</p>" for w in warnings if w]
    parts.append(f"</header><nav id='toc'><h2>Contents</h2><ol>{toc}</ol></nav>")
    for k, s in enumerate(sections):
        parts.append(f"<section id='{_anchor(k, s)}'><h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.facts:
            parts.append(_facts(s.facts))
        for table in s.tables:
            parts.append(_table(_inside(out_dir, table), Path(table).as_posix(), s.columns))
        if s.figures:  # side by side where the page is wide enough: a sweep's four plots fit in two rows
            parts.append("<div class='figures'>" + "".join(_figure(out_dir, f) for f in s.figures) + "</div>")
        parts.append("</section>")
    links = "".join(f"<li><a href='{html.escape(c)}'>{html.escape(c)}</a></li>" for c in csvs)
    parts.append(f"<section id='files'><h2>{files.title}</h2><ul>{links}</ul></section></body></html>")
    return "\n".join(parts)


def write_html(out_dir, title: str, sections: list[Section], header: list | None = None,
               warnings: list[str] = ()) -> Path:
    path = Path(out_dir).resolve() / "report.html"
    write_text(path, render_html(out_dir, title, sections, header, warnings))
    return path
