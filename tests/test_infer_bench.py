"""dev/infer_bench.py runs end to end on a tiny random model on CPU and writes well-formed JSON.

No timing assertions: only that every figure is there, finite and positive, and that each row decoded exactly
the tokens asked for (the stand-in tokenizer keeps the engine from stopping early).
"""

import json
import math
from functools import partial

from dev.infer_bench import main


def test_tiny_random_model_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(
        [
            "--depth", "1", "--vocab-size", "256", "--sequence-len", "64", "--prompt-len", "100",
            "--decode-tokens", "8", "--batch-sizes", "3", "1", "--repeats", "2", "--prefill-chunk", "16",
            "--device-type", "cpu", "--dtype", "float32", "--json", str(out),
        ]
    )  # fmt: skip
    assert "| batch |" in capsys.readouterr().out
    report = json.loads(out.read_text())  # strict JSON: no NaN or Infinity
    settings = report["settings"]
    assert settings["prompt_len"] == 64 - 8  # clamped so that every decode token fits in the context
    assert settings["decode_tokens"] == 8 and settings["batch_sizes"] == [1, 3]
    assert report["model"]["config"]["n_layer"] == 1 and report["model"]["config"]["vocab_size"] == 256
    assert report["environment"]["device"] == "cpu"
    assert report["peak_bandwidth_bytes_per_s"] is None and report["roofline_batch1_tokens_per_s"] is None
    assert report["prefill"]["prefill_tokens_per_s"] > 0 and report["skipped_batch_sizes"] == []

    decode = report["decode"]
    assert [r["batch_size"] for r in decode] == [1, 3]
    for r in decode:
        assert r["decode_tokens"] == 8 and r["decode_tokens_per_row"] == [8] * r["batch_size"]
        for key in (
            "ttft_s_median",
            "tpot_s_median",
            "decode_tokens_per_s_per_sequence",
            "decode_tokens_per_s_aggregate",
            "bytes_per_step",
            "memory_bytes_per_s",
            "peak_memory_bytes",
        ):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert "mbu" not in r  # a CPU has no entry in the peak-bandwidth table
        assert math.isclose(r["decode_tokens_per_s_aggregate"], r["batch_size"] * r["decode_tokens_per_s_per_sequence"])


def test_compile_decode_measures_the_compiled_engine(tmp_path, monkeypatch):
    """--compile-decode: the sweep runs Engine(compile_decode=True) (here with torch.compile's quick aot_eager
    backend; inductor needs a C++ toolchain) and says so in the report."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dev import infer_bench

    monkeypatch.setattr(infer_bench, "Engine", partial(infer_bench.Engine, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    out = tmp_path / "bench.json"
    main(
        [
            "--depth", "1", "--vocab-size", "256", "--sequence-len", "32", "--decode-tokens", "4", "--batch-sizes",
            "2", "--repeats", "1", "--device-type", "cpu", "--dtype", "float32", "--compile-decode", "--json", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["settings"]["compile_decode"] is True and report["decode"][0]["decode_tokens_per_row"] == [4, 4]
    assert counters["stats"]["unique_graphs"] == 1  # every decode step ran the one compiled graph
