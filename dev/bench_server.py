"""Web server throughput under concurrent clients: aggregate tokens/s, time to first token, errors.

    NANOCHAT_BASE_DIR=/tmp/ncbench python -m dev.bench_server --source base --model-tag d4 --clients 1 4 16
    git worktree add /tmp/old <commit>        # then old and new side by side, each level run on both in turn:
    NANOCHAT_BASE_DIR=/tmp/ncbench python -m dev.bench_server --source sft --clients 1 16 32 64 --compare-with /tmp/old

Starts `scripts.chat_web` as its own process (so the clients below do not share its interpreter), then for
each concurrency level runs that many clients at once, each sending `--requests-per-client` streaming requests
one after another to the page's endpoint `/chat/completions` and reading every event. Reported per level:
completed requests, errors (non-200 answers, error events, broken streams), completion tokens (the server's
own usage count), aggregate tokens/s over the level's wall time, per-stream decode tokens/s, and time to first
token (request sent -> first text event) p50 / p95. Every request uses its own seed, temperature 1.0 and top-k
50, so replies differ as they would for real users; `--repeat K` says each prompt K times (more prefill). The
last line is JSON. (Gaps between a stream's events are not a measure of stalls: a calculator block sends no
text until it closes.)

`--compare-with DIR` also starts the server of another checkout (its own code, this model) and runs every level
on it right beside this one's (alternately first), so both see the same machine load; it prints new / old.

Not a test: numbers depend on the machine and its load; dev/BENCHMARKS.md records them with the hardware.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import torch

from nanochat.common import Runtime, describe_environment

PROMPTS = [
    "Tell me about the history of the city.",
    "What is the capital of France?",
    "Write a short story about a cat.",
    "Explain how rivers form.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, seed: int, max_tokens: int, repeat: int = 1) -> dict:
    body = {
        "messages": [{"role": "user", "content": " ".join([PROMPTS[seed % len(PROMPTS)]] * repeat)}],
        "temperature": 1.0,
        "top_k": 50,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    try:
        async with client.stream("POST", url + "/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] in ("text", "tool") and first is None:
                    first = time.perf_counter() - start
                elif event["type"] == "error":
                    error = event["message"]
                elif event["type"] == "done":
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    elapsed = time.perf_counter() - start
    return {"error": error, "ttft": first, "tokens": tokens, "seconds": elapsed}


async def run_level(url: str, clients: int, requests_per_client: int, max_tokens: int, seed_base: int, repeat=1):
    async def client_loop(index: int, client: httpx.AsyncClient) -> list[dict]:
        results = []
        for r in range(requests_per_client):
            seed = seed_base + index * requests_per_client + r
            results.append(await one_request(client, url, seed, max_tokens, repeat))
        return results

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if not r.get("error")]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    decode_rates = [
        (r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in ok if r["ttft"] is not None and r["tokens"] > 1
    ]
    return {
        "clients": clients,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if r.get("error")})[:5],
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "per_stream_tokens_per_s": statistics.median(decode_rates) if decode_rates else 0.0,
        "ttft_p50_ms": 1000 * percentile(ttfts, 0.5) if ttfts else None,
        "ttft_p95_ms": 1000 * percentile(ttfts, 0.95) if ttfts else None,
    }


def start_server(args, port: int, checkout: str | None = None) -> subprocess.Popen:
    """scripts.chat_web from this checkout, or from `checkout` (another commit's worktree), ready to serve."""
    command = [sys.executable, "-m", "scripts.chat_web", "--source", args.source, "--port", str(port)]
    command += ["--max-batch", str(args.max_batch), "--device-type", args.device_type]
    command += ["--max-tokens-limit", str(max(args.max_tokens, 64))]
    if args.model_tag:
        command += ["--model-tag", args.model_tag]
    server = subprocess.Popen(command, cwd=checkout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench_server: the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).json().get("ready"):
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("bench_server: the server did not become ready in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"])
    parser.add_argument("--model-tag", default=None)
    parser.add_argument("--device-type", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (a reply may stop sooner)")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--repeat", type=int, default=1, help="each prompt said this many times (more prefill)")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compare-with", default=None, help="another checkout whose server runs each level too")
    args = parser.parse_args()

    print(describe_environment(Runtime(torch.device(args.device_type), torch.float32)))
    print(f"NANOCHAT_BASE_DIR={os.environ.get('NANOCHAT_BASE_DIR', '(default)')} source={args.source}")
    servers = {"new": start_server(args, args.port)}
    if args.compare_with:
        servers = {"old": start_server(args, args.port + 1, args.compare_with), **servers}
    urls = {name: f"http://127.0.0.1:{args.port + (name == 'old')}" for name in servers}
    levels = {name: [] for name in servers}
    try:
        for name, url in urls.items():
            model = httpx.get(url + "/health").json()["model"]
            print(f"{name}: {model}, {args.requests_per_client} requests per client, up to {args.max_tokens} tokens")
            asyncio.run(run_level(url, 1, 1, 8, seed_base=10**6))  # warm-up, not reported
        for seed_base, clients in enumerate(args.clients):
            for name, url in sorted(urls.items(), reverse=seed_base % 2 == 1):  # same seeds; who goes first alternates
                run = run_level(url, clients, args.requests_per_client, args.max_tokens, seed_base * 1000, args.repeat)
                level = asyncio.run(run)
                levels[name].append(level)
                print(
                    f"{name:>3} clients {clients:>3}: {level['completed']:>3}/{level['requests']} ok, "
                    f"{level['errors']} errors, {level['tokens']:>5} tokens in {level['wall_s']:6.1f} s = "
                    f"{level['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
                    f"{level['per_stream_tokens_per_s']:6.1f} tok/s per stream, TTFT p50 "
                    f"{level['ttft_p50_ms']:.0f} ms p95 {level['ttft_p95_ms']:.0f} ms"
                )
            if "old" in levels:
                old, new = levels["old"][-1], levels["new"][-1]
                keys = ("aggregate_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms")
                ratios = {key: new[key] / old[key] for key in keys}
                print("    new / old: " + ", ".join(f"{key} {ratio:.2f}x" for key, ratio in ratios.items()))
        for runs in levels.values():
            for level in runs:
                level["speedup_vs_first"] = level["aggregate_tokens_per_s"] / runs[0]["aggregate_tokens_per_s"]
        stats = {name: httpx.get(url + "/stats").json() for name, url in urls.items()}
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(30)
    report = {"levels": levels, "server_stats": stats}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
