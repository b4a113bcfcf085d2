"""Export a trained checkpoint to the Hugging Face transformers format.

Loads a stage's checkpoint and the tokenizer from the base dir and writes the files of nanochat/hf_export.py (the
mapping, what cannot be exported) to --out, with a model card of the report card's scores; they load with
transformers >= 5.0 and give our logits. A classic model becomes transformers' own NanoChat (no custom code); one
with a part NanoChat lacks (value embeddings, windows, ...) ships our gpt.py as remote code, loaded with
trust_remote_code=True (one line says which). A user error (an --out that is not empty or not writable, a missing
checkpoint, a model the format cannot express) ends in one line; runs on the CPU; does not upload to the Hub.

    python -m scripts.export_hf --source sft --out hf/d20                      # latest sft checkpoint, largest depth
    python -m scripts.export_hf --source base --model-tag d12 --step 5000 --out hf/d12-base --dtype bfloat16
    NANOCHAT_BASE_DIR=/tmp/nanochat-tiny python -m scripts.export_hf --source base --out /tmp/hf-tiny  # tiny, CPU

Then:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained("hf/d20"), AutoTokenizer.from_pretrained("hf/d20")
    # or, when export_hf said "remote code": AutoModelForCausalLM.from_pretrained("hf/d20", trust_remote_code=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
"""

import argparse
import os

from nanochat.hf_export import EXPORT_DTYPES, check_out_dir, export, model_card, remote_code_fields


def main(argv=None):
    # Imported here so that nothing but running the script needs the checkpoint code (or touches the base dir).
    from nanochat.checkpoint import STAGES, CheckpointError, checkpoint_dir, load_model
    from nanochat.report import report_dir
    from nanochat.tokenizer import get_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Checkpoint
    parser.add_argument("--source", required=True, choices=sorted(STAGES), help="which stage's checkpoints to export")
    parser.add_argument("--model-tag", default=None, help="directory under the stage, e.g. d20 (default: largest)")
    parser.add_argument("--step", type=int, default=None, help="training step to export (default: the last complete)")
    # Output
    parser.add_argument("--out", required=True, help="output directory (refused if not empty, unless --force)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES), help="float32: our logits exactly")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing an export there")
    args = parser.parse_args(argv)

    try:
        check_out_dir(args.out, args.force)  # before loading anything: a refused --out should not cost a load
        source_dir = checkpoint_dir(args.source, args.model_tag)
        model, meta = load_model(args.source, "cpu", "eval", model_tag=args.model_tag, step=args.step)
        print(f"export_hf: {source_dir} step {meta['step']}: {model.config}")
        remote = remote_code_fields(model.config)
        print(f"export_hf: remote code, as transformers' NanoChat has no {', '.join(remote)}" if remote
              else "export_hf: classic architecture: transformers' own NanoChat, no custom code")  # fmt: skip
        card = model_card(model, args.source, os.path.basename(source_dir), meta["step"], report_dir())
        paths = export(model, get_tokenizer(), args.out, EXPORT_DTYPES[args.dtype], args.force, card)
    except (OSError, CheckpointError, ValueError) as e:  # OSError: also a write that fails (disk full, read-only)
        parser.exit(1, f"export_hf: {e}\n")
    for path in paths:
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    trust = ", trust_remote_code=True" if remote else ""
    print(f"load with transformers.AutoModelForCausalLM.from_pretrained({args.out!r}{trust})")


if __name__ == "__main__":
    main()
