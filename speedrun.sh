#!/usr/bin/env bash
# nanochat end to end: data, tokenizer, pretraining, midtraining, SFT, (RL), evaluation, report, chat.
# Each stage is one script; this file is the table of contents. Times and sizes in the comments are the
# reference's d20 run on one 8xH100 node (shared/reference/nanochat.md: 3h51m in all, ~$100 at $24/h).
#
#   bash speedrun.sh                                   # profile from the hardware: 8 GPUs, N GPUs or CPU
#   NANOCHAT_PROFILE=1000 bash speedrun.sh             # the "$1000" tier: depth 32, 800 shards (~33 h train)
#   NANOCHAT_PROFILE=cpu bash speedrun.sh              # tiny: every stage on 2 CPU cores in ~15 minutes
#   NANOCHAT_RL=1 bash speedrun.sh                     # also run RL on GSM8K (off by default, as in the reference)
#   NANOCHAT_DEPTH=12 bash speedrun.sh                 # another depth on the GPU profiles (d12: ~1/6 of d20's cost)
#   NANOCHAT_DATA_DIR=/path/to/data bash speedrun.sh   # offline: a directory laid out like shared/data
#   NANOCHAT_SKIP_SETUP=1 bash speedrun.sh             # .venv already set up (CI, tests/test_speedrun.py)
#
# Profiles (nanochat/pipeline.py decides and prints them): gpu = depth 20 with torchrun on every GPU (fewer than
# 8 accumulate gradients to the same batch: same model, 8/N times longer); 1000 = depth 32, device batch 8;
# cpu = depth 4, vocab 4,096, 256-token context, a few hundred steps per stage, small evaluations.
# Multi-node: run this on every node with a shared NANOCHAT_BASE_DIR and the rendezvous in NANOCHAT_TORCHRUN,
#   NANOCHAT_TORCHRUN="--nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500"
# (node-rank 1 on the other); the training and evaluation stages then span both nodes.
#
# Re-running is safe and cheap: a stage whose outputs are complete is skipped, and an interrupted training
# stage continues from its last checkpoint with --resume. Artifacts go to $NANOCHAT_BASE_DIR (default
# ~/.cache/nanochat); per-stage wall times to $NANOCHAT_BASE_DIR/speedrun_times.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# Setup: Rust, uv, the locked .venv with the Rust BPE trainer compiled (first run: a few minutes, mostly torch).
[ "${NANOCHAT_SKIP_SETUP:-0}" = 1 ] || bash setup.sh
PY=.venv/bin/python

# Profile and data source: fails at once, saying what to do, with neither network nor NANOCHAT_DATA_DIR.
PROFILE_VARS=$($PY -m nanochat.pipeline profile)
eval "$PROFILE_VARS"
export MODEL_TAG
echo "speedrun: profile $PROFILE ($GPUS GPUs, data $DATA_MODE, model $MODEL_TAG)"
run() { $PY -m nanochat.pipeline run "$@"; }  # skips a done stage, adds --resume, prints the wall time

# Report: a fresh run starts a new report card (header: hardware, versions, commit); a resumed one keeps it.
run report_reset -- $PY -m nanochat.report reset

# Data: the first 8 shards now (~800 MB, 2B characters for the tokenizer); the rest (240 shards, ~24 GB for
# d20) download in the background while the tokenizer trains. Offline: shards built from $NANOCHAT_DATA_DIR.
DOWNLOAD_PID=
if [ "$DATA_MODE" = offline ]; then
    run data -- $PY -m nanochat.dataset build --input "$NANOCHAT_DATA_DIR/pretrain"
else
    $PY -m nanochat.dataset download -n $((DATA_SHARDS < 8 ? DATA_SHARDS : 8))
    $PY -m nanochat.dataset download -n "$DATA_SHARDS" >"${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/download.log" 2>&1 &
    DOWNLOAD_PID=$!
fi

# Tokenizer: BPE with a 65,536-token vocabulary on 2B characters (~1 min), then its compression on prose,
# code, math, other languages and held-out text (seconds).
run tok_train -- $PY -m scripts.tok_train $TOK_TRAIN_ARGS
run tok_eval -- $PY -m scripts.tok_eval $TOK_EVAL_ARGS
[ -z "$DOWNLOAD_PID" ] || wait "$DOWNLOAD_PID"

# Base model: d20, 561M parameters, 21,400 steps x 524,288 tokens = 11.2B tokens (~3 h, the bulk of the run);
# then bits per byte on train/val (~1 min) and CORE, 22 in-context tasks (~several minutes; 18 offline).
run base_train -- $LAUNCH scripts.base_train $BASE_TRAIN_ARGS
run base_loss -- $LAUNCH scripts.base_loss --model-tag "$MODEL_TAG" $BASE_LOSS_ARGS
run base_eval -- $LAUNCH scripts.base_eval --model-tag "$MODEL_TAG" $BASE_EVAL_ARGS

# Midtraining: chat format, tools, multiple choice on ~848K conversations (SmolTalk, MMLU aux, GSM8K, identity,
# spelling; offline the subset shared/data holds), then the six chat tasks (the rest of the ~50 min below).
run mid_train -- $LAUNCH scripts.mid_train --model-tag "$MODEL_TAG" $MID_TRAIN_ARGS
run chat_eval_mid -- $LAUNCH scripts.chat_eval -i mid -g "$MODEL_TAG" $CHAT_EVAL_ARGS

# SFT: ~23K conversations, ~700 steps, loss on the assistant's tokens only; then the six chat tasks again.
# Midtraining, SFT and the three chat evaluations together take the ~50 min left of the 3h51m.
run chat_sft -- $LAUNCH scripts.chat_sft --model-tag "$MODEL_TAG" $CHAT_SFT_ARGS
run chat_eval_sft -- $LAUNCH scripts.chat_eval -i sft -g "$MODEL_TAG" $CHAT_EVAL_ARGS

# RL (optional, NANOCHAT_RL=1): one epoch of GSM8K train, 467 steps x 16 questions x 16 samples (~1.5 h, not in
# the 3h51m); GSM8K 0.046 -> 0.076 for the reference d20. Then GSM8K pass@1 of the RL model.
if [ "${NANOCHAT_RL:-0}" = 1 ]; then
    run chat_rl -- $LAUNCH scripts.chat_rl --model-tag "$MODEL_TAG" $CHAT_RL_ARGS
    run chat_eval_rl -- $LAUNCH scripts.chat_eval -i rl -g "$MODEL_TAG" -a GSM8K $CHAT_EVAL_RL_ARGS
fi

# Report card: every stage's summary and the metrics table in $NANOCHAT_BASE_DIR/report/report.md (seconds).
$PY -m nanochat.report generate
$PY -m nanochat.pipeline times

echo "speedrun: done. Chat with the model:"
echo "  $PY -m scripts.chat_cli --model-tag $MODEL_TAG -p \"Why is the sky blue?\"    # one reply"
echo "  $PY -m scripts.chat_cli --model-tag $MODEL_TAG                           # in the terminal"
echo "  $PY -m scripts.chat_web -g $MODEL_TAG                               # http://127.0.0.1:8000"
