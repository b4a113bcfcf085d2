"""The Hugging Face export: transformers loads our model and tokenizer and computes exactly what we do.

Tiny models (2-4 layers, 128 wide) and a tokenizer trained here on a few Wikipedia articles; CPU only.
transformers' own NanoChat code is the reference for classic models: logits, greedy generation (its KV cache),
tokenization and the chat template are compared against ours. A model with the parts NanoChat lacks ships our
gpt.py as remote code, loaded in a fresh process that cannot import nanochat.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import REPO
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_export import UnsupportedModelError, bpe_merges, export, hf_config, model_card
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# 1000 is not a multiple of 64, so the model pads its vocab to 1024 and the export has to cut the padding.
VOCAB_SIZE = 1000

TEXTS = [
    "Hello, world! It's 2026; we've got 12345 tokens and 3.14159 more.",
    "  leading spaces,   runs   of spaces,\ttabs\t\t, trailing   ",
    "\n\nnewlines\r\nWindows\rold Mac\n\n\n",
    "日本語のテキスト, 한국어 문장, Ελληνικά, العربية, हिन्दी 🙂👨‍👩‍👧 e\u0301 ﬁ",
    "numbers: 1 22 333 4444 55555 1,000,000 0.001 -42 1e10",
    "lookalikes: <|bos |> <| bos|> <|user_start <|assistant_end| |> <|> <||> |bos| <|unknown|>",
    "DON'T 'll 'VE it's y'all",
    "x" * 300,
    " " * 40 + "y",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour.\n"}],
    [
        {"role": "user", "content": "Compute 12*34, please."},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "12*34"},
                {"type": "python_output", "text": "408"},
                {"type": "text", "text": " It is 408."},
            ],
        },
        {"role": "user", "content": "  And in Japanese?  日本語 "},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello  there"},
        {"role": "user", "content": "<|bos lookalike|> 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(wiki_docs) -> Tokenizer:
    tok = Tokenizer.train_from_iterator(wiki_docs[:200], VOCAB_SIZE)
    assert tok.get_vocab_size() == VOCAB_SIZE
    return tok


# Every part transformers' NanoChat lacks (issue 14), at 4 layers: value embeddings on layers 1 and 3, windows of
# 3 keys on layers 0 and 1 (the test's sequences run to 64 tokens), backout after layer 1.
NEW_PARTS = {"n_layer": 4, "value_embeds": True, "resid_scalars": True, "window_pattern": "SSL", "short_window": 3,
             "backout": True, "qk_scale": 1.2, "init": "tuned"}  # fmt: skip


def randomized_model(n_kv_head: int, seed: int = 0, **kwargs) -> GPT:
    """A GPT with every weight random (init zeroes lm_head and the output projections), large enough that the
    logits reach the curved part of the softcap."""
    shape = {"sequence_len": 64, "vocab_size": VOCAB_SIZE, "n_layer": 2, "n_head": 4, "n_embd": 128}
    config = GPTConfig(**(shape | kwargs), n_kv_head=n_kv_head)
    torch.manual_seed(seed)
    model = GPT.build(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0.0, 1.0 if name == "wte.weight" else 0.2)
    return model.eval()


def load_hf(directory):
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    # Every HF weight must come from our file: a missing one would be silently random-initialised.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def chat_ids(hf_tokenizer, conversation, **kwargs) -> list[int]:
    return hf_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs)["input_ids"]


# ---------------------------------------------------------------------------- model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_logits_match(tmp_path, tokenizer, n_kv_head):
    model = randomized_model(n_kv_head)
    export(model, tokenizer, str(tmp_path))
    hf_model = load_hf(tmp_path)
    generator = torch.Generator().manual_seed(n_kv_head)
    with torch.no_grad():
        for batch_size, length in [(1, 1), (2, 7), (3, 64)]:
            ids = torch.randint(0, VOCAB_SIZE, (batch_size, length), generator=generator)
            ours = model(ids)
            theirs = hf_model(ids).logits
            assert theirs.shape == ours.shape == (batch_size, length, VOCAB_SIZE)
            assert theirs.dtype == torch.float32
            assert ours.abs().max() > 5  # the comparison means something: logits are far from 0
            assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_generation_matches_through_the_kv_cache(tmp_path, tokenizer):
    """transformers generates with its KV cache (RoPE at offsets, one token at a time); ours recomputes."""
    model = randomized_model(n_kv_head=2, seed=1)
    export(model, tokenizer, str(tmp_path))
    hf_model = load_hf(tmp_path)
    prompt = tokenizer.render_for_completion(CONVERSATIONS[0])
    ours = list(model.generate(prompt, max_tokens=12, temperature=0))
    with torch.no_grad():
        output = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    theirs = output[0, len(prompt) :].tolist()
    assert len(theirs) >= 1 and theirs == ours[: len(theirs)]  # transformers may stop early at an eos token


def test_config_and_weights_on_disk(tmp_path, tokenizer):
    model = randomized_model(n_kv_head=2)
    export(model, tokenizer, str(tmp_path), dtype=torch.bfloat16)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanoChatForCausalLM"]
    assert config["rms_norm_eps"] == torch.finfo(torch.float32).eps  # F.rms_norm's default, not NanoChat's 1e-6
    assert config["vocab_size"] == VOCAB_SIZE and config["dtype"] == "bfloat16"
    assert config["pad_token_id"] is None and config["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
        assert embedding.dtype == torch.bfloat16 and embedding.shape == (VOCAB_SIZE, 128)
        assert torch.equal(embedding, model.wte.weight[:VOCAB_SIZE].bfloat16())
    assert not [name for name in os.listdir(tmp_path) if ".tmp." in name]  # no temp files left behind
    hf_model = load_hf(tmp_path)
    assert hf_model.dtype == torch.bfloat16
    generation = GenerationConfig.from_pretrained(tmp_path)
    bos, assistant_end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    assert generation.bos_token_id == bos and generation.eos_token_id == [assistant_end, bos]
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in os.listdir(tmp_path)}
    assert len(modes) == 5 and set(modes.values()) == {0o666 & ~umask}, modes  # issue 16: the weights were 0600


def test_model_card_reads_the_report_card(tmp_path, tokenizer):
    model, reports = randomized_model(n_kv_head=2), tmp_path / "report"
    reports.mkdir()
    summaries = {"base_train": {"model_tag": "d2", "step": 30, "tokens": 61440},
                 "base_eval": {"model_tag": "d2", "step": 30, "core": 0.01234},
                 "chat_eval_sft": {"model_tag": "d9", "step": 7, "chatcore": 0.5, "tasks": {}}}  # fmt: skip
    for stage, summary in summaries.items():
        (reports / f"{stage}.json").write_text(json.dumps(summary))
    export(model, tokenizer, str(tmp_path / "hf"), card=model_card(model, "sft", "d2", 7, str(reports)))
    card = (tmp_path / "hf" / "README.md").read_text()
    parameters = load_hf(tmp_path / "hf").num_parameters()
    assert "# nanochat d2 (sft, step 7)" in card and "library_name: transformers" in card
    assert "2 layers, width 128, 4 query / 2 key-value heads" in card and f"{parameters:,} parameters" in card
    assert "vocabulary 1000" in card and "context 64 tokens" in card
    assert "- Pretraining tokens: 61,440\n" in card and "- CORE: 0.0123 (step 30)\n" in card
    assert f"- ChatCORE of sft: not recorded (no chat_eval_sft.json for d2 in {reports})" in card  # d9's is not ours

    tasks = {"GSM8K": {"accuracy": 0.25}, "MMLU": {"accuracy": 0.5}}
    (reports / "chat_eval_sft.json").write_text(
        json.dumps({"model_tag": "d2", "step": 7, "chatcore": None, "tasks": tasks})
    )
    (reports / "base_train.json").unlink()
    card = model_card(model, "sft", "d2", 7, str(reports))
    assert (
        "ChatCORE of sft: not reported (it needs all six tasks) (step 7); accuracy: GSM8K 0.2500, MMLU 0.5000" in card
    )
    assert f"Pretraining tokens: not recorded (no base_train.json for d2 in {reports})" in card


# In a fresh interpreter whose path lacks the repository: the export alone must be enough.
LOAD_REMOTE_CODE = """
import importlib.util, sys, torch
from transformers import AutoModelForCausalLM
assert importlib.util.find_spec("nanochat") is None
directory, inputs_path, outputs_path = sys.argv[1:]
model, info = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
assert not any(info.values()), info  # every weight from our file, none left over
inputs, seen = torch.load(inputs_path), []  # seen: the lengths GPT.forward is given, to show the cache at work
gpt_forward = model.gpt.forward
model.gpt.forward = lambda ids, **kwargs: seen.append(ids.size(1)) or gpt_forward(ids, **kwargs)
with torch.no_grad():
    outputs = {"class": type(model).__name__, "logits": [model(ids).logits for ids in inputs["batches"]],
               "loss": model(inputs["batches"][-1], labels=inputs["batches"][-1]).loss}
    first = model(inputs["batches"][-1][:, :40], use_cache=True)  # a prefill in two chunks through the cache
    rest = model(inputs["batches"][-1][:, 40:], past_key_values=first.past_key_values).logits
    outputs["chunked"] = torch.cat([first.logits, rest], dim=1)
    seen.clear()
    outputs["greedy"] = model.generate(inputs["prompt"], max_new_tokens=12, do_sample=False)[0].tolist()
    outputs["seen"] = list(seen)
    try:
        model(inputs["prompt"], attention_mask=torch.ones_like(inputs["prompt"]).index_fill(1, torch.tensor([0]), 0))
    except ValueError as e:
        outputs["padded"] = str(e)
