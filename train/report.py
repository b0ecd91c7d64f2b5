"""The run report: one folder with ``index.html`` (opens offline) and ``report.md`` holding the same content.

A report is a list of sections; each section holds paragraphs, tables and images (PNG files in the folder).
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    header: list[str]
    rows: list[list]
    caption: str = ""


@dataclass
class Image:
    path: str  # relative to the report folder
    caption: str = ""


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str paragraphs, Table, Image

    def add(self, *blocks) -> "Section":
        self.blocks.extend(blocks)
        return self


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                if b.caption:
                    out += [f"*{b.caption}*", ""]
                out += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
                out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b.rows] + [""]
            elif isinstance(b, Image):
                out += [f"![{b.caption}]({b.path})", "", f"*{b.caption}*" if b.caption else "", ""]
            else:
                out += [str(b), ""]
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}"
        "nav a{margin-right:1em}")


def _html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    nav = " ".join(f'<a href="#s{i}">{esc(s.title)}</a>' for i, s in enumerate(sections))
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style>"
           f"</head><body><h1>{esc(title)}</h1><nav>{nav}</nav>"]
    for i, s in enumerate(sections):
        out.append(f'<h2 id="s{i}">{esc(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                cap = f"<caption>{esc(b.caption)}</caption>" if b.caption else ""
                head = "".join(f"<th>{esc(str(h))}</th>" for h in b.header)
                body = "".join("<tr>" + "".join(f"<td>{esc(_cell(c))}</td>" for c in row) + "</tr>" for row in b.rows)
                out.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
            elif isinstance(b, Image):
                out.append(f'<figure><img src="{esc(b.path)}" alt="{esc(b.caption)}">'
                           f"<figcaption>{esc(b.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{esc(str(b))}</p>")
    # Record on <body> how many images loaded, so a headless browser can check the page (tests do).
    out.append("<script>window.addEventListener('load',()=>{const i=[...document.images];"
               "document.body.dataset.imagesTotal=i.length;"
               "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(folder: str | Path, title: str, sections: list[Section]) -> Path:
    """Write ``index.html`` and ``report.md`` into ``folder``; every image must already exist there."""
    folder = Path(folder)
    missing = [b.path for s in sections for b in s.blocks if isinstance(b, Image) and not (folder / b.path).exists()]
    if missing:
        raise FileNotFoundError(f"report images missing in {folder}: {', '.join(missing)}")
    (folder / "report.md").write_text(_markdown(title, sections))
    (folder / "index.html").write_text(_html(title, sections))
    return folder / "index.html"
