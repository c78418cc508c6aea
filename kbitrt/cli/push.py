"""`kbit push FOLDER REPO_ID`: validate a kbit folder, refresh its model card, upload it."""

from __future__ import annotations

import json

import click
from rich.console import Console

err = Console(stderr=True)


@click.command("push")
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="create the repository as private")
@click.option("--revision", default=None, help="branch to push to (created if missing; default main)")
@click.option("--create-pr", is_flag=True, help="open a pull request instead of committing directly")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
@click.option("--message", "commit_message", default=None, help="commit message")
@click.option("--base-model", default=None, help="Hub id of the source model, for the model card")
@click.option("--no-card", is_flag=True, help="leave README.md as it is")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON on stdout")
def push_cmd(folder, repo_id, private, revision, create_pr, token, commit_message, base_model,
             no_card, as_json):
    """Upload the kbit model in FOLDER to the Hugging Face Hub as REPO_ID (user/name)."""
    from kbitrt.publish.hub import push_folder

    res = push_folder(folder, repo_id, private=private or None, revision=revision,
                      create_pr=create_pr, token=token, commit_message=commit_message,
                      refresh_card=not no_card, base_model=base_model,
                      log=lambda s: err.print(f"[dim]{s}[/dim]"))
    if as_json:
        click.echo(json.dumps(res.to_json(), indent=2))
        return
    click.echo(f"pushed {res.files} files ({res.bytes / 1e9:.3f} GB) to {res.repo_url}")
    if res.pr_url:
        click.echo(f"pull request: {res.pr_url}")
    click.echo(f"commit {res.commit_oid or '?'}: {res.commit_url or '-'}")
