"""kbit push / convert --push-to-hub and the model card, against a fake HfApi (never the network)."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub import errors as hf_errors

from kbitrt.cli.main import cli
from kbitrt.convert.card import load_eval_results, refresh_model_card
from kbitrt.convert.converter import convert
from kbitrt.format.config import KbitFormatError, QuantConfig
from kbitrt.publish.hub import PushError, push_folder

SECRET = "hf_SECRETtoken1234567890"
EVAL = {"kind": "eval", "timestamp": "2025-06-01T12:00:00+00:00", "interrupted": False,
        "perplexity": {"wikitext2": {"dataset": "wikitext2", "perplexity": 23.4567, "protocol": "gptq",
                                     "seqlen": 2048, "stride": None, "tokens": 300000,
                                     "scored_tokens": 296960}},
        "tasks": {"piqa": {"acc": 0.6123, "acc_stderr": 0.0114, "acc_norm": 0.6, "acc_norm_stderr": 0.0113,
                           "n": 1838},
                  "lambada_openai": {"acc": 0.3}}}


class FakeApi:
    """Records what would be created and uploaded; `fail` is raised by create_repo."""

    instances: list[FakeApi] = []

    def __init__(self, token=None, fail: BaseException | None = None):
        self.token, self.fail, self.calls, self.uploaded = token, fail, [], []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw["repo_id"], kw))
        root = Path(kw["folder_path"])
        self.uploaded = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                               and not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat)
                                           for pat in kw.get("ignore_patterns") or []))
        pr = "https://huggingface.co/x/y/discussions/1" if kw.get("create_pr") else None
        return SimpleNamespace(oid="0123abcd" * 5, commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/0123",
                               pr_url=pr)


@pytest.fixture
def kbit_folder(tiny_models, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    out = tmp_path / "tiny-4bit"
    convert(src, out, QuantConfig(bits=4, block_size=32))
    (out / "eval-20250601-120000.json").write_text(json.dumps(EVAL))
    (out / "eval-broken.json").write_text("{half written")
    (out / "eval-other.json").write_text(json.dumps([1, 2, 3]))
    (out / ".DS_Store").write_text("x")
    return out


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi replaced by FakeApi, and no token anywhere (env or a cached login)."""
    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return FakeApi.instances


def test_push_validates_refreshes_card_and_uploads(kbit_folder):
    api = FakeApi()
    res = push_folder(kbit_folder, "you/tiny-4bit", private=True, revision="dev", token=SECRET,
                      base_model="org/tiny-llama", api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["exist_ok"] is True and api.calls[0][2]["private"] is True
    up = api.calls[2][2]
    assert up["revision"] == "dev" and up["create_pr"] is False and up["folder_path"] == str(kbit_folder)
    assert "model.safetensors" in api.uploaded and "README.md" in api.uploaded
    assert ".DS_Store" not in api.uploaded
    assert res.commit_oid and res.repo_url == "https://huggingface.co/you/tiny-4bit" and res.card_refreshed

    card = ModelCard.load(kbit_folder / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "org/tiny-llama" and d["base_model_relation"] == "quantized"
    assert d["library_name"] == "kbitrt" and d["pipeline_tag"] == "text-generation"
    assert {"kbit", "4-bit", "nf", "block-32"} <= set(d["tags"])
    assert d["license"] == "apache-2.0"  # from the source's card, at convert time
    assert "| wikitext2 | 23.457 | gptq | 2048 | 296960 |" in card.text
    assert "| piqa | 61.23 ± 1.14 | 60.00 ± 1.13 | 1838 |" in card.text
    assert "| lambada_openai | 30.00 | - |" in card.text
    assert "Exact bits per quantized parameter: 4." in card.text
    assert 'from_pretrained("you/tiny-4bit")' in card.text


def test_card_refresh_keeps_settings_and_leaves_foreign_readme(kbit_folder):
    readme = kbit_folder / "README.md"
    before = ModelCard.load(readme).data.to_dict()
    _, written = refresh_model_card(kbit_folder)
    assert written and ModelCard.load(readme).data.to_dict()["license"] == before["license"]
    readme.write_text("# my own card\n")
    assert refresh_model_card(kbit_folder) == (readme, False)
    assert readme.read_text() == "# my own card\n"
    rows = load_eval_results(kbit_folder)  # broken and foreign JSON files skipped
    assert {r["name"] for r in rows} == {"wikitext2", "piqa", "lambada_openai"}


def test_broken_or_plain_folder_is_never_uploaded(kbit_folder, tiny_models, tmp_path):
    api = FakeApi()
    shard = kbit_folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(KbitFormatError):
        push_folder(kbit_folder, "you/x", token=SECRET, api=api)
    with pytest.raises(KbitFormatError, match="not a kbit model"):
        push_folder(tiny_models["gpt2"], "you/x", token=SECRET, api=api)
    with pytest.raises(PushError, match="not a Hub repo id"):
        push_folder(kbit_folder, "no-slash", token=SECRET, api=api)
    assert api.calls == []


def test_cli_push_json_token_never_shown(kbit_folder, fake_hub):
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/tiny-4bit", "--token", SECRET,
                                 "--create-pr", "--json"])
    assert r.exit_code == 0, r.output
    assert SECRET not in r.output and SECRET not in (r.stderr or "")
    out = json.loads(r.stdout)
    assert out["commit_oid"] and out["pr_url"] and out["repo_url"].endswith("you/tiny-4bit")
    (api,) = fake_hub
    assert api.token == SECRET and api.calls[-1][2]["create_pr"] is True
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/tiny-4bit"], env={"HF_TOKEN": SECRET})
    assert r.exit_code == 0, r.output
    assert "https://huggingface.co/you/tiny-4bit" in r.stdout and "commit 0123abcd" in r.stdout
    assert SECRET not in r.output


