#!/usr/bin/env bash
# nanochat end to end. Each stage is one script; this file is the table of contents.
#   bash speedrun.sh
#   NANOCHAT_DATA_DIR=/path/to/data bash speedrun.sh    # offline: a directory laid out like shared/data
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Setup: Rust, uv, the locked .venv with the Rust BPE trainer compiled (first run: a few minutes, mostly torch).
bash setup.sh
PY=.venv/bin/python

# Tokenizer: train on up to 2B characters of pretraining text (~1 min on a GPU node's CPUs; ~1 s for the
# 56M-character Wikipedia sample on 2 cores), then measure its compression on prose, code, math and other languages.
$PY -m scripts.tok_train
$PY -m scripts.tok_eval

# Later stages (pretraining, midtraining, SFT, RL, evaluation, the report) arrive with their issues.
echo "speedrun: tokenizer ready in ${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/tokenizer"
