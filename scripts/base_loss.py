"""Bits per byte of a base checkpoint on the training and validation splits, plus sample completions.

    python -m scripts.base_loss                                   # largest depth, last step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss --model-tag d20
    python -m scripts.base_loss --device-batch-size 4 --split-tokens 8192   # tiny, CPU

Sums are reduced across ranks (nanochat/loss_eval.py). Writes <base dir>/base_eval/loss_<tag>_<step>.json and
report/base_loss.json. Not here: CORE (scripts/base_eval.py).
"""

import argparse
import json
import os

import torch

from nanochat.checkpoint import load_model
from nanochat.common import atomic_write, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.dataloader import PretrainLoader
from nanochat.dataset import add_data_argument, default_pretrain_paths
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import write_stage_summary
from nanochat.tokenizer import get_tokenizer
from nanochat.train import one_line_errors, sample


@one_line_errors("base_loss")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--split-tokens", type=int, default=20 * 2**19, help="tokens evaluated per split")
    add_data_argument(parser, "text to evaluate")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None)
    args = parser.parse_args(argv)

    runtime = compute_init(args.device_type)
    model, meta = load_model("base", runtime.device, "eval", args.model_tag, args.step, dtype=runtime.dtype)
    tokenizer = get_tokenizer()
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=runtime.device)
    seq_len = model.config.sequence_len
    steps = max(1, args.split_tokens // (args.device_batch_size * seq_len * runtime.world_size))
    results = {"step": meta["step"], "model_config": meta["model_config"]}
    for split in ("train", "val"):
        loader = PretrainLoader(
            tokenizer, args.data or default_pretrain_paths(), split, args.device_batch_size, seq_len,
            runtime.device, runtime.rank, runtime.world_size,
        )  # fmt: skip
        results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[f'{split}_bpb']:.4f} ({steps * args.device_batch_size * seq_len:,} tokens/rank)")
    if runtime.is_master:
        results["samples"] = sample(model, tokenizer)
        for text in results["samples"]:
            print0(f"  sample: {text!r}")
        tag = args.model_tag or f"d{meta['model_config']['n_layer']}"
        out = os.path.join(get_base_dir(), "base_eval", f"loss_{tag}_{meta['step']:06d}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        atomic_write(out, lambda f: f.write(json.dumps(results, indent=2).encode("utf-8")))
        print0(f"wrote {out}")
        tokens = steps * args.device_batch_size * seq_len * runtime.world_size
        write_stage_summary("base_loss", {"model_tag": tag, **results, "tokens_per_split": tokens})
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
