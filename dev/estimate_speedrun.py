"""Paper estimate of a base_train run on an 8xH100 node (issue 14): the model base_train would build from the same
flags, its training FLOPs per token from the code (GPT.estimate_flops), the tokens its horizon derives, and the
hours that takes at a given MFU of 8 x 989 TFLOP/s (H100 SXM dense bf16). Nothing is trained; a GPU run confirms
or refutes it.

    python -m dev.estimate_speedrun --depth 24 --target-param-data-ratio 8 --device-batch-size 16
    python -m dev.estimate_speedrun --depth 24 --target-param-data-ratio 8 --device-batch-size 16 --classic
"""

import argparse

import torch

from dev.ablate import command_line
from nanochat.gpt import GPT
from scripts.base_train import derive_hyperparameters, model_config, parse_args

H100_BF16_FLOPS = 989e12


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--mfu", type=float, nargs="+", default=[0.5, 0.4])
    parser.add_argument("--classic", action="store_true", help="the late-2025 model (every 2026 part off)")
    ours, train_flags = parser.parse_known_args(argv)
    args = parse_args(train_flags + (command_line(set()) if ours.classic else []))
    config = model_config(args, ours.vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    flops_per_token = model.estimate_flops()
    hp = derive_hyperparameters(args, config, flops_per_token, ours.gpus)
    flops = hp["training_tokens"] * flops_per_token
    print(f"d{args.depth} {'classic' if ours.classic else 'new'}: {model.num_params() / 1e9:.3f}B parameters, "
          f"{flops_per_token:.4g} FLOPs/token, {hp['num_iterations']:,} steps x {hp['total_batch_size']:,} tokens "
          f"= {hp['training_tokens'] / 1e9:.2f}B tokens, {flops:.3g} FLOPs")  # fmt: skip
    for mfu in ours.mfu:
        hours = flops / (ours.gpus * H100_BF16_FLOPS * mfu) / 3600
        print(f"  {hours:.2f} h on {ours.gpus}xH100 at {mfu:.0%} MFU")


if __name__ == "__main__":
    main()