def _http(status: int, cls=hf_errors.HfHubHTTPError):
    import httpx2

    resp = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
    return cls(f"{status} Client Error", response=resp)


@pytest.mark.parametrize("error, says", [
    (_http(403), "no permission to write to you/tiny-4bit (403)"),
    (_http(401), "token was refused (401)"),
    (_http(404, hf_errors.RepositoryNotFoundError), "not found or not yours"),
    (hf_errors.OfflineModeIsEnabled("offline"), "offline mode is on"),
    (ConnectionError("Name or service not known"), "cannot reach the Hugging Face Hub"),
])
def test_cli_push_errors_are_one_line(kbit_folder, fake_hub, monkeypatch, error, says):
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: FakeApi(token, fail=error))
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/tiny-4bit", "--token", SECRET])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and says in lines[-1], r.stderr
    assert SECRET not in r.output and "Traceback" not in r.output


def test_cli_push_without_token(kbit_folder, fake_hub):
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/tiny-4bit"])
    assert r.exit_code == 2 and "no Hugging Face token" in r.stderr and fake_hub == []


def test_convert_push_to_hub(tiny_models, tmp_path, fake_hub, monkeypatch):
    out = tmp_path / "q"
    args = ["convert", str(tiny_models["opt"]), "-o", str(out), "--bits", "4", "--push-to-hub", "you/opt-4bit"]
    r = CliRunner().invoke(cli, args)  # no token: refused before converting anything
    assert r.exit_code == 2 and "no Hugging Face token" in r.stderr and not out.exists()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["push"]["repo_url"].endswith("you/opt-4bit")
    assert "model.safetensors" in fake_hub[-1].uploaded and SECRET not in r.output

    from kbitrt.convert import converter

    def broken(*a, **k):
        raise KbitFormatError("weight model.decoder.layers.0.fc1.weight holds NaN")

    monkeypatch.setattr(converter.Converter, "write", broken)
    n = len(fake_hub)
    r = CliRunner().invoke(cli, ["convert", str(tiny_models["opt"]), "-o", str(tmp_path / "bad"),
                                 "--push-to-hub", "you/opt-4bit"])
    assert r.exit_code == 2 and "NaN" in r.stderr
    assert len(fake_hub) == n  # nothing was pushed


def test_push_checks_token_before_touching_the_card(kbit_folder, fake_hub):
    readme = kbit_folder / "README.md"
    before = readme.read_bytes()
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/tiny-4bit"])  # no token anywhere
    assert r.exit_code == 2 and "no Hugging Face token" in r.stderr
    assert readme.read_bytes() == before

    class Refusing(FakeApi):
        def whoami(self, token=None):
            raise _http(401)

    api = Refusing()
    with pytest.raises(PushError, match="token was refused"):
        push_folder(kbit_folder, "you/tiny-4bit", token=SECRET, api=api)
    assert readme.read_bytes() == before and api.calls == []


def test_token_given_as_repo_id_is_never_echoed(kbit_folder, fake_hub):
    for repo in (SECRET, f"you/{SECRET}"):
        r = CliRunner().invoke(cli, ["push", str(kbit_folder), repo])
        assert r.exit_code == 2 and "looks like a Hugging Face token" in r.stderr
        assert SECRET not in r.output and "Traceback" not in r.output
    assert fake_hub == []


def test_only_model_files_are_uploaded(kbit_folder):
    partial = kbit_folder / ".x.kbit-partial-1"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (kbit_folder / "sub").mkdir()
    (kbit_folder / "sub" / "eval-x.json").write_text("{}")
    api = FakeApi()
    res = push_folder(kbit_folder, "you/tiny-4bit", token=SECRET, api=api)
    assert not any("eval-" in f or "kbit-partial" in f or f.startswith(".") for f in api.uploaded)
    assert "model.safetensors" in api.uploaded and "config.json" in api.uploaded
    assert res.files == len(api.uploaded)


def test_short_tokens_and_the_given_token_are_never_echoed(kbit_folder, fake_hub, monkeypatch):
    """Issue 28: any `hf_` token, whatever its length, and the --token/HF_TOKEN value."""
    from kbitrt.publish.hub import redact

    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "hf_secret123"])
    assert r.exit_code == 2 and "hf_secret123" not in r.output and "Traceback" not in r.output
    monkeypatch.setenv("HF_TOKEN", "abc-not-hf-shaped-9")
    r = CliRunner().invoke(cli, ["push", str(kbit_folder), "you/abc-not-hf-shaped-9"])
    assert r.exit_code == 2 and "abc-not-hf-shaped-9" not in r.output
    assert redact("token hf_x9 and zz-given-zz", "zz-given-zz") == "token *** and ***"
    assert fake_hub == []
