"""Publish a kbit folder to the Hugging Face Hub: validate, refresh the model card, upload.

The folder is opened with the format reader before anything leaves the machine, so a broken or
half-written model is never uploaded. The token is passed to huggingface_hub and never printed,
logged or put into an error message. `api` can be any object with HfApi's create_repo /
create_branch / upload_folder (tests pass a fake; nothing here needs the network otherwise).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from kbitrt.errors import KbitFormatError

# never uploaded: partial conversions, evaluation results (the model card shows them), editor/OS
# litter, caches
IGNORE = [".*", "**/.*", "*.kbit-partial*", "*.kbit-old*", "**/*.kbit-partial*/*", "__pycache__/*",
          "*.tmp", "eval-*.json", "**/eval-*.json"]
TOKEN_LIKE = re.compile(r"(^|/)hf_[A-Za-z0-9]{16,}$|^[A-Za-z0-9_\-]{32,}$")
HF_TOKEN_TEXT = re.compile(r"hf_[A-Za-z0-9]+")  # any Hugging Face token, whatever its length
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _secrets(tokens) -> set[str]:
    return {t for t in (*tokens, *(os.environ.get(k) for k in TOKEN_ENV)) if t and len(t) >= 4}


def redact(text: str, *tokens: str | None) -> str:
    """`text` with every `hf_...` token and the given (and HF_TOKEN's) token values as ***."""
    for secret in sorted(_secrets(tokens), key=len, reverse=True):
        text = text.replace(secret, "***")
    return HF_TOKEN_TEXT.sub("***", text)


class PushError(KbitFormatError):
    """A push that cannot happen (no token, offline, no permission); one clear line."""


@dataclass
class PushResult:
    repo_id: str
    repo_url: str
    revision: str | None
    commit_oid: str | None
    commit_url: str | None
    pr_url: str | None
    private: bool | None
    files: int
    bytes: int
    card_refreshed: bool

    def to_json(self) -> dict:
        return asdict(self)


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN or the cached `hf auth login` token; PushError when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PushError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token")
    return found


def check_repo_id(repo_id: str, token: str | None = None) -> None:
    from kbitrt.convert.source import REPO_ID

    if TOKEN_LIKE.search(repo_id or "") or any(t in (repo_id or "") for t in _secrets([token])):
        raise PushError("REPO_ID looks like a Hugging Face token, not a repo id: give 'user/name' "
                        "(pass a token with --token or HF_TOKEN, and revoke one that was exposed)")
    if not REPO_ID.match(repo_id):
        raise PushError(f"{redact(repo_id, token)!r} is not a Hub repo id: use 'user/name' or "
                        "'org/name'")


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):  # huggingface_hub's HTTP client, whichever is installed
        try:
            errors.append(__import__(name).TransportError)
        except (ImportError, AttributeError):
            continue
    try:
        import requests

        errors.append(requests.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def _explain(e: BaseException, repo_id: str, token: str) -> PushError:
    """One line saying what went wrong and what to do; the token never appears in it."""
    from huggingface_hub import errors as hf

    if isinstance(e, hf.OfflineModeIsEnabled):
        msg = "offline mode is on (HF_HUB_OFFLINE=1): unset it to push"
    elif isinstance(e, hf.RepositoryNotFoundError):
        msg = (f"{repo_id}: repository not found or not yours: check the name, and that the token "
               "may write to that user or organization")
    elif isinstance(e, hf.RevisionNotFoundError):
        msg = f"{repo_id}: revision not found: {str(e).splitlines()[0]}"
    elif isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            msg = "the Hugging Face token was refused (401): log in again (`hf auth login`) or pass a valid --token"
        elif status == 403:
            msg = (f"no permission to write to {repo_id} (403): it belongs to someone else, or the "
                   "token is read-only; use a write token or a repo under your own name")
        elif status == 409:
            msg = f"{repo_id}: conflict (409): {str(e).splitlines()[0]}"
        else:
            msg = f"the Hub refused the upload to {repo_id} ({status}): {str(e).splitlines()[0]}"
    elif isinstance(e, _network_errors()):
        msg = f"cannot reach the Hugging Face Hub ({type(e).__name__}): check the network and retry"
    else:
        msg = f"push to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return PushError(redact(msg, token))


def _files(folder: Path) -> list[Path]:
    import fnmatch

    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in IGNORE):
            out.append(p)
    return out


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, create_pr: bool = False, token: str | None = None,
                commit_message: str | None = None, refresh_card: bool = True,
                base_model: str | None = None, api: Any = None,
                log: Callable[[str], None] = lambda s: None) -> PushResult:
    """Validate `folder` as a kbit model, refresh its card, and upload it to `repo_id`."""
    from kbitrt.convert.card import refresh_model_card
    from kbitrt.format.reader import KbitModel

    folder = Path(folder).expanduser()
    check_repo_id(repo_id, token)
    km = KbitModel.open(folder)  # a broken model stops here, before any file or network call
    log(f"validated {folder}: {km.quant.label}, {len(km.modules)} quantized linears")
    token = resolve_token(token)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    if hasattr(api, "whoami"):  # the token is checked before the card is touched
        try:
            api.whoami(token=token)
        except Exception as e:  # noqa: BLE001 -- every Hub/network failure becomes one clear line
            raise _explain(e, repo_id, token) from None
    card_refreshed = False
    if refresh_card:
        _, card_refreshed = refresh_model_card(folder, repo_id=repo_id, base_model=base_model)
        log("model card refreshed" if card_refreshed else "README.md was not written by kbitrt: left as it is")
    files = _files(folder)
    size = sum(p.stat().st_size for p in files)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        log(f"uploading {len(files)} files ({size / 1e9:.3f} GB) to {repo_id}"
            + (f"@{revision}" if revision else ""))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            create_pr=create_pr, token=token, ignore_patterns=IGNORE,
            commit_message=commit_message or f"Upload {km.quant.label} kbit model")
    except PushError:
        raise
    except Exception as e:  # noqa: BLE001 -- every Hub/network failure becomes one clear line
        raise _explain(e, repo_id, token) from None
    return PushResult(
        repo_id=repo_id, repo_url=str(url) if url else f"https://huggingface.co/{repo_id}",
        revision=revision, commit_oid=getattr(info, "oid", None),
        commit_url=getattr(info, "commit_url", None), pr_url=getattr(info, "pr_url", None),
        private=private, files=len(files), bytes=size, card_refreshed=card_refreshed)
