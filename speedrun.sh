#!/usr/bin/env bash
# nanochat end to end: data, tokenizer, pretraining, midtraining, SFT, (RL), evaluation, report, chat.
# Each stage is one script; this file is the table of contents. Times and sizes in the comments are the
# reference's d20 run on one 8xH100 node (karpathy/nanochat's speedrun: 3h51m in all, ~$100 at $24/h).
#
#   bash speedrun.sh                                   # profile from the hardware: GPUs -> gpu, none -> cpu
#   NANOCHAT_PROFILE=1000 bash speedrun.sh             # the "$1000" tier: depth 32, 800 shards (~15 h train on paper)
#   NANOCHAT_PROFILE=cpu bash speedrun.sh              # tiny: every stage on 2 CPU cores in ~5 minutes
#   NANOCHAT_RL=1 bash speedrun.sh                     # also run RL on GSM8K (off by default, as in the reference)
#   NANOCHAT_DEPTH=12 bash speedrun.sh                 # another depth on the GPU profiles (d12: ~1/6 of d20's cost)
#   NANOCHAT_DATA_DIR=/path/to/data bash speedrun.sh   # offline: a directory laid out like the README says
#   NANOCHAT_SKIP_SETUP=1 bash speedrun.sh             # .venv already set up (CI, tests/test_speedrun.py)
#
# Multi-node: run this on every node with a shared NANOCHAT_BASE_DIR and the rendezvous in NANOCHAT_TORCHRUN,
#   NANOCHAT_TORCHRUN="--nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500"
# (node-rank 1 on the other); the training and evaluation stages then span both nodes.
#
# Re-running is safe and cheap: a stage whose summary is in $NANOCHAT_BASE_DIR/report for this model tag (and,
# for an evaluation, for the checkpoint step its training stage ended at) is skipped in milliseconds, and an
# interrupted training stage continues from its last checkpoint with --resume. Each stage's wall time, when it
# ran, goes to the report card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

# Setup: Rust, uv, the locked .venv with the Rust BPE trainer compiled (first run: a few minutes, mostly torch).
[ "${NANOCHAT_SKIP_SETUP:-0}" = 1 ] || bash setup.sh
PY=.venv/bin/python

# ---------------------------------------------------------------------------- profile
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
PROFILE="${NANOCHAT_PROFILE:-$([ "$GPUS" -gt 0 ] && echo gpu || echo cpu)}"
case "$PROFILE" in
cpu)  # d4, 4,096-token vocab, 256-token context, tens of steps a stage: exercises every stage, answers badly
    DEPTH=4
    LAUNCH=("$PY" -m)
    SHARDS=1
    TOK_TRAIN=(--vocab-size 4096 --max-chars 20000000)
    TOK_EVAL=(--heldout-chars 200000)
    BASE_TRAIN=(--max-seq-len 256 --device-batch-size 16 --total-batch-size 4096 --num-iterations 80
        --eval-every 40 --eval-tokens 16384 --sample-every -1 --save-every 40 --device-type cpu)
    BASE_LOSS=(--device-batch-size 16 --split-tokens 16384 --device-type cpu)
    BASE_EVAL=(--max-per-task 8 --device-type cpu)
    MID_TRAIN=(--num-iterations 30 --device-batch-size 16 --total-batch-size 4096 --eval-every 15
        --eval-tokens 16384 --save-every 15 --device-type cpu)
    CHAT_SFT=(--num-iterations 30 --device-batch-size 8 --examples-per-step 16 --eval-every 15 --eval-steps 4
        --eval-metrics-max-problems 16 --save-every 15 --device-type cpu)
    CHAT_RL=(--examples-per-step 2 --num-samples 2 --max-new-tokens 16 --num-steps 2 --eval-every -1
        --eval-examples 2 --save-every -1 --device-type cpu)
    CHAT_EVAL=(-x 8 -m 32 --device-type cpu)
    ;;
gpu | 1000)  # d20 on 240 shards (d32 on 800 at device batch 8 for "1000"); fewer than 8 GPUs accumulate
    [ "$GPUS" -gt 0 ] || { echo "speedrun: profile $PROFILE needs CUDA GPUs and none is visible; use NANOCHAT_PROFILE=cpu"; exit 1; }
    DEPTH=20 SHARDS=240 DEVICE_BATCH=32 TOK_CHARS=2000000000
    [ "$PROFILE" = 1000 ] && DEPTH=32 SHARDS=800 DEVICE_BATCH=8 TOK_CHARS=4000000000
    DEPTH="${NANOCHAT_DEPTH:-$DEPTH}"
    read -r -a TORCHRUN <<<"${NANOCHAT_TORCHRUN:---standalone --nproc_per_node=$GPUS}"
    LAUNCH=(.venv/bin/torchrun "${TORCHRUN[@]}" -m)
    TOK_TRAIN=(--max-chars "$TOK_CHARS")
    TOK_EVAL=()
    BASE_TRAIN=(--device-batch-size "$DEVICE_BATCH" --save-every 1000)  # a checkpoint every ~10 min of d20
    BASE_LOSS=(--device-batch-size "$DEVICE_BATCH")
    BASE_EVAL=()
    MID_TRAIN=(--device-batch-size "$DEVICE_BATCH" --save-every 200)
    CHAT_SFT=(--save-every 200)
    CHAT_RL=()
    CHAT_EVAL=()
    ;;
