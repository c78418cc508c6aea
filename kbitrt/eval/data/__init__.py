"""Evaluation samples shipped inside the package (see README.md here for sources and licences).

`kbit eval --ppl wiki-sample --tasks social_iqa-sample` finds them by these short names; a path
still works as before.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

SAMPLES = {
    "wiki-sample": "wiki_en_dev.txt",
    "social_iqa-sample": "mc/social_iqa_dev.jsonl",
    "general_knowledge-sample": "mc/general_knowledge_dev.jsonl",
    "cause_and_effect-sample": "mc/cause_and_effect_dev.jsonl",
}


def sample_path(name: str) -> Path | None:
    """The file of a shipped sample by its short name, else None."""
    rel = SAMPLES.get(str(name))
    return HERE / rel if rel is not None else None


def resolve(name: str | Path) -> Path:
    """A shipped sample's file for its short name; anything else as a (user-expanded) path."""
    return sample_path(str(name)) or Path(name).expanduser()
