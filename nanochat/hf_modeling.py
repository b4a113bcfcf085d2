"""transformers remote code around nanochat's own GPT, for models transformers' NanoChat cannot express.

nanochat/hf_export.py writes this file as modeling_nanochat.py beside a verbatim copy of nanochat/gpt.py (which
imports only torch; transformers copies relative imports along with the file), so the model code exists once.

Contract: `AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` give NanoChatGPTConfig
(every GPTConfig field by its own name, plus transformers' keys) and NanoChatGPTForCausalLM, whose forward is
GPT.forward: fp32 logits (B, T, vocab_size), and the loss when `labels` are given. The weights are GPT's state dict
under "gpt.", vocabulary padding rows included. generate() keeps keys and values in transformers' DynamicCache,
which GPT reads through its own KV cache interface (CacheView).

Not here: padded batches (an attention_mask with zeros is refused: every row must be as long as the others).
"""

from dataclasses import fields

import torch
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .gpt import GPT, GPTConfig


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"  # not "nanochat": that name is transformers' own NanoChatConfig
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}  # fmt: skip

    def __init__(self, **kwargs):
        for field in fields(GPTConfig):
            setattr(self, field.name, kwargs.pop(field.name, field.default))
        kwargs.setdefault("tie_word_embeddings", False)  # lm_head and wte are separate matrices
        super().__init__(**kwargs)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**{field.name: getattr(self, field.name) for field in fields(GPTConfig)})


class CacheView:
    """GPT's KV cache interface (nanochat/gpt.py) over a transformers Cache: every row at the same length."""

    def __init__(self, cache, max_len: int, device: torch.device):
        self.cache, self.max_len, self.device = cache, max_len, device

    def prepare(self, T: int):
        start = self.cache.get_seq_length()
        if start + T > self.max_len:
            raise ValueError(f"{start + T} positions exceed the RoPE table of {self.max_len}")
        positions = torch.arange(start, start + T, device=self.device)[None]  # (1, T)
        # the new token at p sees keys 0..p; a single new token sees every key (None)
        keys = torch.arange(start + T, device=self.device)
        mask = None if T == 1 else (keys <= positions[..., None])[:, None]  # (1, 1, T, S)
        return positions, mask

    def insert_kv(self, layer_idx: int, k, v):
        return self.cache.update(k, v, layer_idx)


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "gpt"

    def __init__(self, config: NanoChatGPTConfig):
        super().__init__(config)
        self.gpt = GPT(config.gpt_config())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """Every weight comes from model.safetensors; only the RoPE tables, which are not saved, are left empty by
        transformers' loading, and are recomputed here."""
        if isinstance(module, GPT):
            cos, sin = module._rotary_tables(module.cos.size(1))
            module.cos.copy_(cos)
            module.sin.copy_(sin)

    def get_input_embeddings(self):
        return self.gpt.wte

    def get_output_embeddings(self):
        return self.gpt.lm_head

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        if past_key_values is not None:  # only the tokens the cache has not seen
            input_ids = input_ids[:, past_key_values.get_seq_length() :]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache"), "logits_to_keep": kwargs.get("logits_to_keep", 0)}  # fmt: skip

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                logits_to_keep: int = 0, **kwargs):  # fmt: skip
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nanochat's GPT has no padding mask: pass unpadded sequences (one at a time)")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = None if past_key_values is None else CacheView(past_key_values, self.gpt.cos.size(1), input_ids.device)
        logits = self.gpt(input_ids, kv_cache=cache, logits_to_keep=logits_to_keep)  # (B, T, vocab_size) fp32
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here, -100 ignored
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)