*) echo "speedrun: NANOCHAT_PROFILE must be cpu, gpu or 1000, not '$PROFILE'"; exit 1 ;;
esac
# Offline ($NANOCHAT_DATA_DIR): every stage reads the local copies (CORE bundle, chat datasets; the mixtures keep
# the components that exist there), and ARC is scored on its validation split (the local copy has no test split).
[ -z "${NANOCHAT_DATA_DIR:-}" ] || CHAT_EVAL+=(--arc-split validation)
TAG="d$DEPTH"  # the model tag, decided here once: every stage reads and writes <stage>_checkpoints/$TAG
echo "speedrun: profile $PROFILE ($GPUS GPUs), model $TAG, data ${NANOCHAT_DATA_DIR:-online}"

stage() {  # stage NAME COMMAND...: skip it when done, add --resume after an interruption, record its wall time
    local name=$1 status
    shift
    status=$($PY -m nanochat.report status "$name" --tag "$TAG")
    case "$status" in
    done*) echo "speedrun: skip $name (${status#done: })"; return ;;
    resume*) set -- "$@" --resume ;;
    esac
    echo "speedrun: $name: $*"
    local start=$SECONDS
    "$@"
    $PY -m nanochat.report time "$name" $((SECONDS - start))
}

# Data source: fails at once, saying what to do, with neither network nor NANOCHAT_DATA_DIR.
$PY -m nanochat.download --check

# Report: a fresh base dir starts a new report card (hardware, versions, commit); a resumed run keeps its own.
[ -f "$NANOCHAT_BASE_DIR/report/header.json" ] || $PY -m nanochat.report reset

# ---------------------------------------------------------------------------- stages
# Data: the first 8 shards now (~800 MB, 2B characters for the tokenizer); the rest (240 shards, ~24 GB for
# d20) download in the background while the tokenizer trains. Offline: shards built from $NANOCHAT_DATA_DIR.
DOWNLOAD_PID=
if [ -n "${NANOCHAT_DATA_DIR:-}" ]; then
    stage data $PY -m nanochat.dataset build --input "$NANOCHAT_DATA_DIR/pretrain"
else
    $PY -m nanochat.download -n $((SHARDS < 8 ? SHARDS : 8))
    $PY -m nanochat.download -n "$SHARDS" >"$NANOCHAT_BASE_DIR/download.log" 2>&1 &
    DOWNLOAD_PID=$!
fi

# Tokenizer: BPE with a 32,768-token vocabulary on 2B characters (~1 min), then its compression on prose,
# code, math, other languages and held-out text (seconds).
stage tok_train $PY -m scripts.tok_train "${TOK_TRAIN[@]}"
stage tok_eval $PY -m scripts.tok_eval "${TOK_EVAL[@]}"
[ -z "$DOWNLOAD_PID" ] || wait "$DOWNLOAD_PID"

# Base model: d20, 897M parameters, 4,980 steps x 1,048,576 tokens = 5.2B (~1.1 h at 50% MFU on paper, the bulk
# of the run); then bits per byte on train/val (~1 min) and CORE, 22 in-context tasks (several minutes).
stage base_train "${LAUNCH[@]}" scripts.base_train --depth "$DEPTH" --model-tag "$TAG" "${BASE_TRAIN[@]}"
stage base_loss "${LAUNCH[@]}" scripts.base_loss --model-tag "$TAG" "${BASE_LOSS[@]}"
stage base_eval "${LAUNCH[@]}" scripts.base_eval --model-tag "$TAG" "${BASE_EVAL[@]}"

# Midtraining: chat format, tools, multiple choice on ~848K conversations (SmolTalk, MMLU aux, GSM8K, identity,
# spelling; offline the components the data dir holds), then the six chat tasks.
stage mid_train "${LAUNCH[@]}" scripts.mid_train --model-tag "$TAG" "${MID_TRAIN[@]}"
stage chat_eval_mid "${LAUNCH[@]}" scripts.chat_eval -i mid -g "$TAG" "${CHAT_EVAL[@]}"

# SFT: ~23K conversations, ~700 steps, loss on the assistant's tokens only; then the six chat tasks again.
# Midtraining, SFT and the chat evaluations together take the ~50 min left of the 3h51m.
stage chat_sft "${LAUNCH[@]}" scripts.chat_sft --model-tag "$TAG" "${CHAT_SFT[@]}"
stage chat_eval_sft "${LAUNCH[@]}" scripts.chat_eval -i sft -g "$TAG" "${CHAT_EVAL[@]}"

# RL (optional, NANOCHAT_RL=1): one epoch of GSM8K train, 467 steps x 16 questions x 16 samples (~1.5 h, not in
# the 3h51m); GSM8K 0.046 -> 0.076 for the reference d20. Then GSM8K pass@1 of the RL model.
if [ "${NANOCHAT_RL:-0}" = 1 ]; then
    stage chat_rl "${LAUNCH[@]}" scripts.chat_rl --model-tag "$TAG" "${CHAT_RL[@]}"
    stage chat_eval_rl "${LAUNCH[@]}" scripts.chat_eval -i rl -g "$TAG" -a GSM8K "${CHAT_EVAL[@]}"
fi

# Report card: every stage's summary, wall times and the metrics table in $NANOCHAT_BASE_DIR/report/report.md.
$PY -m nanochat.report generate

echo "speedrun: done. Chat with the model:"
echo "  $PY -m scripts.chat_cli --model-tag $TAG -p \"Why is the sky blue?\"    # one reply"
echo "  $PY -m scripts.chat_cli --model-tag $TAG                           # in the terminal"
echo "  $PY -m scripts.chat_web -g $TAG                               # http://127.0.0.1:8000"
