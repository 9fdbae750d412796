"""Self-contained HTML pages: report.html (findings first, settings folded, sections of figures and sortable
tables, links to every CSV) and the pages of units; every link points inside the report folder."""

__all__ = ["write_html", "render_html", "page", "Section", "Figure", "Finding", "table_html", "STYLE", "SORT_SCRIPT"]

import dataclasses
import html
import struct
from pathlib import Path

from ..runtime.fileio import read_csv_rows, utc_now, write_text

STYLE = """*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:1em auto;max-width:1300px;padding:0 1em;
color:#222;line-height:1.4;overflow-wrap:anywhere}h1{font-size:1.5em;margin:.2em 0}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.4em;font-size:1.25em}
.findings{background:#eef5ff;border:1px solid #9bbbe0;padding:.4em 1em;margin:.6em 0}.findings h2{border:0;margin:.2em 0}
.findings ul{margin:.2em 0;padding-left:1.2em}.findings li{margin:.25em 0}
.scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;font-size:.85em;margin:.4em 0}
td,th{border:1px solid #ddd;padding:.2em .45em;text-align:right;overflow-wrap:normal}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:600;padding:.2em 0}
table.sortable th{cursor:pointer}table.sortable th[aria-sort]::after{content:" \\2195";color:#888}
img{max-width:100%;height:auto}.note{color:#555;font-size:.9em}
.warning{background:#fff3cd;border:1px solid #e0c060;padding:.2em .5em;margin:.4em 0}.warning summary{cursor:pointer}
.facts td,.facts th{text-align:left;overflow-wrap:anywhere}figure{margin:.6em 0;max-width:100%}
figcaption{color:#555;font-size:.9em;max-width:40em}nav ol{display:flex;flex-wrap:wrap;gap:.1em 1.6em;padding-left:0;list-style-position:inside}
.figures{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}details>summary{cursor:pointer}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(17em,1fr));gap:.6em}
.tile{border:1px solid #ddd;padding:.3em;font-size:.85em}.strip{display:flex;gap:2px;flex-wrap:wrap}
.strip img{width:48px;height:48px}.grid{display:flex;flex-wrap:wrap;gap:4px}.grid figure{margin:0;width:72px;font-size:.75em}
.grid img{width:72px;height:72px;image-rendering:pixelated}.pos img{outline:2px solid #e08020}.neg img{outline:2px solid #2060c0}
@media (max-width:700px){body{padding:0 .5em}h1{font-size:1.25em}table{font-size:.8em}}
@media print{nav,.no-print{display:none}details>summary{list-style:none}.scroll{overflow:visible}
body{max-width:none;font-size:10pt}table{font-size:7pt}figure,tr,.tile{break-inside:avoid}a{color:inherit}}"""

# click a column head to sort by it (numbers numerically, empty cells last); prints open every folded part
SORT_SCRIPT = """document.querySelectorAll('table.sortable').forEach(t=>t.querySelectorAll('thead th').forEach((th,i)=>{
th.setAttribute('aria-sort','none');th.addEventListener('click',()=>{const b=t.tBodies[0],up=th.getAttribute('aria-sort')!=='ascending';
const key=r=>{const s=r.cells[i].innerText.trim(),v=parseFloat(s);return s===''?null:(isNaN(v)?s:v)};
[...b.rows].sort((x,y)=>{const p=key(x),q=key(y);if(p===null)return 1;if(q===null)return -1;
return (typeof p===typeof q?(p<q?-1:p>q?1:0):String(p).localeCompare(String(q)))*(up?1:-1)}).forEach(r=>b.appendChild(r));
t.querySelectorAll('thead th').forEach(h=>h.setAttribute('aria-sort','none'));th.setAttribute('aria-sort',up?'ascending':'descending')})}));
addEventListener('beforeprint',()=>document.querySelectorAll('details').forEach(d=>d.open=true));"""


