"""Bits per byte of a base checkpoint on the training and validation splits, plus sample completions.

    python -m scripts.base_loss                                   # largest depth, last step, sized to the hardware
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss --model-tag d20
    python -m scripts.base_loss --device-batch-size 4 --split-tokens 8192   # tiny

Sizes unless given, printed at the start: on a GPU the checkpoint's own run decides, its device batch and 20 of
its optimizer steps' tokens per split (the reference's 20 x 2**19 for d20); elsewhere (CPU, MPS) 20 batches of at
most 8 rows. A progress line with an ETA every few seconds. Sums are reduced across ranks (nanochat/loss_eval.py).
Writes <base dir>/base_eval/loss_<tag>_<step>.json and report/base_loss.json. Not here: CORE (base_eval.py).
"""

import argparse
import json
import os

import torch

from nanochat.checkpoint import load_model
from nanochat.common import atomic_write, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import Progress, add_data_argument, default_pretrain_paths
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import write_stage_summary
from nanochat.tokenizer import get_tokenizer
from nanochat.train import StageRecord, one_line_errors, sample


@one_line_errors("base_loss")
def main(argv=None):
    usage = "\n\n".join(__doc__.split("\n\n")[:2])  # --help: what it is and how to run it; the contract stays here
    parser = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--device-batch-size", type=int, default=-1, help="sequences per forward pass (-1 = auto)")
    parser.add_argument("--split-tokens", type=int, default=-1, help="tokens evaluated per split (-1 = auto)")
    add_data_argument(parser, "text to evaluate")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None)
    args = parser.parse_args(argv)

    runtime = compute_init(args.device_type)
    model, meta = load_model("base", runtime.device, "eval", args.model_tag, args.step, dtype=runtime.dtype)
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=runtime.device)
    seq_len, record = model.config.sequence_len, StageRecord.from_meta(meta)
    # Sizes: the flags, else the checkpoint's own run on a GPU, else small (see the module docstring)
    gpu = runtime.device.type == "cuda"
    auto_batch = record.device_batch_size if gpu else min(record.device_batch_size, 8)
    batch = args.device_batch_size if args.device_batch_size > 0 else auto_batch
    tokens_per_batch = batch * seq_len * runtime.world_size
    auto_tokens = 20 * (record.total_batch_size if gpu else tokens_per_batch)
    steps = max(1, (args.split_tokens if args.split_tokens > 0 else auto_tokens) // tokens_per_batch)
    given = args.split_tokens > 0 and args.device_batch_size > 0
    chosen = "as given" if given else "the checkpoint's run" if gpu else f"{runtime.device.type.upper()} default"
    processes = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
    print0(f"evaluating {steps} batches x {batch} x {seq_len} tokens{processes} per split ({chosen}; "
           "--device-batch-size, --split-tokens to change)")  # fmt: skip
    results = {"step": meta["step"], "model_config": meta["model_config"]}
    for split in ("train", "val"):
        loader = PretrainLoader(
            tokenizer, args.data or default_pretrain_paths(), split, batch, seq_len,
            runtime.device, runtime.rank, runtime.world_size,
        )  # fmt: skip
        progress = Progress(f"{split} bpb") if runtime.is_master else None
        results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes, progress)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f} ({steps * batch * seq_len:,} tokens/rank)")
    if runtime.is_master:
        results["samples"] = sample(model, tokenizer)
        for text in results["samples"]:
            print0(f"  sample: {text!r}")
        tag = args.model_tag or f"d{meta['model_config']['n_layer']}"
        out = os.path.join(get_base_dir(), "base_eval", f"loss_{tag}_{meta['step']:06d}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_write(out, lambda f: f.write(json.dumps(results, indent=2).encode("utf-8")))
        print0(f"wrote {out}")
        tokens = steps * batch * seq_len * runtime.world_size
        write_stage_summary("base_loss", {"model_tag": tag, **results, "tokens_per_split": tokens})
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
