"""The GPT: a plain single-device nn.Module.

Architecture: token embedding with RMSNorm right after it, no positional embedding, RoPE and QK-norm on q and
k (bounded attention logits without tuning), grouped-query attention (n_kv_head divides n_head), ReLU² MLP at
4x width (SwiGLU measured no better, dev/LOG.md 2026-11-21), pre-norm blocks, RMSNorm without parameters, no
biases, untied lm_head, logits soft-capped at 15 in fp32, vocab padded to a multiple of 64 inside.

Contract: the model knows nothing of ranks, device types or precision policy. `compute_dtype` (None = the
parameters') is the activations' dtype; Linear layers cast their weights to it, so fp32 master weights can
train in bf16. Distribution, torch.compile and quantization are applied from outside.

KV cache (nanochat/engine.py; rows may sit at different positions): any object with `max_len` (capacity in
positions), `prepare(T)` -> (positions (B, T) int64 of the new tokens, bool mask broadcastable to (B, n_head,
T, S) or None when every key is visible), and `insert_kv(layer_idx, k, v)` -> (k, v) (B, n_kv_head, S,
head_dim): everything the new tokens may attend to, themselves included. It advances after the last layer.
Not here: optimizers, checkpoints, fast generation (`generate` is the slow reference the engine is tested on).
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_DIM = 128  # width per attention head at every depth
ASPECT_RATIO = 64  # width = 64 * depth (nanochat's model-size dial)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    rope_base: float = 10000.0
    logit_softcap: float = 15.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (1 = MQA)")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int = 2048, n_kv_head: int = -1, **kwargs):
        """The single dial: width = 64·depth rounded up to a multiple of 128, one head per 128 dims (n_kv_head -1 =
        as many KV heads as heads)."""
        n_embd = -(-depth * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
        n_head = n_embd // HEAD_DIM
        n_kv_head = n_head if n_kv_head == -1 else n_kv_head
        return cls(sequence_len, vocab_size, depth, n_head, n_kv_head, n_embd, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        """Keys missing from an older checkpoint take today's defaults; unknown keys are an error. Older
        checkpoints name their MLP (mlp="relu2"); the SwiGLU option is gone, so any other value is refused."""
        data = dict(data)
        if data.pop("mlp", "relu2") != "relu2":
            raise ValueError("this checkpoint uses a SwiGLU MLP, which nanochat no longer implements")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)} (checkpoint from a newer nanochat?)")
        return cls(**data)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free linear layer computing in its input's dtype (weights may be fp32)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, T, H, D) by the angles whose cos/sin are (1, T, 1, D/2)."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, n_kv_head, S, head_dim), new tokens included
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU² (Primer, arXiv 2109.08668)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.attn(rms_norm(x), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        """Creates the modules on the current default device; use `GPT.build` to get an initialised model."""
        super().__init__()
        self.config = config
        self.compute_dtype: torch.dtype | None = None
        # _weight skips reset_parameters: its normal_ on the meta device imports torch._dynamo (seconds per process)
        self.wte = nn.Embedding(
            config.padded_vocab_size, config.n_embd, _weight=torch.empty(config.padded_vocab_size, config.n_embd)
        )
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size)
        # RoPE tables for 10x the training context, so generation can run past it. Not saved: recomputed.
        cos, sin = self._rotary_tables(10 * config.sequence_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def build(cls, config: GPTConfig, device: torch.device | str = "cpu") -> "GPT":
        """Constructs on the meta device (no memory, no init work), then materialises once on `device`."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    def _rotary_tables(self, length: int):
        head_dim = self.config.head_dim
        # Computed on the CPU even under GPT.build's meta device: arithmetic on meta tensors imports torch._dynamo
        # (seconds per process), and init_weights recomputes the tables on the real device anyway.
        steps = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        inv_freq = 1.0 / (self.config.rope_base ** (steps / head_dim))
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), inv_freq)  # (T, head_dim/2)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, head_dim/2)

    @torch.no_grad()
    def init_weights(self):
        """Embedding N(0, 1); matrices N(0, std) with std = fan_in^-0.5 · min(1, sqrt(fan_out / fan_in))
        (arXiv 2310.17813); residual output projections and lm_head zero, so every block starts as identity
        and the first logits are uniform."""
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        for module in self.modules():
            if isinstance(module, Linear):
                fan_out, fan_in = module.weight.shape
                std = fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        cos, sin = self._rotary_tables(self.cos.size(1))
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer treatment: block matrices (Muon), embedding and unembedding (AdamW)."""
        return {"matrix": list(self.blocks.parameters()), "embedding": [self.wte.weight],
                "unembedding": [self.lm_head.weight]}  # fmt: skip

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4; the embedding is a
        lookup, not a matmul) plus attention's 12 · layers · heads · head_dim · sequence_len (PaLM, App. B)."""
        c = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep: int = 0):
        """idx (B, T) token ids. Returns the loss when `targets` (B, T; -1 = ignore) is given, else fp32
        logits (B, T, vocab_size), or (B, logits_to_keep, vocab_size) for the last positions only when
        logits_to_keep > 0 (prefill needs one row of logits, not T)."""
        B, T = idx.shape
        dtype = self.compute_dtype or self.wte.weight.dtype
        attn_mask = None
        if kv_cache is None:
            if T > self.cos.size(1):
                raise ValueError(f"sequence of {T} exceeds the RoPE table ({self.cos.size(1)} positions)")
            cos, sin = self.cos[:, :T], self.sin[:, :T]  # (1, T, 1, head_dim/2)
        else:
            if kv_cache.max_len > self.cos.size(1):
                raise ValueError(
                    f"a KV cache of {kv_cache.max_len} positions exceeds the RoPE table ({self.cos.size(1)} positions)"
                )
            positions, attn_mask = kv_cache.prepare(T)  # (B, T): each row continues from its own length
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, head_dim/2)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = rms_norm(self.wte(idx).to(dtype))
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, attn_mask)
        x = rms_norm(x)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)[..., : self.config.vocab_size].float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)  # softcap (Gemma 2): bounded logits, smoother early training
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed=42):
        """Slow reference sampler: recomputes the whole sequence for every new token. Yields token ids."""
        device = self.wte.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self(ids)[:, -1, :]
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None:
                    values, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < values[:, [-1]], float("-inf"))
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
