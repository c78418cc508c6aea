"""No function of the package is longer than MAX_LINES (STYLE.md: functions under ~80 lines).

Read statically (ast): a function's length is `end_lineno - lineno + 1` of its def, decorators
not counted, nested functions counted within their parent and on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kbitrt

ROOT = Path(kbitrt.__file__).parent
MAX_LINES = 80


def long_functions(root: Path, limit: int) -> list[str]:
    """`path:line name (n lines)` of every def under `root` longer than `limit` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                                 f"({n} lines)")
    return found


def test_counter_sees_a_long_function(tmp_path):
    """The walk finds a function one line over the limit and passes one at it (so the check below
    can fail)."""
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES - 1))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def at_limit():\n{body}\n\n"
                                           f"@staticmethod\ndef over():\n{body}    return 0\n")
    assert long_functions(tmp_path / "pkg", MAX_LINES) == [
        f"pkg/m.py:{MAX_LINES + 4} over ({MAX_LINES + 1} lines)"]


def test_no_function_over_the_limit():
    over = long_functions(ROOT, MAX_LINES)
    assert not over, (f"{len(over)} function(s) over {MAX_LINES} lines; split them into named "
                      "steps:\n" + "\n".join(over))
