"""Zero-shot multiple choice: local JSONL files scored natively, lm-eval tasks through lm-eval.

A local row is {"query": str, "choices": [str, ...], "gold": int}. Each choice is scored as the
log-likelihood of " " + choice after the query (an empty query conditions on the BOS/EOS token),
exactly lm-eval's `multiple_choice` with its default target delimiter; acc takes the argmax,
acc_norm the argmax of log-likelihood / len(choice) in characters, as lm-eval does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from kbitrt.eval.data import resolve as resolve_data
from kbitrt.eval.data import sample_path
from kbitrt.eval.results import mean_stderr
from kbitrt.eval.scoring import score
from kbitrt.errors import KbitFormatError
from kbitrt.runtime.loader import LoadedModel

PAPER_TASKS = ("lambada_openai", "piqa", "winogrande", "hellaswag")  # 0-shot, as the paper


def is_local(task: str) -> bool:
    """A local .jsonl file, or a shipped sample by short name (e.g. social_iqa-sample)."""
    return (sample_path(task) is not None or task.endswith((".jsonl", ".json"))
            or Path(task).expanduser().is_file())


def task_name(task: str) -> str:
    return resolve_data(task).stem if is_local(task) else task


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a multiple-choice file, each checked; a bad row is one error naming file:line."""
    path = resolve_data(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KbitFormatError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise KbitFormatError(f"{where}: a row must be an object with query, choices, gold")
        choices, gold = row.get("choices"), row.get("gold")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise KbitFormatError(f"{where}: 'choices' must be a non-empty list of strings")
        if "gold" not in row:
            raise KbitFormatError(f"{where}: the row has no 'gold' (index of the right choice)")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise KbitFormatError(f"{where}: 'gold' must be an index into the {len(choices)} choices")
        if not isinstance(row.get("query", ""), str):
            raise KbitFormatError(f"{where}: 'query' must be a string")
        rows.append({"query": row.get("query", ""), "choices": choices, "gold": gold})
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise KbitFormatError(f"{path} holds no rows")
    return rows


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM encoding: trailing context spaces move to the continuation, the pair is
    encoded whole and split at the context's length; an empty context becomes the EOS token."""
    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    if not context:
        cont = enc(continuation)
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None \
            else tokenizer.bos_token_id
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def mc_correct(rows: list[dict], lls: list[float]) -> tuple[list[int], list[int]]:
    """Per question, 1 where the gold choice is picked by log-likelihood (acc) and by
    log-likelihood per character of the choice (acc_norm); the first maximum wins, as np.argmax."""
    correct, correct_norm, k = [], [], 0
    for row in rows:
        n = len(row["choices"])
        ll = lls[k:k + n]
        k += n
        norm = [x / len(c) if c else x for x, c in zip(ll, row["choices"])]
        correct.append(int(max(range(n), key=lambda i: (ll[i], -i)) == row["gold"]))
        correct_norm.append(int(max(range(n), key=lambda i: (norm[i], -i)) == row["gold"]))
    return correct, correct_norm


def mc_metrics(rows: list[dict], lls: list[float]) -> dict:
    """acc / acc_norm with lm-eval's standard errors from per-choice log-likelihoods."""
    correct, correct_norm = mc_correct(rows, lls)
    acc, acc_norm, n = sum(correct), sum(correct_norm), len(rows)
    return {"acc": acc / n, "acc_stderr": mean_stderr(acc / n, n),
            "acc_norm": acc_norm / n, "acc_norm_stderr": mean_stderr(acc_norm / n, n), "n": n}


def eval_local(lm: LoadedModel, path: str | Path, limit: int | None = None, batch_size: int = 16,
               on_batch: Callable[[int], None] | None = None) -> dict:
    """Score a local JSONL multiple-choice file natively (batched, offline)."""
    rows = read_jsonl(path, limit)
    requests = [encode_pair(lm.tokenizer, r["query"], " " + c) for r in rows for c in r["choices"]]
    t0 = time.perf_counter()
    scores = score(lm, requests, batch_size=batch_size, on_batch=on_batch)
    out = mc_metrics(rows, [lp for lp, _ in scores])
    out.update(source="local", path=str(path), requests=len(requests),
               seconds=time.perf_counter() - t0)
    return out


def n_requests(path: str | Path, limit: int | None = None) -> int:
    return sum(len(r["choices"]) for r in read_jsonl(path, limit))


# --------------------------------------------------------------------------------------- lm-eval

def local_task_config(path: str | Path, name: str | None = None) -> dict:
    """An lm-eval task config for a local JSONL file (the same scoring, through lm-eval)."""
    return {
        "task": name or f"kbit_{resolve_data(path).stem}", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(resolve_data(path).resolve())}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }


def check_lm_eval_tasks(tasks: list[str]) -> None:
    """Fail early, one line, on a name lm-eval does not know (or when lm-eval is not installed)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise KbitFormatError(f"task {tasks[0]!r} is not a local .jsonl file or shipped sample, and "
                              "lm-eval tasks need lm-eval: pip install 'kbitrt[eval]'") from None

    known = set(TaskManager().all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise KbitFormatError(f"unknown task {unknown[0]!r}: neither a local .jsonl file nor an "
                              "lm-eval task (list them with `lm-eval ls tasks`)")


def eval_lm_eval(lm: LoadedModel, tasks: list, limit: int | None = None, batch_size: int = 16,
                 num_fewshot: int | None = 0, progress: bool = True) -> dict:
    """Run lm-eval tasks (names or config dicts) on `lm`; {task: metrics} with plain keys."""
    from lm_eval import simple_evaluate

    from kbitrt.eval.lm_eval_model import KbitLM

    model = KbitLM(lm=lm, batch_size=batch_size, progress=progress)
    t0 = time.perf_counter()
    try:
        res = simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, verbosity="ERROR")
    except (OSError, ConnectionError) as e:
        raise KbitFormatError(f"lm-eval could not load the task data ({type(e).__name__}): it "
                              "needs the network; use a local .jsonl task offline") from None
    seconds = time.perf_counter() - t0
    out = {}
    for task, metrics in res["results"].items():
        plain = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt in ("none", "") and isinstance(value, (int, float)):
                plain[metric] = float(value)
        plain.update(source="lm-eval", seconds=seconds, n=res.get("n-samples", {})
                     .get(task, {}).get("effective"))
        out[task] = plain
    return out
