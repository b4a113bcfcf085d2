"""Compression of the trained tokenizer: bytes per token on several kinds of text.

Samples of prose, code, math and non-English text, plus held-out pretraining text (the validation split of
--data), are encoded with our tokenizer and, when tiktoken can load them, with GPT-2's and GPT-4's
(cl100k_base). Higher bytes/token = better compression. Offline, tiktoken cannot fetch those two encodings;
the table then says so and compares ours alone. Results go to <base dir>/tokenizer/eval.json and the report
card's <base dir>/report/tok_eval.json.

    python -m scripts.tok_eval
    python -m scripts.tok_eval --data my_texts.jsonl.gz     # held-out text: every 100th document

Does not train anything (scripts.tok_train does).
"""

import argparse
import json
import os

from nanochat.common import atomic_write, get_base_dir
from nanochat.dataset import DatasetError, add_data_argument, default_pretrain_paths, iter_documents, take_chars
from nanochat.report import write_stage_summary
from nanochat.tokenizer import Tokenizer

# Written for this evaluation; each is a few hundred bytes of one kind of text.
SAMPLES = {
    "prose": (
        "The city council voted on Tuesday to extend the riverside cycle path by another four kilometres, "
        "linking the old harbour district with the university campus. Supporters said the project would cut "
        "traffic near the schools, while shop owners on Mill Street worried about losing parking spaces during "
        "the eighteen months of construction. The first section is expected to open next spring."
    ),
    "code": '''def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    sums = [0.0] + list(itertools.accumulate(values))
    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]
''',
    "math": (
        r"Let $f(x) = \sum_{n=0}^{\infty} \frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, so "
        r"$f(x) = e^{x}$. For the Gaussian integral, $\int_{-\infty}^{\infty} e^{-x^2}\,dx = \sqrt{\pi}$, "
        r"which follows from $\left(\int e^{-x^2} dx\right)^2 = \int_0^{2\pi}\!\int_0^\infty e^{-r^2} r\,dr\,d\theta$."
    ),
    "korean": (
        "오늘 아침 시장에서는 신선한 채소와 과일을 팔았다. 할머니는 사과 한 봉지를 사시고, "
        "나는 친구에게 줄 꽃을 골랐다. 날씨가 맑아서 많은 사람들이 공원으로 산책을 나갔다."
    ),
    "chinese": (
        "今天早上下了一场小雨，空气变得很清新。我们一家人决定去山上走走，"
        "路边开满了黄色的小花，孩子们一路唱着歌，非常开心。"
    ),
    "spanish": (
        "El tren salió de la estación con veinte minutos de retraso, pero el conductor recuperó el tiempo "
        "perdido antes de llegar a la costa. Muchos pasajeros aprovecharon el viaje para leer o dormir."
    ),
}


def load_reference(name: str):
    """A tiktoken encoding, or None with the reason when it cannot be loaded (e.g. offline)."""
    try:
        return Tokenizer.from_pretrained(name), None
    except Exception as e:  # network errors come in many types
        return None, f"{type(e).__name__}: {str(e)[:120]}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser, "held-out text, their validation split (skipped if absent)")
    parser.add_argument("--heldout-chars", type=int, default=5_000_000, help="characters of held-out text to encode")
    parser.add_argument("--tokenizer-dir", default=None, help="default: <base dir>/tokenizer")
    args = parser.parse_args(argv)

    tokenizer_dir = args.tokenizer_dir or os.path.join(get_base_dir(), "tokenizer")
    try:
        ours = Tokenizer.load(tokenizer_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(1, f"tok_eval: {e}\n")
    texts = dict(SAMPLES)
    try:
        heldout = take_chars(iter_documents(args.data or default_pretrain_paths(), "val"), args.heldout_chars)
        texts["heldout"] = "\n".join(heldout)
    except DatasetError as e:
        print(f"note: no held-out pretraining text ({e})")

    encoders = {"ours": ours}
    for label, name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
        encoder, why = load_reference(name)
        if encoder is None:
            print(f"note: cannot load tiktoken's {name} ({why}); comparing without it. "
                  "tiktoken downloads it on first use, so run once online or set TIKTOKEN_CACHE_DIR.")  # fmt: skip
        else:
            encoders[label] = encoder

    # ---------------------------------------------------------------- measure
    results = {}
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        counts = {label: len(encoder.encode(text)) for label, encoder in encoders.items()}
        per_encoder = {label: {"tokens": n, "bytes_per_token": round(n_bytes / n, 3)} for label, n in counts.items()}
        results[kind] = {"bytes": n_bytes, **per_encoder}
    references = [label for label in ("gpt2", "gpt4") if label in encoders]
    print(f"vocab {ours.get_vocab_size():,}; bytes per token (higher is better); 'vs' = fewer tokens than them")
    print(f"{'text':<10}{'bytes':>11}" + "".join(f"{label + ' B/tok':>14}" for label in encoders)
          + "".join(f"{'vs ' + label:>10}" for label in references))  # fmt: skip
    for kind, row in results.items():
        cells = [f"{row[label]['bytes_per_token']:>14.2f}" for label in encoders]
        cells += [f"{1 - row['ours']['tokens'] / row[label]['tokens']:>+10.1%}" for label in references]
        print(f"{kind:<10}{row['bytes']:>11,}" + "".join(cells))
    out = os.path.join(tokenizer_dir, "eval.json")
    table = {"vocab_size": ours.get_vocab_size(), "encoders": list(encoders), "results": results}
    atomic_write(out, lambda f: f.write(json.dumps(table, indent=2).encode()))
    write_stage_summary("tok_eval", table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
