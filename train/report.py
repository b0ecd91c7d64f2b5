"""The run report: one folder with ``report.md`` and the same content as ``index.html`` (opens offline).

Stages contribute Markdown sections (tables, images as PNG files in the folder); the page is rendered with the
``markdown`` library and records on ``<body>`` how many of its images loaded, so a headless browser can check it.
"""
from __future__ import annotations

import re
from pathlib import Path

import markdown

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}"
        ".toc{background:#fafafa;border:1px solid #eee;padding:.5em 1em;font-size:14px}")
_IMAGE_CHECK = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
                "document.body.dataset.imagesTotal=i.length;"
                "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>")


def images_in(text: str) -> list[str]:
    """Relative image paths referenced by Markdown ``text``."""
    return re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)


def write_report(folder: str | Path, title: str, sections: list[str]) -> Path:
    """Write ``report.md`` and ``index.html`` into ``folder``; every referenced image must exist there."""
    folder = Path(folder)
    text = f"# {title}\n\n[TOC]\n\n" + "\n\n".join(s.strip() + "\n" for s in sections)
    missing = [p for p in images_in(text) if not (folder / p).is_file()]
    if missing:
        raise FileNotFoundError(f"report images missing in {folder}: {', '.join(missing)}")
    (folder / "report.md").write_text(text.replace("[TOC]\n\n", ""))
    body = markdown.markdown(text, extensions=["tables", "toc", "fenced_code"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body>{body}{_IMAGE_CHECK}</body></html>")
    (folder / "index.html").write_text(page)
    return folder / "index.html"
