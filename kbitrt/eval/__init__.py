"""Evaluation: perplexity (GPTQ and sliding-window protocols), zero-shot multiple choice (local
JSONL or lm-eval tasks), and the JSON record every result is written to. `kbit eval` and
`kbit bench` are thin CLIs over these modules."""