torch.save(outputs, outputs_path)
"""


@pytest.mark.slow  # ~10 s: a subprocess that imports torch and transformers
def test_new_architecture_exports_as_remote_code(tmp_path, tokenizer):
    """Issue 14: a model with every part NanoChat lacks loads with trust_remote_code=True, running our gpt.py,
    and gives our logits, loss and greedy tokens (transformers' generate through its KV cache vs GPT.generate)."""
    model, out_dir = randomized_model(n_kv_head=2, seed=4, **NEW_PARTS), tmp_path / "hf"
    export(model, tokenizer, str(out_dir), card=model_card(model, "sft", "d4", 7, str(tmp_path / "no-reports")))
    files = ["README.md", "config.json", "generation_config.json", "gpt.py", "model.safetensors",
             "modeling_nanochat.py", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    assert sorted(os.listdir(out_dir)) == files
    with open(os.path.join(REPO, "nanochat", "gpt.py"), "rb") as f:
        assert (out_dir / "gpt.py").read_bytes() == f.read()  # the model code exists once
    umask = os.umask(0)
    os.umask(umask)
    assert {os.stat(out_dir / name).st_mode & 0o777 for name in files} == {0o666 & ~umask}
    card = (out_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "Also: value_embeds=True, resid_scalars=True" in card

    generator = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, VOCAB_SIZE, shape, generator=generator) for shape in [(1, 1), (2, 7), (3, 64)]]
    prompt = tokenizer.render_for_completion(CONVERSATIONS[2])
    torch.save({"batches": batches, "prompt": torch.tensor([prompt])}, tmp_path / "inputs.pt")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}  # transformers copies the code there
    command = [sys.executable, "-c", LOAD_REMOTE_CODE, str(out_dir), "inputs.pt", "outputs.pt"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs = torch.load(tmp_path / "outputs.pt")

    assert theirs["class"] == "NanoChatGPTForCausalLM"
    with torch.no_grad():
        for ids, their_logits in zip(batches, theirs["logits"]):
            ours = model(ids)
            assert their_logits.shape == ours.shape and their_logits.dtype == torch.float32
            assert ours.abs().max() > 5  # the comparison means something: logits are far from 0
            assert (ours - their_logits).abs().max().item() <= 1e-4
        assert (model(batches[-1]) - theirs["chunked"]).abs().max().item() <= 1e-4
        targets = torch.nn.functional.pad(batches[-1][:, 1:], (0, 1), value=-1)  # transformers shifts its labels
        assert abs(model(batches[-1], targets=targets).item() - theirs["loss"].item()) <= 1e-4
    ours = list(model.generate(prompt, max_tokens=12, temperature=0))
    generated = theirs["greedy"][len(prompt) :]
    assert len(generated) >= 1 and generated == ours[: len(generated)]  # transformers may stop early at an eos token
    assert theirs["seen"] == [len(prompt)] + [1] * (len(generated) - 1)  # the prompt once, then one token a step
    assert "no padding mask" in theirs["padded"]


# ---------------------------------------------------------------------------- tokenizer


def test_merges_include_every_split_into_two_tokens():
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"bc", b"abc"]
    # "abc" arises from ab+c and from a+bc; tiktoken would merge either pair, so both are rules, after ab and bc.
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")]


