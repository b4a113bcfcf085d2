"""Conversion of a nanochat GPT and its tokenizer to the Hugging Face transformers format.

Contract:
- `export(model, tokenizer, out_dir, card=None)` writes config.json, generation_config.json, model.safetensors,
  tokenizer.json, tokenizer_config.json (with a chat template) and the `model_card` README.md, all 0666 less
  the umask, so that `AutoModelForCausalLM.from_pretrained(out_dir)` gives our logits (fp32 on CPU:
  bit-identical in the tests) and `AutoTokenizer.from_pretrained(out_dir)` encodes and renders chats as we do.
- Two model formats. A classic model (every GPTConfig field beyond CLASSIC_FIELDS at its default, which is
  "off") becomes transformers' own NanoChat: no custom code. Any other (value embeddings, windows, ...) becomes
  remote code: modeling_nanochat.py (nanochat/hf_modeling.py) and a verbatim copy of nanochat/gpt.py, loaded
  with `trust_remote_code=True`, our state dict as is (see `remote_code_fields`).
- Files are written atomically, config.json last (its presence marks a complete export). A non-empty
  directory is refused unless `force`.
- Loading needs transformers >= 5.0 (NanoChat and the `rope_parameters`/`dtype` keys arrived in v5; tested on
  5.0.0 and 5.23.0); writing needs only safetensors and tokenizers.

How our model maps onto transformers' NanoChat (modeling_nanochat.py, read in 5.23):
- names: wte -> model.embed_tokens, blocks.i.attn.c_{q,k,v,proj} -> model.layers.i.self_attn.{q,k,v,o}_proj,
  blocks.i.mlp.c_fc/c_proj -> model.layers.i.mlp.fc1/fc2, lm_head -> lm_head. No norm has a weight on either side.
- RoPE: both rotate the pairs (i, i + D/2), but transformers turns them by -angle (its rotate_half is
  cat(x2, -x1)) where ours turns them by +angle. Negating the second half of every q and k head fixes it
  exactly: with S = diag(1, -1) per pair, R(-a) S = S R(a), the per-head RMSNorm commutes with S, and q·k is
  unchanged because both sides carry S.
- RMSNorm eps: ours is F.rms_norm's default, float32 machine epsilon; NanoChat's default is 1e-6, so the config
  carries ours. The vocabulary is exported without our padding rows (see hf_state_dict).

The tokenizer: byte-level BPE over our ranks behind a Split pre-tokenizer with our pattern (see bpe_merges).
Transformers' own behaviours: `tokenizer(text)` prepends <|bos|> (add_special_tokens=False gives our
`encode(text)`), and a special token's literal text inside a string becomes that token unless
split_special_tokens=True, where ours keeps it as plain text. There is no pad token.

Not here: loading checkpoints (scripts/export_hf.py), uploading to the Hub, the reverse conversion.
"""

import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from nanochat.common import atomic_write
from nanochat.gpt import GPT, GPTConfig
from nanochat.report import read_stage
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps=None, for fp32 and (in fp32) bf16/fp16 inputs

# Files an earlier export may have left that transformers would read instead of, or on top of, ours, and a
# remote-code export's code, stale under a classic export: `force` deletes them.
SHADOWING_FILES = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "chat_template.jinja", "chat_template.json", "special_tokens_map.json", "added_tokens.json",
    "modeling_nanochat.py", "gpt.py")  # fmt: skip

# The GPTConfig fields transformers' NanoChat carries, and `init` (how training starts, not what the model computes);
# every other one must be at its default to use it.
CLASSIC_FIELDS = set("sequence_len vocab_size n_layer n_head n_kv_head n_embd rope_base logit_softcap init".split())

