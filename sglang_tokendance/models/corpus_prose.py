"""English prose corpus for the trained model: the Python 3.11 docs (Debian) + the GA corpus.

The prose is the HTML documentation Debian ships in ``python3.11-doc``
(``/usr/share/doc/python3.11/html``), turned into plain text with the standard library's
``html.parser``: only the page body (``div role="main"``) is kept; code blocks (``pre``,
``div.highlight*``), doctest blocks, scripts, navigation and permalink marks are dropped. The
project's Generative Agents text (``models/corpus/generative_agents.txt``) is mixed in, cut into
blocks of lines and repeated a few times, so agent-style prompts are in-domain.

Everything is deterministic: files are read in sorted order and every document goes to the train
or validation split by a hash of its name (:func:`split_of`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from sglang_tokendance.models.tokenizer import corpus_text

logger = logging.getLogger(__name__)

DOC_PACKAGE = "python3.11-doc"
DOC_ROOT = Path("/usr/share/doc/python3.11/html")
VAL_PERCENT = 2
GA_BLOCK_LINES = 12
GA_REPEATS = 4
MIN_DOC_CHARS = 200

# Pages that are indexes or boilerplate rather than prose.
_SKIP_NAMES = re.compile(r"^(genindex.*|search|py-modindex|contents|copyright|license)\.html$")
_VOID = {
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
    "source", "track", "wbr",
}  # fmt: skip
_BLOCK = {
    "p", "div", "section", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
    "table", "blockquote", "ul", "ol", "dl", "br", "caption", "figure", "figcaption",
}  # fmt: skip
_SKIP_TAGS = {"pre", "script", "style", "nav", "form", "svg", "button", "input", "textarea"}
_SKIP_CLASSES = ("highlight", "headerlink", "sphinxsidebar", "related", "footer", "doctest")


@dataclass(frozen=True)
class Document:
    """One document of the corpus: ``name`` (a stable id) and its plain ``text``."""

    name: str
    text: str


class _ProseExtractor(HTMLParser):
    """Collect the prose of a Sphinx page's main body as paragraphs of plain text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skip, main)
        self._skip = 0
        self._main = 0
        self._buf: list[str] = []
        self.paragraphs: list[str] = []

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in _BLOCK and self._main and not self._skip:
            self._flush()
        if tag in _VOID:
            return
        classes = a.get("class", "")
        skip = tag in _SKIP_TAGS or any(c in classes for c in _SKIP_CLASSES)
        main = tag == "div" and a.get("role") == "main"
        self._stack.append((tag, skip, main))
        self._skip += skip
        self._main += main

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not any(t == tag for t, _, _ in self._stack):
            return
        while self._stack:  # pop to the matching open tag (tolerates unclosed inner tags)
            t, skip, main = self._stack.pop()
            self._skip -= skip
            self._main -= main
            if t == tag:
                break
        if tag in _BLOCK and self._main and not self._skip:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._main and not self._skip:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_to_text(html: str) -> str:
    """Plain prose of one Sphinx HTML page: paragraphs of the main body, blank-line separated.

    Paragraphs with fewer than 3 words (headings' numbers, lone symbols) are dropped; ``¶``
    permalink marks are removed.
    """
    parser = _ProseExtractor()
    parser.feed(html)
    parser.close()
    paras = [p.replace("\u00b6", "").strip() for p in parser.paragraphs]
    return "\n\n".join(p for p in paras if len(p.split()) >= 3)


def ensure_python_docs(root: Path = DOC_ROOT, install: bool = True) -> Path:
    """Make sure the Python 3.11 HTML docs are on disk, installing ``python3.11-doc`` if needed.

    Args:
        root: where the HTML docs are expected.
        install: run ``apt-get update && apt-get install -y python3.11-doc`` when they are missing.

    Returns:
        ``root``.

    Raises:
        RuntimeError: if the docs are missing and cannot be installed (message says how to).
    """
    if root.is_dir() and any(root.glob("*.html")):
        return root
    how = f"install them with: apt-get update && apt-get install -y {DOC_PACKAGE}"
    if not install:
        raise RuntimeError(f"Python docs not found at {root}; {how}")
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"Python docs not found at {root} and apt-get is unavailable; {how}")
    logger.warning("Python docs missing at %s; installing %s with apt-get", root, DOC_PACKAGE)
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", DOC_PACKAGE]):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {res.returncode}); run as root, or {how}\n"
                f"{res.stderr[-2000:]}"
            )
    if not (root.is_dir() and any(root.glob("*.html"))):
        raise RuntimeError(f"{DOC_PACKAGE} installed but no HTML under {root}; {how}")
    return root


def python_doc_documents(root: Path = DOC_ROOT) -> list[Document]:
    """One document per HTML page of the Python docs (sorted by path; short pages dropped)."""
    docs: list[Document] = []
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("_") or _SKIP_NAMES.match(path.name):
            continue
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= MIN_DOC_CHARS:
            docs.append(Document(f"pydoc:{rel}", text))
    return docs


def ga_documents(repeats: int = GA_REPEATS, block_lines: int = GA_BLOCK_LINES) -> list[Document]:
    """The GA corpus cut into blocks of ``block_lines`` lines, each block ``repeats`` times.

    Every copy of a block has the same name, so all copies land in the same split.
    """
    lines = corpus_text().splitlines()
    blocks = ["\n".join(lines[i : i + block_lines]) for i in range(0, len(lines), block_lines)]
    return [Document(f"ga:{i}", block) for _ in range(repeats) for i, block in enumerate(blocks)]


def split_of(doc: Document, val_percent: int = VAL_PERCENT) -> str:
    """``"val"`` for about ``val_percent``% of documents (by a hash of the name), else train."""
    h = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "big")
    return "val" if h % 100 < val_percent else "train"


def load_corpus(
    root: Path = DOC_ROOT, install: bool = True, val_percent: int = VAL_PERCENT
) -> dict[str, list[Document]]:
    """The prose corpus, split: ``{"train": [...], "val": [...]}`` (deterministic order).

    Args:
        root: the Python HTML docs (installed with apt-get when missing and ``install``).
        install: allow installing ``python3.11-doc``.
        val_percent: share of documents (by hash) in the validation split.
    """
    ensure_python_docs(root, install=install)
    docs = python_doc_documents(root) + ga_documents()
    out: dict[str, list[Document]] = {"train": [], "val": []}
    seen_val: set[str] = set()
    for d in docs:
        split = split_of(d, val_percent)
        if split == "val":  # score each validation document once (GA blocks are repeated)
            if d.name in seen_val:
                continue
            seen_val.add(d.name)
        out[split].append(d)
    logger.info(
        "corpus: %d train docs (%.1f MB), %d val docs (%.2f MB)",
        len(out["train"]),
        sum(len(d.text) for d in out["train"]) / 1e6,
        len(out["val"]),
        sum(len(d.text) for d in out["val"]) / 1e6,
    )
    return out
