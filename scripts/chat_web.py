"""Serve a chat model: the web page, a streaming API and an OpenAI-compatible API (nanochat/server.py).

    python -m scripts.chat_web                                   # the sft model on http://127.0.0.1:8000
    python -m scripts.chat_web --source base --port 8080         # tiny CPU models work too
    python -m scripts.chat_web --num-gpus 8 --host 0.0.0.0 --api-key "$KEY"   # one worker per GPU, public
    python -m scripts.chat_web --source base --device-type cpu --quantize int8  # int8 weights: faster CPU decode

Then open the page in a browser, or point any OpenAI client at it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}])

`--host 0.0.0.0` exposes the model to the network: set `--api-key` (clients send `Authorization: Bearer <key>`)
and `--max-concurrent`. Not here: the server itself (nanochat/server.py).
"""

import argparse
import json
import sys
from dataclasses import fields

import uvicorn

from nanochat.checkpoint import checkpoint_dir, find_last_step, meta_path, verifies
from nanochat.quantize import INT4_GROUP_SIZE, SCHEMES, check_group_size
from nanochat.server import Settings, create_app
from nanochat.tokenizer import get_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("-i", "--source", default=defaults.source, choices=["base", "mid", "sft", "rl"])
    parser.add_argument("-g", "--model-tag", default=None, help="checkpoint directory (default: largest depth)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: last)")
    parser.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="batching workers, one model copy per GPU")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="requests decoded together per GPU")
    parser.add_argument("--quantize", choices=sorted(SCHEMES), default=None, help="int8/int4 weights; default float")
    parser.add_argument("--compile", action="store_true", help="decode with torch.compile (CUDA graphs on a GPU)")
    # Serving
    parser.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 listens on every interface")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: open)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="requests in flight at once (0 = no cap)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    # Sampling defaults (a request may override them within the limits)
    parser.add_argument("-t", "--temperature", type=float, default=defaults.temperature)
    parser.add_argument("-k", "--top-k", type=int, default=defaults.top_k, help="-1 = off")
    parser.add_argument("-m", "--max-tokens", type=int, default=defaults.max_tokens, help="tokens per reply")
    parser.add_argument(
        "--max-tokens-limit", type=int, default=defaults.max_tokens_limit, help="the most tokens a request may ask for"
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
    settings = Settings(**{**options, "top_k": None if args.top_k == -1 else args.top_k})
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
