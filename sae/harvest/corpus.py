"""The built-in offline corpus: Python's own prose, as a ``datasets.Dataset``.

Rows, in a fixed order: every help topic of ``pydoc_data.topics`` (sorted by topic), then the
docstrings of the standard library's modules, classes and functions (files sorted by path, nodes
in ``ast.walk`` order). Docstrings are read with ``ast`` from the source files, so no module is
imported (no side effects). Test packages and site-packages are skipped. About 2 MB of English
technical prose (~0.5M tokens); it differs slightly between Python versions, which the manifest
records through ``fingerprint``.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from pathlib import Path

import xxhash

NAME = "builtin:python-docs"
MIN_DOC_CHARS = 40  # skip one-liners such as "Return self." that teach a model nothing
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_docstrings(root: Path) -> list[tuple[str, str]]:
    rows = []
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # lib2to3 fixtures and the like
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS:
                    rows.append((f"stdlib:{rel}:{getattr(node, 'name', '<module>')}", doc))
    return rows


@functools.lru_cache(maxsize=1)
def _corpus_rows() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from pydoc_data.topics import topics

    rows = [(f"pydoc:{k}", topics[k]) for k in sorted(topics)]
    rows += _stdlib_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    sources, texts = zip(*rows)
    return sources, texts


def python_docs_dataset():
    """The corpus as a ``datasets.Dataset`` with columns ``text`` and ``source``."""
    from datasets import Dataset

    sources, texts = _corpus_rows()
    return Dataset.from_dict({"text": list(texts), "source": list(sources)})


def python_docs_fingerprint() -> str:
    """Content hash of the corpus text (xxh3-64 over the rows in order) and the Python version."""
    h = xxhash.xxh3_64()
    for text in _corpus_rows()[1]:
        h.update(text.encode())
        h.update(b"\0")
    return f"python-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-{h.hexdigest()}"