def test_tokenizer_encodes_like_ours(tmp_path, tokenizer, wiki_docs):
    export(randomized_model(n_kv_head=4), tokenizer, str(tmp_path))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    bos = tokenizer.get_bos_token_id()
    for text in TEXTS + wiki_docs[200:230]:  # articles the tokenizer was not trained on
        ours = tokenizer.encode(text)
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ours, text[:80]
        assert hf_tokenizer(text)["input_ids"] == [bos] + ours  # documents start with <|bos|>, as in training
        assert hf_tokenizer.decode(ours) == text
    assert [hf_tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS] == [
        tokenizer.encode_special(name) for name in SPECIAL_TOKENS
    ]
    assert hf_tokenizer.eos_token == "<|assistant_end|>" and hf_tokenizer.bos_token == "<|bos|>"


def test_special_token_text_needs_split_special_tokens(tmp_path, tokenizer):
    """Ours never reads a special token out of text; transformers does unless split_special_tokens=True (its
    usual behaviour, also inside chat messages, which are rendered to text before tokenizing)."""
    export(randomized_model(n_kv_head=4), tokenizer, str(tmp_path))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "a <|bos|> b <|assistant_end|> c"
    ours = tokenizer.encode(text)
    assert hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours
    assert tokenizer.get_bos_token_id() in hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_template_renders_our_protocol(tmp_path, tokenizer):
    export(randomized_model(n_kv_head=4), tokenizer, str(tmp_path))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    for conversation in CONVERSATIONS:
        assert chat_ids(hf_tokenizer, conversation, add_generation_prompt=True) == tokenizer.render_for_completion(
            conversation
        )
        finished = conversation + [{"role": "assistant", "content": "Done."}]
        assert chat_ids(hf_tokenizer, finished) == tokenizer.render_conversation(finished)[0]
    for bad in (
        [{"role": "assistant", "content": "I speak first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "alone"}],
    ):
        with pytest.raises(ValueError):  # ours
            tokenizer.render_conversation(bad)
        with pytest.raises(Exception, match="message"):  # jinja2 TemplateError, from our template
            chat_ids(hf_tokenizer, bad, add_generation_prompt=True)


# ---------------------------------------------------------------------------- refusals


def test_unsupported_choices_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(UnsupportedModelError, match="vocab_size"):
        hf_config(GPTConfig(vocab_size=VOCAB_SIZE + 1), tokenizer)
    with pytest.raises(UnsupportedModelError, match="qk_scale=1.2"):  # export() writes such a model as remote code
        hf_config(GPTConfig(vocab_size=VOCAB_SIZE, qk_scale=1.2), tokenizer)
    # init decides how training starts, not what the model computes: still transformers' own NanoChat
    assert hf_config(GPTConfig(vocab_size=VOCAB_SIZE, init="tuned"), tokenizer)["model_type"] == "nanochat"
    assert not os.listdir(tmp_path)  # checks run before anything is written


def test_non_empty_directory_needs_force(tmp_path, tokenizer):
    model = randomized_model(n_kv_head=4)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        export(model, tokenizer, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    (tmp_path / "chat_template.jinja").write_text("stale: transformers would prefer it to ours")
    export(model, tokenizer, str(tmp_path), force=True)
    assert not (tmp_path / "chat_template.jinja").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "config.json").exists()


def test_unwritable_out_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    """Issue 15: these used to end in a traceback after the checkpoint had been loaded."""
    from scripts.export_hf import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "no-checkpoints-here"))  # a load would fail differently
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "hf"):
        with pytest.raises(SystemExit) as refused:
            main(["--source", "sft", "--out", str(out)])
        assert refused.value.code == 1
        assert (
            capsys.readouterr().err
            == f"export_hf: cannot write to {out}: {tmp_path / 'a-file'} is not a writable directory\n"
        )
    if os.geteuid() != 0:  # root writes anywhere, so a read-only directory only refuses other users
        (tmp_path / "read-only").mkdir(mode=0o555)
        with pytest.raises(SystemExit):
            main(["--source", "sft", "--out", str(tmp_path / "read-only" / "hf")])
        assert "is not a writable directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the script