# Our chat protocol (Tokenizer.render_conversation) in Jinja; every tag trims the text around it ({%- -%}), so
# this layout's line breaks and indentation never reach the output.
CHAT_TEMPLATE = r"""
{%- if messages[0]['role'] == 'system' -%}
  {%- if messages | length < 2 or messages[1]['role'] != 'user' -%}
    {{- raise_exception('a system message must be followed by a user message') -}}
  {%- endif -%}
  {%- set first = {'role': 'user', 'content': messages[0]['content'] + '\n\n' + messages[1]['content']} -%}
  {%- set turns = [first] + messages[2:] -%}
{%- else -%}{%- set turns = messages -%}{%- endif -%}
<|bos|>
{%- for message in turns -%}
  {%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}
    {{- raise_exception('turns must alternate user/assistant, starting with user (a system message may come first)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}{{- '<|user_start|>' + message['content'] + '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}{{- message['content'] -}}
    {%- else -%}{%- for part in message['content'] -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}
      {%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
      {%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
      {%- else -%}{{- raise_exception('assistant parts have type text, python or python_output') -}}
      {%- endif -%}
    {%- endfor -%}{%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if turns[-1]['role'] != 'user' -%}
    {{- raise_exception('add_generation_prompt needs the conversation to end with a user message') -}}
  {%- endif -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
"""


class UnsupportedModelError(ValueError):
    """The model uses something the transformers NanoChat format cannot express."""


def remote_code_fields(config: GPTConfig) -> list[str]:
    """The GPTConfig fields that transformers' NanoChat cannot express, as "name=value": those beyond
    CLASSIC_FIELDS away from their defaults (a new field defaults to the classic architecture, so that older
    checkpoints keep loading). Empty for a classic model."""
    return [f"{f.name}={getattr(config, f.name)!r}" for f in fields(config)
            if f.name not in CLASSIC_FIELDS and getattr(config, f.name) != f.default]  # fmt: skip


def check_exportable(config: GPTConfig, tokenizer: Tokenizer) -> None:
    if not config.logit_softcap > 0:
        raise UnsupportedModelError(f"logit_softcap must be positive to export, got {config.logit_softcap}")
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UnsupportedModelError(f"the model has vocab_size {config.vocab_size} but the tokenizer has "
                                    f"{tokenizer.get_vocab_size()} tokens: export the one it trained with")  # fmt: skip


def hf_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of NanoChatForCausalLM, after checking every GPTConfig field can be carried over."""
    if remote_code_fields(config):
        raise UnsupportedModelError(f"transformers' NanoChat cannot express {remote_code_fields(config)}: "
                                    "export it as remote code")  # fmt: skip
    check_exportable(config, tokenizer)
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,  # the real vocabulary, not our padded one: see hf_state_dict
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,  # ReLU² MLP width (nanochat/gpt.py MLP)
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        # NanoChat derives head_dim = hidden_size / num_attention_heads, which is how GPTConfig defines it too.
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "final_logit_softcapping": float(config.logit_softcap),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **hf_generation_config(tokenizer),
    }


def remote_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of nanochat/hf_modeling.py's NanoChatGPTForCausalLM: our GPTConfig as is."""
    check_exportable(config, tokenizer)
    classes = {"AutoConfig": "NanoChatGPTConfig", "AutoModelForCausalLM": "NanoChatGPTForCausalLM"}
    return {
        "architectures": ["NanoChatGPTForCausalLM"],
        "model_type": "nanochat_gpt",
        "auto_map": {auto: f"modeling_nanochat.{name}" for auto, name in classes.items()},
        **config.to_dict(),
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
        **hf_generation_config(tokenizer),
    }


