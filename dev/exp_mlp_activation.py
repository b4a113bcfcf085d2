"""Experiment: ReLU² vs SwiGLU MLP at equal parameter count, on CPU, on the Wikipedia sample.

Trains the same small GPT (same data order, same optimizer and schedule) once per (activation, seed) and reports
validation bits per byte at a few points and the training throughput. The result goes to dev/LOG.md by hand.

    NANOCHAT_DATA_DIR=/path/to/data .venv/bin/python -m dev.exp_mlp_activation   # depth 4, 250 steps, 2 seeds
    .venv/bin/python -m dev.exp_mlp_activation --steps 20 --seeds 0   # smoke test

Contract: a throwaway tokenizer (vocab 8,192) trained on the training split; documents joined with <|bos|> into
one token stream, cut into rows of --seq-len + 1; validation = the sample's held-out split (every 100th article).
LR schedule: constant, then linear to 0 over the last 20% (the reference's warmdown). Muon momentum 0.85 -> 0.95
over the first 100 steps. Not a substitute for the GPU run at real scale: it answers "is there a gap at small
scale on CPU", nothing more.
"""

import argparse
import math
import os
import time

import torch

from nanochat.dataset import iter_documents
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer
from nanochat.tokenizer import Tokenizer

# The Wikipedia sample of a local data dir ($NANOCHAT_DATA_DIR), unless --data names a file.
DEFAULT_DATA = os.path.join(os.environ.get("NANOCHAT_DATA_DIR", "."), "pretrain", "enwiki-sample.jsonl.gz")


def token_stream(tokenizer: Tokenizer, docs: list[str]) -> torch.Tensor:
    ids = []
    for doc_ids in tokenizer.encode(docs, prepend="<|bos|>", num_threads=2):
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of the stream (the same sequence of windows for a given generator seed)."""
    while True:
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=generator)
        rows = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def val_bpb(model: GPT, val: torch.Tensor, token_bytes: torch.Tensor, seq_len: int, max_rows: int = 64) -> float:
    rows = val[: (val.numel() - 1) // seq_len * seq_len + 1]
    nats, nbytes = 0.0, 0
    for i in range(min(max_rows, (rows.numel() - 1) // seq_len)):
        window = rows[i * seq_len : (i + 1) * seq_len + 1]
        x, y = window[:-1][None], window[1:][None]
        loss = model(x, y, loss_reduction="none")
        weight = token_bytes[y.view(-1)]
        nats += (loss * (weight > 0)).sum().item()
        nbytes += weight.sum().item()
    return nats / (math.log(2) * nbytes)


def run(args, mlp: str, seed: int, train: torch.Tensor, val: torch.Tensor, token_bytes, vocab_size: int) -> dict:
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(depth=args.depth, vocab_size=vocab_size, sequence_len=args.seq_len, mlp=mlp)
    model = GPT.build(config)
    optimizer = build_optimizer(model)
    data = batches(train, args.batch_size, args.seq_len, torch.Generator().manual_seed(1000 + seed))
    warmdown_start = int(0.8 * args.steps)
    curve, start = {}, time.time()
    for step in range(args.steps + 1):
        if step in args.eval_at or step == args.steps:
            model.eval()
            curve[step] = round(val_bpb(model, val, token_bytes, args.seq_len), 4)
            model.train()
        if step == args.steps:
            break
        multiplier = 1.0 if step < warmdown_start else (args.steps - step) / (args.steps - warmdown_start)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if group["kind"] == "muon":
                group["momentum"] = 0.85 + 0.10 * min(1.0, step / 100)
        x, y = next(data)
        model(x, y).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    seconds = time.time() - start
    return {
        "mlp": mlp,
        "seed": seed,
        "params": model.num_params(),
        "val_bpb": curve,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(args.steps * args.batch_size * args.seq_len / seconds),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[50, 100, 150, 200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    train_docs = list(iter_documents([args.data], "train"))
    val_docs = list(iter_documents([args.data], "val"))
    tokenizer = Tokenizer.train_from_iterator(train_docs, 8192)
    train, val = token_stream(tokenizer, train_docs), token_stream(tokenizer, val_docs)
    token_bytes = torch.tensor(tokenizer.token_bytes())
    print(
        f"train {train.numel():,} tokens, val {val.numel():,} tokens; depth {args.depth}, {args.steps} steps "
        f"x {args.batch_size * args.seq_len:,} tokens"
    )
    results = []
    for seed in args.seeds:
        for mlp in ("relu2", "swiglu"):
            r = run(args, mlp, seed, train, val, token_bytes, tokenizer.get_vocab_size())
            results.append(r)
            print(r, flush=True)
    print("\n| mlp | seed | params | " + " | ".join(f"bpb @{s}" for s in results[0]["val_bpb"]) + " | tokens/s |")
    print("|---|---:|---:|" + "---:|" * (len(results[0]["val_bpb"]) + 1))
    for r in results:
        bpbs = " | ".join(f"{v:.4f}" for v in r["val_bpb"].values())
        print(f"| {r['mlp']} | {r['seed']} | {r['params'] / 1e6:.2f}M | {bpbs} | {r['tokens_per_s']:,} |")


if __name__ == "__main__":
    main()