@pytest.mark.slow  # ~10 s: a subprocess that imports torch, then two in-process runs
def test_script_end_to_end(tmp_path, tokenizer, monkeypatch, capsys):
    """A saved sft checkpoint and tokenizer in a base dir -> `python -m scripts.export_hf` -> transformers; the
    script says which format it writes."""
    from nanochat.checkpoint import save_checkpoint
    from scripts.export_hf import main

    base_dir, out_dir = tmp_path / "base", tmp_path / "hf"
    model = randomized_model(n_kv_head=2, seed=3)
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), 7, model)
    tokenizer.save(str(base_dir / "tokenizer"))
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    command = [sys.executable, "-m", "scripts.export_hf", "--source", "sft", "--out", str(out_dir)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step 7" in result.stdout and "export_hf: classic architecture" in result.stdout
    assert "# nanochat d2 (sft, step 7)" in (out_dir / "README.md").read_text()  # no report card here: "not recorded"

    hf_model = load_hf(out_dir)
    ids = torch.tensor([tokenizer.render_for_completion(CONVERSATIONS[2])])
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4

    # A second export into the same directory is refused before any loading, unless --force.
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    with pytest.raises(SystemExit) as refused:
        main(["--source", "sft", "--out", str(out_dir)])
    assert refused.value.code == 1
    main(["--source", "sft", "--model-tag", "d2", "--step", "7", "--out", str(out_dir), "--force"])

    # A new-architecture checkpoint (the largest tag, so the default) becomes remote code; a classic export over it
    # with --force leaves none of that code behind.
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d4"), 9, randomized_model(n_kv_head=2, **NEW_PARTS))
    capsys.readouterr()
    main(["--source", "sft", "--out", str(out_dir), "--force"])
    printed = capsys.readouterr().out
    assert "export_hf: remote code, as transformers' NanoChat has no value_embeds=True, resid_scalars=True" in printed
    assert f"from_pretrained({str(out_dir)!r}, trust_remote_code=True)" in printed
    assert (out_dir / "gpt.py").exists() and "auto_map" in json.loads((out_dir / "config.json").read_text())
    main(["--source", "sft", "--model-tag", "d2", "--out", str(out_dir), "--force"])
    assert not (out_dir / "gpt.py").exists() and not (out_dir / "modeling_nanochat.py").exists()