def hf_generation_config(tokenizer: Tokenizer) -> dict:
    """The special token ids, for config.json and generation_config.json alike."""
    bos_id = tokenizer.get_bos_token_id()
    # A chat turn ends at <|assistant_end|>; a base model ends a document by starting the next with <|bos|>.
    # No pad token: NanoChat makes pad_token_id nn.Embedding's padding_idx, freezing that token in fine-tuning.
    return {"bos_token_id": bos_id, "eos_token_id": [tokenizer.encode_special("<|assistant_end|>"), bos_id],
            "pad_token_id": None}  # fmt: skip


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under NanoChatForCausalLM's names, as new contiguous tensors of `dtype` on the CPU."""
    config = model.config
    ours = dict(model.state_dict())  # detached tensors
    vocab_size, head_dim = config.vocab_size, config.head_dim

    # The padding rows are cut: ids never reach them and our forward slices their logits off, so the logits are
    # ours and the model cannot sample an id the tokenizer does not have.
    converted = {
        "model.embed_tokens.weight": ours.pop("wte.weight")[:vocab_size],
        "lm_head.weight": ours.pop("lm_head.weight")[:vocab_size],
    }
    # (ours, transformers', heads whose RoPE halves to flip or None) per block's matrix.
    matrices = [("attn.c_q", "self_attn.q_proj", config.n_head), ("attn.c_k", "self_attn.k_proj", config.n_kv_head)]
    matrices += [("attn.c_v", "self_attn.v_proj", None), ("attn.c_proj", "self_attn.o_proj", None)]
    matrices += [("mlp.c_fc", "mlp.fc1", None), ("mlp.c_proj", "mlp.fc2", None)]
    for i in range(config.n_layer):
        for our_name, hf_name, num_heads in matrices:
            weight = ours.pop(f"blocks.{i}.{our_name}.weight")
            if num_heads:  # see "RoPE" at the top
                weight = weight.clone().view(num_heads, head_dim, -1)  # (heads, head_dim, n_embd)
                weight[:, head_dim // 2 :] *= -1
                weight = weight.view(num_heads * head_dim, -1)
            converted[f"model.layers.{i}.{hf_name}.weight"] = weight
    if ours:  # a tensor we did not place would silently vanish from the export
        raise UnsupportedModelError(f"no transformers NanoChat equivalent for {sorted(ours)}")
    return {name: tensor.to(device="cpu", dtype=dtype, copy=True).contiguous() for name, tensor in converted.items()}


def bpe_merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merge rules that make BPE merge like tiktoken, which merges any adjacent pair whose concatenation is a token,
    lowest rank first: every split of every token in two is a rule, ordered by (token rank, halves' ranks)."""
    rank_of = {token: rank for rank, token in enumerate(ranks)}
    rules = []
    for rank, token in enumerate(ranks):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in rank_of and right in rank_of:
                rules.append((rank, rank_of[left], rank_of[right], left, right))
    rules.sort()
    return [(left, right) for _, _, _, left, right in rules]


def hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes exactly as ours, special tokens at our ids."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    ranks = tokenizer._mergeable_ranks
    if ranks is None:
        raise UnsupportedModelError("only a tokenizer trained by nanochat (with its merge ranks) can be exported")
    # GPT-2's byte -> printable character map, which tokenizers' ByteLevel steps assume.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    as_chars = {byte: chr(byte) for byte in printable} | {byte: chr(256 + i) for i, byte in enumerate(others)}

    def to_text(token: bytes) -> str:
        return "".join(as_chars[byte] for byte in token)

    vocab = {to_text(token): rank for rank, token in enumerate(ranks)}
    merges = [(to_text(left), to_text(right)) for left, right in bpe_merges(ranks)]
    # ignore_merges: a piece that is itself a token is emitted whole, as tiktoken does, before any merging.
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    split = pre_tokenizers.Split(Regex(tokenizer.get_pattern()), behavior="isolated", invert=False)
    bytes_to_chars = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    fast.pre_tokenizer = pre_tokenizers.Sequence([split, bytes_to_chars])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    wrong = [name for name in SPECIAL_TOKENS if fast.token_to_id(name) != tokenizer.encode_special(name)]
    if wrong:
        raise UnsupportedModelError(f"special tokens {wrong} would not keep our ids")
    bos = [("<|bos|>", tokenizer.get_bos_token_id())]
    fast.post_processor = processors.TemplateProcessing("<|bos|> $A:0", "<|bos|> $A:0 <|bos|>:1 $B:1", bos)
    return fast


def model_card(model: GPT, source: str, tag: str, step: int, reports: str) -> str:
    """README.md: the architecture, pretraining tokens and scores from the report card in `reports` (a summary of
    another model tag does not count), naming each one that is missing."""

    def recorded(stage: str, show) -> str:
        summary, _ = read_stage(reports, stage)
        if not summary or summary.get("model_tag") != tag:
            return f"not recorded (no {stage}.json for {tag} in {reports})"
        return show(summary)

    def chat(summary: dict) -> str:
        score = "not reported (it needs all six tasks)" if summary["chatcore"] is None else f"{summary['chatcore']:.4f}"
        tasks = ", ".join(f"{name} {row['accuracy']:.4f}" for name, row in summary["tasks"].items())
        return f"{score} (step {summary['step']}); accuracy: {tasks}"

    c, padding = model.config, model.wte.weight.shape[0] - model.config.vocab_size  # padding rows are not used
    tables = [model.wte, model.lm_head, *model.value_embeds.values()]  # (padded vocab, width) each
    params = sum(p.numel() for p in model.parameters()) - sum(padding * table.weight.shape[1] for table in tables)
    extra = remote_code_fields(c)
    code = "with `trust_remote_code=True` (its model code is nanochat's gpt.py)" if extra else "no custom code"
    return f"""---
library_name: transformers
---
# nanochat {tag} ({source}, step {step})

Exported by nanochat's scripts/export_hf.py; loads with transformers >= 5.0, {code}.

{c.n_layer} layers, width {c.n_embd}, {c.n_head} query / {c.n_kv_head} key-value heads, ReLU² MLP, RoPE (base \
{c.rope_base:g}), QK-norm, logit softcap {c.logit_softcap:g}; context {c.sequence_len} tokens, vocabulary \
{c.vocab_size}, {params:,} parameters.{f" Also: {', '.join(extra)}." if extra else ""}

- Pretraining tokens: {recorded("base_train", lambda summary: f"{summary['tokens']:,}")}
- CORE: {recorded("base_eval", lambda summary: f"{summary['core']:.4f} (step {summary['step']})")}
- ChatCORE of {source}: {recorded(f"chat_eval_{source}", chat)}
"""


def check_out_dir(out_dir: str, force: bool) -> None:
    """Raises OSError, before anything is loaded or written, when `out_dir` cannot take an export: a non-empty
    directory (unless `force`), or a path whose nearest existing part is not a writable directory."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise FileExistsError(f"{out_dir} is not empty; pass --force to overwrite the export files in it")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
        raise PermissionError(f"cannot write to {out_dir}: {existing} is not a writable directory")


def export(model: GPT, tokenizer: Tokenizer, out_dir: str, dtype=torch.float32, force=False, card=None) -> list[str]:
    """Writes the transformers files into `out_dir` (remote code for a model with `remote_code_fields`) and returns
    their paths. Everything is converted and checked before the first write; `force` replaces our files and deletes
    SHADOWING_FILES, leaving others alone."""
    from safetensors.torch import save

    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype}")
    code = {}  # file name in out_dir -> our source file
    if remote_code_fields(model.config):
        config_json = remote_config(model.config, tokenizer, dtype)
        tensors = {f"gpt.{name}": tensor.to(device="cpu", dtype=dtype, copy=True).contiguous()
                   for name, tensor in model.state_dict().items()}  # fmt: skip
        here = os.path.dirname(os.path.abspath(__file__))
        code = {"modeling_nanochat.py": os.path.join(here, "hf_modeling.py"), "gpt.py": os.path.join(here, "gpt.py")}
    else:
        config_json = hf_config(model.config, tokenizer, dtype)
        tensors = hf_state_dict(model, dtype)
    fast_tokenizer = hf_tokenizer(tokenizer)

    check_out_dir(out_dir, force)
    os.makedirs(out_dir, exist_ok=True)
    for name in SHADOWING_FILES:
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    # clean_up_tokenization_spaces off: decoding must give back the exact text.
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                        "eos_token": "<|assistant_end|>", "model_max_length": model.config.sequence_len,
                        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}  # fmt: skip
    as_json = lambda data: (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")  # noqa: E731
    files = {
        "model.safetensors": save(tensors, metadata={"format": "pt"}),  # bytes: safetensors' own file is 0600
        "tokenizer.json": fast_tokenizer.to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": as_json(tokenizer_config),
        "generation_config.json": as_json(hf_generation_config(tokenizer)),
        **({"README.md": card.encode("utf-8")} if card else {}),
        **{name: Path(source).read_bytes() for name, source in code.items()},
        "config.json": as_json(config_json),  # last: its presence marks a complete export
    }
    for name, data in files.items():
        atomic_write(os.path.join(out_dir, name), lambda f, data=data: f.write(data))
    return [os.path.join(out_dir, name) for name in files]
