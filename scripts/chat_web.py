"""Serve a chat model: a web page to chat in, and an OpenAI-compatible API.

    python -m scripts.chat_web                                   # the sft model on http://127.0.0.1:8000
    python -m scripts.chat_web -i base --port 8080               # any stage; tiny CPU models work too
    python -m scripts.chat_web -n 8 --host 0.0.0.0 --api-key "$KEY"   # one worker per GPU, open to the network
    python -m scripts.chat_web -i base --device-type cpu --quantize int8  # int8 weights: faster CPU decode

Open the address in a browser, or point any OpenAI client at it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])

`--host 0.0.0.0` exposes the model to the network: set `--api-key` (clients send `Authorization: Bearer <key>`)
and `--max-concurrent`.

Contract:
- Every flag but --host and --port is the nanochat.server.Settings field of the same name; -t, -k and -m are the
  defaults for requests that leave them out. Sampling flags read as scripts/chat_cli.py's, short forms included
  (-i -g -s -t -k -m); 0 turns top-k off. --port has no short form (chat_cli's -p is its one-shot prompt).
- A missing or corrupt checkpoint, or an int4 width its groups do not divide, ends in one line before serving.
Not here: the server itself (nanochat/server.py).
"""

import argparse
import json
import sys
from dataclasses import fields

import uvicorn

from nanochat.checkpoint import STAGES, checkpoint_dir, find_last_step, meta_path, verifies
from nanochat.quantize import INT4_GROUP_SIZE, SCHEMES, check_group_size
from nanochat.server import Settings, create_app
from nanochat.tokenizer import get_tokenizer
from scripts.chat_cli import HelpFormatter, parse_max_tokens, parse_temperature, parse_top_k


def parse_args(argv=None) -> argparse.Namespace:
    defaults = Settings()
    usage = __doc__.partition("\nContract:")[0]  # what a user needs; the contract is for readers of the code
    parser = argparse.ArgumentParser(description=usage, formatter_class=HelpFormatter)
    # Model
    parser.add_argument(
        "-i", "--source", choices=STAGES, default=defaults.source, metavar="STAGE", help="base|mid|sft|rl"
    )
    parser.add_argument("-g", "--model-tag", metavar="TAG", help="model directory, e.g. d20 (default: largest depth)")
    parser.add_argument("-s", "--step", type=int, help="checkpoint step (default: the last)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], help="default: the best available")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, metavar="N", help="one model copy per GPU")
    parser.add_argument(
        "--max-batch", type=int, default=defaults.max_batch, metavar="N", help="replies decoded at once"
    )
    parser.add_argument("--quantize", choices=sorted(SCHEMES), help="int8 or int4 weights: faster on a CPU")
    parser.add_argument("--compile", action="store_true", help="compile decoding (CUDA graphs on a GPU)")
    # Serving
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: none)")
    parser.add_argument("--max-concurrent", type=int, default=0, metavar="N", help="requests at once; 0 = no cap")
    parser.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, metavar="N", help="larger bodies get 413"
    )
    # Sampling: the defaults for requests that leave them out
    parser.add_argument(
        "-t", "--temperature", type=parse_temperature, default=defaults.temperature, metavar="T", help="0 = greedy"
    )
    parser.add_argument("-k", "--top-k", type=parse_top_k, default=defaults.top_k, metavar="K", help="0 = off")
    parser.add_argument(
        "-m", "--max-tokens", type=parse_max_tokens, default=defaults.max_tokens, metavar="N", help="per reply"
    )
    parser.add_argument(
        "--max-tokens-limit",
        type=parse_max_tokens,
        default=defaults.max_tokens_limit,
        metavar="N",
        help="the most a request may ask",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compile and args.quantize:  # dev/LOG.md: inductor cannot lower the quantized matmuls (torch 2.15)
        sys.exit("chat_web: --compile and --quantize do not combine yet: torch.compile fails on the quantized layers")
    if args.device_type in ("cpu", "mps") and args.num_gpus != 1:
        sys.exit(f"chat_web: --num-gpus {args.num_gpus} needs CUDA; on {args.device_type} there is one worker")
    # Every flag but --host and --port is a Settings field of the same name.
    options = {name: value for name, value in vars(args).items() if name in {f.name for f in fields(Settings)}}
    settings = Settings(**options)
    # Fail here with the loader's own message rather than inside uvicorn's startup, which would bury it.
    try:
        directory = checkpoint_dir(args.source, args.model_tag)
        step = args.step if args.step is not None else find_last_step(directory)
        if step is None:
            raise FileNotFoundError(f"no complete {args.source} checkpoint in {directory}")
        if not verifies(directory, step):  # issue 15: a corrupt file fails here, not as a worker's traceback
            raise ValueError(f"step {step} in {directory} does not match its checksums: a file is corrupt")
        get_tokenizer()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_web: {e}\n(train one first, or pick another with --source / --model-tag)")
    if args.quantize == "int4":  # every layer reads n_embd or 4 x n_embd inputs: they must split into groups
        with open(meta_path(directory, step), encoding="utf-8") as f:
            n_embd = json.load(f)["model_config"]["n_embd"]
        try:
            check_group_size(n_embd, INT4_GROUP_SIZE)
        except ValueError as e:
            sys.exit(f"chat_web: --quantize int4: {e}")
    print(f"chat_web: serving {args.source} on http://{args.host}:{args.port} (OpenAI API under /v1)")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
