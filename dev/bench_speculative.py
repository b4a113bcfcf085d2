"""Speculative decoding: acceptance rate and speedup of a small draft model over greedy decoding alone.

    NANOCHAT_BASE_DIR=/tmp/ncbench python -m dev.bench_speculative --target d4 --draft d2 --num-draft 2 4 6

Both models are base checkpoints sharing one tokenizer. Prompts are the openings of Wikipedia articles from
../shared/data (held out from nothing: these are measurements of speed, not of quality). For each prompt the
target decodes `--max-tokens` greedily through `Engine.generate_batch` and through
`Engine.speculative_generate` with each draft length; the two outputs must be identical (the script stops if
not). Reported: acceptance rate (accepted / proposed draft tokens), tokens per target forward, wall time and
the speedup over plain greedy decoding, medians over repeats, all in one process with the runs interleaved.
"""

import argparse
import gzip
import json
import os
import statistics
import time

import torch

from nanochat.checkpoint import build_model, checkpoint_dir
from nanochat.common import Runtime, describe_environment
from nanochat.engine import Engine
from nanochat.tokenizer import get_tokenizer

WIKI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "pretrain")


def wiki_prompts(count: int, chars: int = 200) -> list[str]:
    with gzip.open(os.path.join(WIKI, "enwiki-sample.jsonl.gz"), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(count * 50), f)]
    return [t[:chars] for t in texts[::50][:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="d4", help="base checkpoint tag of the target model")
    parser.add_argument("--draft", default="d2", help="base checkpoint tag of the draft model")
    parser.add_argument("--num-draft", type=int, nargs="+", default=[2, 4, 6], help="draft tokens per round")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(describe_environment(Runtime(torch.device("cpu"), torch.float32)))
    tokenizer = get_tokenizer()
    target, _ = build_model(checkpoint_dir("base", args.target), device="cpu", phase="eval")
    draft, _ = build_model(checkpoint_dir("base", args.draft), device="cpu", phase="eval")
    print(f"target {args.target}: {target.num_params():,} params; draft {args.draft}: {draft.num_params():,} params")
    engine = Engine(target, tokenizer)
    prompts = [tokenizer.encode(text, prepend="<|bos|>") for text in wiki_prompts(args.prompts)]

    times = {"greedy": []} | {k: [] for k in args.num_draft}
    stats = {k: {"proposed": 0, "accepted": 0, "target_forwards": 0, "tokens": 0} for k in args.num_draft}
    for repeat in range(args.repeats):
        for prompt in prompts:
            start = time.perf_counter()
            reference = engine.generate_batch(prompt, max_tokens=args.max_tokens, temperature=0)[0]
            times["greedy"].append(time.perf_counter() - start)
            for k in args.num_draft:
                start = time.perf_counter()
                completion, run = engine.speculative_generate(prompt, draft, args.max_tokens, num_draft=k)
                times[k].append(time.perf_counter() - start)
                if completion.tokens != reference.tokens:
                    raise SystemExit(f"speculative output differs from greedy (k={k}): a bug, not a measurement")
                if repeat == 0:
                    for key in ("proposed", "accepted", "target_forwards"):
                        stats[k][key] += run[key]
                    stats[k]["tokens"] += len(completion.tokens)

    greedy = statistics.median(times["greedy"])
    rows = []
    print(f"\n{'method':<14} {'accept':>7} {'tok/fwd':>8} {'median s':>9} {'tok/s':>7} {'speedup':>8}")
    tokens = stats[args.num_draft[0]]["tokens"] / len(prompts)  # per prompt: identical for every method
    print(f"{'greedy':<14} {'':>7} {1.0:>8.2f} {greedy:>9.3f} {tokens / greedy:>7.1f} {1.0:>7.2f}x")
    for k in args.num_draft:
        median = statistics.median(times[k])
        s = stats[k]
        row = {
            "num_draft": k,
            "acceptance": s["accepted"] / s["proposed"],
            "tokens_per_target_forward": s["tokens"] / s["target_forwards"],
            "median_s": median,
            "speedup": greedy / median,
        }
        rows.append(row)
        print(
            f"{'draft k=' + str(k):<14} {row['acceptance']:>7.1%} {row['tokens_per_target_forward']:>8.2f} "
            f"{median:>9.3f} {tokens / median:>7.1f} {row['speedup']:>7.2f}x"
        )
    print(json.dumps({"greedy_median_s": greedy, "tokens_per_prompt": tokens, "speculative": rows}))


if __name__ == "__main__":
    main()
