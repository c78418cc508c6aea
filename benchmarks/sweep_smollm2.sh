#!/usr/bin/env bash
# The SmolLM2 bit-level scaling sweep behind docs/scaling.md (CPU, 2 cores: ~2-5 min a cell).
# Resumable: rerun to finish missing cells. Results: docs/scaling/smollm2.jsonl + plots + summary.
# Grid in priority order, so a partial run still answers the main questions.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOL=$(.venv/bin/python -m kbitrt.convert.gguf 2>/dev/null)
R=docs/scaling/smollm2.jsonl
EVAL=(--ppl wiki-sample --max-tokens 16384 --seqlen 512
      --tasks social_iqa-sample --limit 150 -o "$R")
K=.venv/bin/kbit
$K sweep --models "$SMOL" --bits 16,4,3 --block 64,1024 --dtype nf,int "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 8,5,6 --block 64 --dtype nf,int "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 3 --block 64 --dtype int,nf --outliers top:2% "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 4 --block 64,1024 --dtype fp "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 4 --block 64 --dtype quantile,dynamic "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 4 --block 256 --dtype nf,int "${EVAL[@]}"
# extended grid: every data type and block at 3 and 4 bits, more proxy settings, 5/6/8 bits wider
$K sweep --models "$SMOL" --bits 4,3 --block 64,256,1024 --dtype nf,int,fp,quantile,dynamic "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 3 --block 64 --dtype fp,quantile,dynamic --outliers top:2% "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 3 --block 64 --dtype int,nf --outliers zscore:4 "${EVAL[@]}"
$K sweep --models "$SMOL" --bits 8,6,5 --block 64,1024 --dtype nf,int,fp "${EVAL[@]}"
$K sweep --summary "$R" > docs/scaling/summary.txt
$K sweep --summary "$R" --json > docs/scaling/summary.json
$K plot "$R" -o docs/scaling/smollm2.png
