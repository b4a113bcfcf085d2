"""transformers remote code around nanochat's own GPT, for models transformers' NanoChat cannot express.

nanochat/hf_export.py writes this file as modeling_nanochat.py beside a verbatim copy of nanochat/gpt.py (which
imports only torch; transformers copies relative imports along with the file), so the model code exists once.

Contract: `AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` give NanoChatGPTConfig
(every GPTConfig field by its own name, plus transformers' keys) and NanoChatGPTForCausalLM, whose forward is
GPT.forward: fp32 logits (B, T, vocab_size), and the loss when `labels` are given. The weights are GPT's state dict
under "gpt.", vocabulary padding rows included.

Not here: a KV cache. generate() recomputes the whole sequence for every new token, as GPT.generate does (cost
quadratic in the length), and a padded batch (an attention_mask with zeros) is refused.
"""

from dataclasses import fields

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .gpt import GPT, GPTConfig


class NanoChatGPTConfig(PretrainedConfig):
    model_type = "nanochat_gpt"  # not "nanochat": that name is transformers' own NanoChatConfig
    attribute_map = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}  # fmt: skip

    def __init__(self, **kwargs):
        defaults = GPTConfig()
        for field in fields(GPTConfig):
            setattr(self, field.name, kwargs.pop(field.name, getattr(defaults, field.name)))
        kwargs.setdefault("tie_word_embeddings", False)  # lm_head and wte are separate matrices
        super().__init__(**kwargs)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(**{field.name: getattr(self, field.name) for field in fields(GPTConfig)})


class NanoChatGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanoChatGPTConfig
    base_model_prefix = "gpt"
    _supports_cache_class = False

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

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # the whole sequence: no KV cache

    def forward(self, input_ids, attention_mask=None, labels=None, logits_to_keep: int = 0, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("nanochat's GPT has no padding mask: pass unpadded sequences (one at a time)")
        logits = self.gpt(input_ids, logits_to_keep=logits_to_keep)  # (B, T, vocab_size) fp32
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here, -100 ignored
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