@dataclasses.dataclass(frozen=True)
class Figure:
    path: str              # PNG relative to the report folder; its SVG twin sits beside it
    caption: str = ""
    css_class: str = ""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One sentence that answers one of the study's questions, linking to the section that shows it."""
    question: str
    sentence: str
    anchor: str = ""


@dataclasses.dataclass
class Section:
    title: str
    text: str = ""
    figures: list = dataclasses.field(default_factory=list)   # Figure, or a bare relative PNG path
    tables: list = dataclasses.field(default_factory=list)    # CSV paths relative to the report folder
    facts: list = dataclasses.field(default_factory=list)     # (label, value) rows shown as a two-column table
    columns: tuple | None = None                              # which CSV columns the tables show (None: all)
    css_id: str = ""
    folded: bool = False                                      # inside a closed <details> (opened for print)
    links: dict = dataclasses.field(default_factory=dict)     # column -> {cell value: href} for the tables
    html: str = ""                                            # ready-made HTML placed after the text


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


def table_html(rows: list[dict], columns, caption: str, links: dict | None = None, max_rows: int | None = None) -> str:
    """A sortable table with a caption; `links`: column -> {cell value: href}, or a function row -> href (None:
    no link) where the same value links to different pages in different rows (cells become links)."""
    links = links or {}
    head = "".join(f"<th scope='col'>{html.escape(c)}</th>" for c in columns)

    def cell(row, c):
        text = _fmt_cell(row.get(c, ""))
        target = links.get(c, {})
        href = target(row) if callable(target) else target.get(str(row.get(c, "")))
        return f"<td><a href='{html.escape(href)}'>{text}</a></td>" if href else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(r, c) for c in columns) + "</tr>" for r in rows[:max_rows])
    return (f"<div class='scroll'><table class='csv sortable'><caption>{html.escape(caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _table(path: Path, rel: str, columns, caption: str, links: dict, max_rows: int = 40) -> str:
    rows = read_csv_rows(path)
    if not rows:
        return f'<p class="note"><a href="{html.escape(rel)}">{html.escape(rel)}</a> (no rows)</p>'
    cols = [c for c in (columns or rows[0]) if c in rows[0]]
    more = f", first {max_rows} of {len(rows)} rows" if len(rows) > max_rows else ""
    return (table_html(rows, cols, f"{caption} ({rel}{more}; click a column to sort)", links, max_rows)
            .replace("<table class='csv sortable'>", f"<table class='csv sortable' data-csv='{html.escape(rel)}'>")
            + f'<p class="note">from <a href="{html.escape(rel)}">{html.escape(rel)}</a>{more}</p>')


def _facts(rows, caption: str = "") -> str:
    body = "".join(f"<tr><th scope='row'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<div class='scroll'><table class='facts'>{cap}{body}</table></div>"


def png_size(path) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, so the page reserves the figure's space and shows it at 100 %."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", head[16:24])


def _figure(out_dir: Path, fig) -> str:
    fig = fig if isinstance(fig, Figure) else Figure(fig)
    target = _inside(out_dir, fig.path)
    rel = Path(fig.path).as_posix()
    svg = Path(rel).with_suffix(".svg").as_posix()
    link = f' (<a href="{html.escape(svg)}">SVG</a>)' if (out_dir / svg).exists() else ""
    cls = f" class='{html.escape(fig.css_class)}'" if fig.css_class else ""
    size = png_size(target) if target.exists() else None
    dims = f" width='{size[0]}' height='{size[1]}'" if size else ""
    return (f"<figure><img{cls} src='{html.escape(rel)}'{dims} alt='{html.escape(fig.caption or Path(rel).stem)}'>"
            f"<figcaption>{html.escape(fig.caption)}{link}</figcaption></figure>")


def _anchor(k: int, section: Section) -> str:
    return section.css_id or f"s{k}"


def _warning(text: str) -> str:
    """One line: the warning's first clause (up to the first ': ' outside parentheses), the rest folded."""
    depth, cut = 0, -1
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and text.startswith(": ", i):
            cut = i
            break
    if cut < 0:
        return f"<p class='warning'>warning: {html.escape(text)}</p>"
    head, rest = text[:cut], text[cut + 2:]
    return (f"<details class='warning'><summary>warning: {html.escape(head)}</summary>"
            f"{html.escape(rest)}</details>")


def page(title: str, body: str, css_href: str = "", script: bool = True) -> str:
    """A whole page: lang, viewport, the style (inline, or linked from `css_href`) and the sort script."""
    style = f"<link rel='stylesheet' href='{html.escape(css_href)}'>" if css_href else f"<style>{STYLE}</style>"
    tail = f"<script>{SORT_SCRIPT}</script>" if script else ""
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><link rel='icon' href='data:,'>{style}</head>"
            f"<body>{body}{tail}</body></html>")


def findings_html(findings: list[Finding]) -> str:
    items = "".join(f"<li><strong>{html.escape(f.question)}</strong> {html.escape(f.sentence)}"
                    + (f" <a href='#{html.escape(f.anchor)}'>(figure)</a>" if f.anchor else "") + "</li>"
                    for f in findings)
    return f"<section id='findings' class='findings'><h2>Findings</h2><ul>{items}</ul></section>"


def render_html(out_dir, title: str, sections: list[Section], header: list | None = None,
                warnings: list[str] = (), findings: list[Finding] = ()) -> str:
    """The page as a string: title, findings, settings (folded), warnings (one line each), contents,
    sections, then links to every CSV under out_dir."""
    out_dir = Path(out_dir).resolve()
    csvs = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*.csv"))
    files = Section("All tables (CSV)", css_id="files")
    toc = "".join(f"<li><a href='#{_anchor(k, s)}'>{html.escape(s.title)}</a></li>"  # folded parts: under their
                  for k, s in enumerate([*sections, files]) if not s.folded)                # section, not listed
    parts = [f"<header id='header'><h1>{html.escape(title)}</h1><p class='note'>misbench report, {utc_now()}</p>"]
    if findings:
        parts.append(findings_html(list(findings)))
    if header:
        parts.append(f"<details id='settings'><summary>Settings behind the scores</summary>"
                     f"{_facts(header, 'Settings of the scores (mis.json)')}</details>")
    parts += [_warning(w) for w in warnings if w]
    parts.append(f"</header><nav id='toc' class='no-print'><h2>Contents</h2><ol>{toc}</ol></nav>")
    for k, s in enumerate(sections):
        inner = []
        if s.text:
            inner.append(f"<p>{html.escape(s.text)}</p>")
        inner.append(s.html)
        if s.facts:
            inner.append(_facts(s.facts))
        for table in s.tables:
            inner.append(_table(_inside(out_dir, table), Path(table).as_posix(), s.columns, s.title, s.links))
        if s.figures:  # side by side where the page is wide enough
            inner.append("<div class='figures'>" + "".join(_figure(out_dir, f) for f in s.figures) + "</div>")
        body = "".join(inner)
        if s.folded:
            body = f"<details><summary>show</summary>{body}</details>"
        parts.append(f"<section id='{_anchor(k, s)}'><h2>{html.escape(s.title)}</h2>{body}</section>")
    links = "".join(f"<li><a href='{html.escape(c)}'>{html.escape(c)}</a></li>" for c in csvs)
    parts.append(f"<section id='files'><h2>{files.title}</h2><ul>{links}</ul></section>")
    return page(title, "\n".join(parts))


def write_html(out_dir, title: str, sections: list[Section], header: list | None = None,
               warnings: list[str] = (), findings: list[Finding] = ()) -> Path:
    path = Path(out_dir).resolve() / "report.html"
    write_text(path, render_html(out_dir, title, sections, header, warnings, findings))
    return path
