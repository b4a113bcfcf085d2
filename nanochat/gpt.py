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
    # Parts from the reference's 2026 recipe (karpathy/nanochat dev/LOG.md). The defaults are the classic model, so
    # older checkpoints load unchanged; scripts/base_train.py decides what a new model uses.
    value_embeds: bool = False  # a token embedding added to the values of alternating layers, the last included
    resid_scalars: bool = False  # x = resid_lambda[i] * x + x0_lambda[i] * x0 before every block
    window_pattern: str = "L"  # per layer, tiled, the last layer always L: L = full causal, S = short_window keys
    short_window: int = 0  # keys a token sees in an S layer (itself included); 0 only with an all-L pattern
    backout: bool = False  # subtract backout_lambda x the residual at n_layer // 2 from the final stream
    qk_scale: float = 1.0  # q and k are each multiplied by this after QK-norm (nanochat autoresearch: 1.2)
    init: str = "classic"  # weight initialisation: classic (arXiv 2310.17813) or tuned (nanochat autoresearch)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (1 = MQA)")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for RoPE")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be letters S (short) and L (long)")
        if "S" in self.window_pattern and self.short_window < 1:
            raise ValueError("an S in window_pattern needs short_window >= 1")
        if self.init not in ("classic", "tuned"):
            raise ValueError(f"init must be classic or tuned, got {self.init!r}")

    def layer_window(self, layer_idx: int) -> int | None:
        """Keys a token at layer `layer_idx` may see (itself included); None = every earlier key."""
        letter = self.window_pattern[layer_idx % len(self.window_pattern)]
        return self.short_window if letter == "S" and layer_idx < self.n_layer - 1 else None

    def has_value_embed(self, layer_idx: int) -> bool:
        """Alternating layers counted from the last, so the last layer always has one (nanochat HEAD)."""
        return self.value_embeds and (self.n_layer - 1 - layer_idx) % 2 == 0

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


VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block's input (nanochat HEAD)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.layer_window(layer_idx)
        # QK-norm fixes |q| = |k| = sqrt(head_dim); qk_scale on both multiplies every logit by qk_scale^2
        self.scale = config.qk_scale**2 / math.sqrt(config.head_dim)
        self.c_q = Linear(config.n_embd, config.n_head * config.head_dim)
        self.c_k = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_v = Linear(config.n_embd, config.n_kv_head * config.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        # one gate per KV head decides how much of the token's value embedding joins its values (ResFormer,
        # arXiv 2410.17897; gated per head as in nanochat HEAD)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head) if config.has_value_embed(layer_idx) else None

    def forward(self, x, ve, cos, sin, masks, kv_cache=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, n_kv_head, S, head_dim), new tokens included
        mask = masks.get(self.window, k.size(2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and kv_cache is None,
                                           scale=self.scale, enable_gqa=self.n_kv_head != self.n_head)  # fmt: skip
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class AttentionMasks:
    """The boolean masks (True = may attend) of one forward pass, made once per window size and key count.

    Without a cache, queries and keys are positions 0..T-1; with one, query positions come from the cache and key
    j is position j, and the cache's own mask (rows at different lengths) is kept. A window w keeps key j for the
    query at p iff p - w < j <= p: a token never sees further back than its window, in training and decoding alike.
    None means plain causal attention (or every key visible, as the cache reports it).
    """

    def __init__(self, positions: torch.Tensor, cache_mask: torch.Tensor | None):
        self.positions, self.cache_mask = positions, cache_mask  # (B or 1, T); (B, 1, T, S) or None
        self._made = {}

    def get(self, window: int | None, num_keys: int) -> torch.Tensor | None:
        if window is None:
            return self.cache_mask
        key = (window, num_keys)
        if key not in self._made:
            keys = torch.arange(num_keys, device=self.positions.device)
            distance = self.positions[:, None, :, None] - keys  # (B, 1, T, S)
            mask = (distance >= 0) & (distance < window)
            self._made[key] = mask if self.cache_mask is None else mask & self.cache_mask
        return self._made[key]


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

    def forward(self, x, ve, cos, sin, masks, kv_cache=None):
        x = x + self.attn(rms_norm(x), ve, cos, sin, masks, kv_cache)
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
        ve_shape = (config.padded_vocab_size, config.n_kv_head * config.head_dim)
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(*ve_shape, _weight=torch.empty(ve_shape))
            for i in range(config.n_layer) if config.has_value_embed(i)
        })  # fmt: skip
        if config.resid_scalars:  # per-layer weights of the stream and of the first layer's input x0
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.empty(()))
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
        """classic: embedding N(0, 1); matrices N(0, std) with std = fan_in^-0.5 · min(1, sqrt(fan_out / fan_in))
        (arXiv 2310.17813); lm_head zero. tuned (nanochat autoresearch rounds 1-2, 2026): embedding N(0, 0.8),
        lm_head N(0, 0.001), matrices U(±sqrt(3 / n_embd)), c_fc at 0.4x that. Both: residual output projections
        zero, so every block starts as the identity; value embeddings U(±sqrt(3 / n_embd)), gates U(0, 0.02);
        residual scalars ramp over depth, 1.15 -> 1.05 on the stream and 0.20 -> 0.05 on x0; backout 0.2."""
        c = self.config
        tuned = c.init == "tuned"
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8 if tuned else 1.0)
        bound = math.sqrt(3 / c.n_embd)  # uniform with std 1 / sqrt(n_embd)
        for module in self.modules():
            if isinstance(module, Linear):
                fan_out, fan_in = module.weight.shape
                if tuned:
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=fan_in**-0.5 * min(1.0, math.sqrt(fan_out / fan_in)))
        for block in self.blocks:
            if tuned:
                nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)
        if tuned:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        else:
            nn.init.zeros_(self.lm_head.weight)
        if c.resid_scalars:
            self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, c.n_layer))
            self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, c.n_layer))
        if c.backout:
            self.backout_lambda.fill_(0.2)
        cos, sin = self._rotary_tables(self.cos.size(1))
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def parameter_roles(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer treatment (nanochat/optim.py): block matrices (Muon); the rest AdamW, each role
        with its own LR. A role is absent when its part is off."""
        gates = [block.attn.ve_gate.weight for block in self.blocks if block.attn.ve_gate is not None]
        gate_ids = {id(p) for p in gates}
        roles = {"matrix": [p for p in self.blocks.parameters() if id(p) not in gate_ids],
                 "embedding": [self.wte.weight], "unembedding": [self.lm_head.weight]}  # fmt: skip
        if self.value_embeds:
            roles["value_embedding"] = [table.weight for table in self.value_embeds.values()]
        if self.config.resid_scalars:
            roles["resid_scalars"], roles["x0_scalars"] = [self.resid_lambdas], [self.x0_lambdas]
        gates += [self.backout_lambda] if self.config.backout else []
        if gates:
            roles["gates"] = gates
        return roles

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per weight of every matmul (forward 2, backward 4; the embedding is a
        lookup, not a matmul) plus attention's 12 · layers · heads · head_dim · sequence_len (PaLM, App. B)."""
        c = self.config
        lookups = self.wte.weight.numel() + sum(table.weight.numel() for table in self.value_embeds.values())
        # a windowed layer's query sees at most its window (full-width attention FLOPs counted, as a dense kernel does)
        seen = sum(min(c.layer_window(i) or c.sequence_len, c.sequence_len) for i in range(c.n_layer))
        return 6 * (self.num_params() - lookups) + 12 * c.n_head * c.head_dim * seen

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_to_keep: int = 0):
        """idx (B, T) token ids. Returns the loss when `targets` (B, T; -1 = ignore) is given, else fp32
        logits (B, T, vocab_size), or (B, logits_to_keep, vocab_size) for the last positions only when
        logits_to_keep > 0 (prefill needs one row of logits, not T)."""
        B, T = idx.shape
        c = self.config
        dtype = self.compute_dtype or self.wte.weight.dtype
        if kv_cache is None:
            if T > self.cos.size(1):
                raise ValueError(f"sequence of {T} exceeds the RoPE table ({self.cos.size(1)} positions)")
            cos, sin = self.cos[:, :T], self.sin[:, :T]  # (1, T, 1, head_dim/2)
            masks = AttentionMasks(torch.arange(T, device=idx.device)[None], None)
        else:
            if kv_cache.max_len > self.cos.size(1):
                raise ValueError(
                    f"a KV cache of {kv_cache.max_len} positions exceeds the RoPE table ({self.cos.size(1)} positions)"
                )
            positions, cache_mask = kv_cache.prepare(T)  # (B, T): each row continues from its own length
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, head_dim/2)
            masks = AttentionMasks(positions, cache_mask)
        cos, sin = cos.to(dtype), sin.to(dtype)
        x = x0 = rms_norm(self.wte(idx).to(dtype))
        skipped = None
        for i, block in enumerate(self.blocks):
            if c.resid_scalars:
                x = self.resid_lambdas[i].to(dtype) * x + self.x0_lambdas[i].to(dtype) * x0
            ve = self.value_embeds[str(i)](idx).to(dtype) if c.has_value_embed(i) else None
            x = block(x, ve, cos, sin, masks, kv_cache)
            if c.backout and i == c.n_layer // 2 - 1:
                skipped = x  # the stream halfway up; part of it is taken out at the end (nanochat HEAD "backout")
        if skipped is not None:
            x = x - self.backout_lambda.to(dtype) * skipped
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
