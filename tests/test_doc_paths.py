"""Every repository path that the docs, the README, benchmarks/ and the package's docstrings and
comments cite (kbitrt/..., benchmarks/..., tests/..., docs/...) exists: a renamed file must take
its citations along. A templated path (`benchmarks/results/kernels-<device>-<date>.json`,
`kbitrt/format/{dtypes,blockwise}.py`) needs its folder, resp. every expansion, to exist."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"(?<![\w./-])((?:kbitrt|benchmarks|tests|docs)/[\w./<>{},*-]*[\w>}*/])")


def _sources() -> list[Path]:
    return sorted({*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("benchmarks/**/*.py"),
                   *ROOT.glob("benchmarks/*.sh"), *ROOT.glob("benchmarks/*.md"),
                   *ROOT.glob("kbitrt/**/*.py")})


def _expand(path: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py]; a `{name}` without a comma (an f-string field) stays."""
    path = re.sub(r"\{[^{},]*$", "", path)  # an f-string field cut off by the match
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def missing(path: str) -> bool:
    path = path.rstrip(".")
    for p in _expand(path):
        template = re.search(r"[<*{]", p)
        if template:  # a template, f-string field or glob: its folder must exist
            p = p[: template.start()].rpartition("/")[0]
        if not (ROOT / p).exists():
            return True
    return False


def _written_here(source: Path, line: str) -> bool:
    """A benchmarks/ script's own output file (`--out benchmarks/results/...`) need not exist yet."""
    return source.parent.name == "benchmarks" and re.search(r"--out\s+benchmarks/results/", line) is not None


def test_cited_paths_exist():
    bad = []
    for f in _sources():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            bad += [f"{f.relative_to(ROOT)}:{i} cites {m.group(1)}" for m in CITED.finditer(line)
                    if missing(m.group(1)) and not _written_here(f, line)]
    assert not bad, "\n".join(bad)


def test_the_check_can_fail():
    assert missing("benchmarks/kernels.py")
    assert missing("kbitrt/format/{dtypes,nosuch}.py")
    assert missing("benchmarks/nosuch/kernels-<device>.json")
    assert not missing("kbitrt/format/{dtypes,blockwise}.py")
    assert not missing("benchmarks/results/kernels-<device>-<date>.json")
    assert not missing("benchmarks/results/eval-{device}.json")
