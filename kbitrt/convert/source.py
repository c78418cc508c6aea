"""Where a model comes from: a local folder or a Hugging Face Hub id, and which files hold what.

The same resolver serves `kbit convert` (a plain HF checkpoint) and `kbit run` (a kbit folder).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kbitrt.errors import KbitFormatError

# Files that travel with a model besides its weights: tokenizer, generation settings, chat
# templates, licenses. Copied verbatim into converted folders.
COMPANION_PATTERNS = (
    "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template*", "preprocessor_config.json",
    "LICENSE*", "license*", "NOTICE*", "*.py",
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # owner/name
HUB_ID = re.compile(rf"{REPO_ID.pattern}|^[A-Za-z0-9][\w.\-]*$")  # owner/name, or a bare name


def resolve_model(name: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as it is, or a Hub repo downloaded (safetensors preferred) to the HF cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise KbitFormatError(f"{path} is a file; give the model's folder")
        if not (path / "config.json").exists():
            raise KbitFormatError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    text = str(name)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not HUB_ID.match(text):
        raise KbitFormatError(f"{text}: no such folder (and not a Hub id like 'org/model')")
    return _download(text, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        has_st = any(f.endswith(".safetensors") for f in files)
        weights = ["*.safetensors", "*.safetensors.index.json"] if has_st else ["*.bin", "*.bin.index.json"]
        patterns = ["config.json", *weights, *COMPANION_PATTERNS, "README.md"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise KbitFormatError(f"{repo_id} is gated: accept its license on the Hub and log in "
                              "(huggingface-cli login or HF_TOKEN)") from None
    except hf_errors.RepositoryNotFoundError:
        raise KbitFormatError(f"{repo_id}: no such repository on the Hub (or it is private: "
                              "log in with HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise KbitFormatError(f"{repo_id}: revision {revision!r} not found") from None
    except (hf_errors.LocalEntryNotFoundError, OSError) as e:
        raise KbitFormatError(f"cannot download {repo_id} from the Hub ({type(e).__name__}): "
                              "check the network, or pass a local folder") from None
    except hf_errors.HfHubHTTPError as e:
        raise KbitFormatError(f"cannot download {repo_id}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 -- httpx/requests transport errors are not OSErrors
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "requests", "urllib3"):
            raise
        raise KbitFormatError(f"cannot download {repo_id} from the Hub ({type(e).__name__}): "
                              "check the network, or pass a local folder") from None


def read_config(folder: Path) -> dict:
    """config.json of a source folder as a dict; a broken one is one clear error."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise KbitFormatError(f"{path} is not valid UTF-8 JSON ({str(e).splitlines()[0][:80]}): "
                              "fix or re-download it") from None
    if not isinstance(raw, dict):
        raise KbitFormatError(f"{path} is not a JSON object: fix or re-download it")
    return raw


@dataclass
class Checkpoint:
    """The weight files of a plain HF checkpoint: safetensors shards or legacy .bin files."""

    folder: Path
    files: list[Path]
    kind: str  # "safetensors" | "bin"


def find_checkpoint(folder: Path) -> Checkpoint:
    """Weight files of `folder`, from its index when there is one (so stray files are ignored)."""
    for kind, index, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index).exists():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                names = set(weight_map.values())
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
                raise KbitFormatError(f"{folder / index} is corrupt (no weight_map): fix or "
                                      "re-download it") from None
            if not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
                       for n in names):
                raise KbitFormatError(f"{folder / index} names shards outside the folder")
            files = [folder / f for f in sorted(names)]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise KbitFormatError(f"{folder}: shards listed in {index} are missing: {missing[:3]}")
            return Checkpoint(folder, files, kind)
        if (folder / single).exists():
            return Checkpoint(folder, [folder / single], kind)
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return Checkpoint(folder, loose, "safetensors")
    raise KbitFormatError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


def companion_files(folder: Path) -> list[Path]:
    """Tokenizer and generation files to copy along, sorted (deterministic output)."""
    found = set()
    for pattern in COMPANION_PATTERNS:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)
