"""Unlabelled English text for sparse-autoencoder training, built offline from text Python itself ships.

Sources (no download, no imports of the documented modules): the reference-manual topics in ``pydoc_data.topics``
and the docstrings (triple-quoted strings) of the standard library's source files. Prose paragraphs are kept (code,
grammar rules and doctest lines are dropped), re-flowed onto one line and packed into documents of at most
``max_chars`` characters, cut on paragraph and sentence boundaries. A document's group is its source (a manual
topic or a module), so train/val/test never share a source.
"""
from __future__ import annotations

import functools
import inspect
import os
import random
import re
import sysconfig
import textwrap
from pathlib import Path

from headprobe.extract.tasks.base import Example

SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "tkinter", "lib2to3", "ensurepip", "site-packages",
             "pydoc_data", "__pycache__", "venv"}
TRIPLE_QUOTED = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)  # docstrings, mostly
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
CODE_LINE = re.compile(r"^(\s{2,}|>>>|\.\.\.|[*=~\-^]{3,}|.*::=|\$ |def |class |import |from \S+ import)")


def _is_prose(lines: list[str]) -> bool:
    if any(CODE_LINE.match(line) for line in lines):
        return False
    text = " ".join(lines)
    words = text.split()
    letters = sum(c.isalpha() or c == " " for c in text)
    identifiers = sum(any(c == "_" or c.isdigit() for c in w) for w in words)
    return len(words) >= 5 and letters >= 0.8 * len(text) and identifiers <= 0.2 * len(words)


def _paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a docstring or manual page, each re-flowed onto one line."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.rstrip() for line in textwrap.dedent(block).strip("\n").splitlines() if line.strip()]
        if lines and _is_prose(lines):
            out.append(" ".join(line.strip() for line in lines))
    return out


@functools.lru_cache(maxsize=1)
def sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(source name, prose paragraphs) for every manual topic and stdlib module with prose, in a fixed order."""
    from pydoc_data.topics import topics

    out = [(f"topic:{name}", tuple(_paragraphs(topics[name]))) for name in sorted(topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for root, dirs, names in os.walk(lib):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and "-" not in d]
        files += [Path(root, n) for n in names if n.endswith(".py") and "test" not in n and n != "this.py"]
    for path in sorted(files):
        rel = path.relative_to(lib)
        strings = TRIPLE_QUOTED.findall(path.read_text(encoding="utf-8", errors="replace"))
        paras = tuple(p for pair in strings for p in _paragraphs(inspect.cleandoc(''.join(pair))))
        out.append((f"module:{'.'.join(rel.with_suffix('').parts)}", paras))
    return tuple((name, paras) for name, paras in out if paras)


def _pieces(paragraph: str, max_chars: int) -> list[str]:
    """Sentences (or word runs, for over-long sentences) of at most ``max_chars`` characters."""
    out = []
    for sentence in SENTENCE_END.split(paragraph):
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            out.append(sentence[:cut])
            sentence = sentence[cut:].lstrip()
        if sentence:
            out.append(sentence)
    return out


def documents(max_chars: int) -> list[tuple[str, str]]:
    """(source, text) documents of at most ``max_chars`` characters; paragraphs of one source are packed in order,
    a paragraph that does not fit starts a new document, and one longer than a document is cut on sentences."""
    docs = []
    for name, paras in sources():
        cur = ""
        for para in paras:
            for piece in ([para] if len(para) <= max_chars else _pieces(para, max_chars)):
                joined = f"{cur}\n{piece}" if cur else piece
                if len(joined) <= max_chars:
                    cur = joined
                    continue
                docs.append((name, cur))
                cur = piece
        if cur:
            docs.append((name, cur))
    return docs


def make_corpus(seed: int, max_chars: int = 400) -> list[Example]:
    """Every document once, in an order shuffled by ``seed`` (so any prefix is a sample across sources)."""
    docs = documents(max_chars)
    random.Random(seed).shuffle(docs)
    return [Example(text=text, group=name) for name, text in docs]
