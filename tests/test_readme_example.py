"""The README's Python example runs as written (in a scratch working folder) and learns.

Its block sits between ``<!-- python-example -->`` markers; a change to the API that breaks it, or
an example that stops printing a meaningful FVU, fails here.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- python-example -->\n```python\n(.*?)```\n<!-- /python-example -->", text, re.S)
    assert block, "the README lost its python-example block"
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 (our own README)
    fvu, l0 = map(float, re.search(r"held-out FVU ([\d.]+), L0 ([\d.]+)", out.getvalue()).groups())
    assert fvu < 0.5 and l0 <= 8.0, out.getvalue()
    assert scope["codes"].idx.shape == (4, 8)
    assert (tmp_path / "runs" / "api-example-hf" / "blocks.0" / "cfg.json").is_file()
