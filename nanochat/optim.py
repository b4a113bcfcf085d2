"""The house optimizer: Muon for the block matrices, AdamW for the embedding and the unembedding.

One class, `MuonAdamW`, runs in one process and under torch.distributed with the same code: without a process
group the collectives are skipped and each rank owns everything.

Contract:
- Param groups: "params", "kind" ("muon" or "adamw"), "lr", and the kind's hyperparameters (missing ones take
  _GROUP_DEFAULTS). "initial_lr" (default: lr) lets a loop schedule `lr = initial_lr * multiplier`.
- backward (any number of micro-steps), `step()`, `zero_grad(set_to_none=True)`. No DDP wrapper: under a
  process group `step()` averages the gradients itself, so every rank calls it with the same parameters
  (gradients on the same ones; a None grad is skipped).
- State is sharded ZeRO-2 style (as nanochat's DistAdamW/DistMuon): an AdamW tensor whose dim 0 divides by the
  world size is reduce-scattered, updated by slice and all-gathered; Muon matrices of one shape go in chunks of
  world-size matrices, rank r owning the r-th. `state_dict()` is per rank: resume with the same world size.
- Averages are SUM collectives divided by the world size: ReduceOp.AVG reached gloo only in 2025 (pytorch PR
  #149781, silent-correctness report in issue #162338); gloo has reduce_scatter_tensor since torch 2.3.
Not here: schedules, clipping, NorMuon / cautious weight decay (promote them with evidence), fused AdamW.
"""

import functools

import torch
import torch.distributed as dist

from nanochat.common import dist_info

# ---------------------------------------------------------------------------------------------------------------
# Orthogonalization (the "O" in Muon)

# Polar Express (arXiv 2505.16932, Algorithm 1): each step's quintic is minimax-optimal for sign(x) on the
# singular values still in play, fitted for [1e-3, 1]; later steps repeat the last, the classic Newton-Schulz
# (15/8, -10/8, 3/8). These are the paper's own triples (nanochat's HEAD recomputed them with a 2% margin).
_POLAR_EXPRESS_PAPER = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
# The paper's bf16 safety margin (its 4.4): every polynomial but the last is evaluated at x / 1.01, so a singular
# value that rounding pushes past the fitted interval is still mapped near 1.
_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_PAPER[:-1]
) + (_POLAR_EXPRESS_PAPER[-1],)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate polar factor U V^T of `update` (..., rows, cols) = U S V^T, in bf16, same shape.

    After the Frobenius normalisation every singular value is in [0, 1]; each step applies a x + b x^3 + c x^5
    to all of them with matmuls only (tall matrices transposed so the Gram matrix is the small one). After 5
    steps they sit in about [0.84, 1.13] (Keller Jordan's quintic: [0.68, 1.14]; tests/test_optim.py measures).
    """
    schedule = POLAR_EXPRESS_COEFFICIENTS[:steps]
    schedule += (POLAR_EXPRESS_COEFFICIENTS[-1],) * (steps - len(schedule))
    x = update.bfloat16()  # bf16 is accurate enough: Muon needs the direction, not 16 digits (Jordan; 2505.16932)
    transposed = update.size(-2) > update.size(-1)
    if transposed:
        x = x.mT  # (..., cols, rows), now wide
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * _SAFETY + 1e-7)  # the paper divides the norm by 1.01 too
    for a, b, c in schedule:
        gram = x @ x.mT  # (..., short, short)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transposed else x


@functools.cache
def _compiled_orthogonalize():
    """Compiled on first CUDA use (fuses the elementwise work between matmuls); CPU runs stay eager."""
    return torch.compile(orthogonalize, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------
# The two update rules, applied to whatever part of a parameter this rank owns


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """Bias-corrected Adam with decoupled weight decay, op for op as torch.optim.AdamW (single-tensor path)."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] += 1
    step, (beta1, beta2), lr = state["step"], group["betas"], group["lr"]
    if group["weight_decay"] != 0:
        param.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (state["exp_avg_sq"].sqrt() / bias_correction2**0.5).add_(group["eps"])
    param.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)


def muon_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """Momentum (Nesterov by default), orthogonalize, step with the shape-aware scale, decoupled weight decay."""
    if not state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    momentum, lr = group["momentum"], group["lr"]
    buffer = state["momentum_buffer"]
    buffer.lerp_(grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
    update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer  # out of place: grad may be p.grad
    ortho = (_compiled_orthogonalize() if update.device.type == "cuda" else orthogonalize)(update, group["ns_steps"])
    rows, cols = param.shape
    # O's RMS entry is 1/sqrt(max(rows, cols)); sqrt(max(1, rows/cols)) makes the step's lr/sqrt(fan_in) for tall
    # and wide matrices alike (Keller Jordan's Muon, kept by nanochat's muon.py).
    if group["weight_decay"] != 0:
        param.mul_(1 - lr * group["weight_decay"])
    param.add_(ortho.to(param.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Collectives that do nothing without a process group


class _Pending:
    """A launched async collective (or none) and the tensor it fills; `wait()` returns it divided by `divisor`."""

    def __init__(self, result: torch.Tensor, work=None, divisor: int = 1):
        self.result, self.work, self.divisor = result, work, divisor

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.divisor != 1:
            self.result.div_(self.divisor)
        return self.result


def _reduce_scatter_mean(stacked: torch.Tensor, world_size: int) -> _Pending:
    """Rank r receives the mean over ranks of stacked.chunk(world_size)[r] (dim 0; `stacked` at world size 1)."""
    if world_size == 1:
        return _Pending(stacked)
    shard = torch.empty_like(stacked.chunk(world_size)[0])
    work = dist.reduce_scatter_tensor(shard, stacked.contiguous(), op=dist.ReduceOp.SUM, async_op=True)
    return _Pending(shard, work, world_size)


def _all_reduce_mean(tensor: torch.Tensor, world_size: int) -> _Pending:
    """The mean over ranks of `tensor`, into a copy (p.grad stays this rank's own gradient)."""
    if world_size == 1:
        return _Pending(tensor)
    total = tensor.clone()
    return _Pending(total, dist.all_reduce(total, op=dist.ReduceOp.SUM, async_op=True), world_size)


def _all_gather(shard: torch.Tensor, world_size: int) -> _Pending:
    """(world_size, *shard.shape): every rank's `shard`, stacked in rank order."""
    if world_size == 1:
        return _Pending(shard.unsqueeze(0))
    # gloo wants the output concatenated along dim 0 (world_size * rows, ...); NCCL only counts elements.
    gathered = shard.new_empty((world_size * shard.size(0), *shard.shape[1:]))
    work = dist.all_gather_into_tensor(gathered, shard.contiguous(), async_op=True)
    return _Pending(gathered.view(world_size, *shard.shape), work)


# ---------------------------------------------------------------------------------------------------------------
# The optimizer

_GROUP_DEFAULTS = {
    "adamw": {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0},
    "muon": {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.0},
}


class MuonAdamW(torch.optim.Optimizer):
    """Muon and AdamW param groups in one optimizer, on one rank or many (see the module docstring)."""

    def __init__(self, param_groups: list[dict]):
        super().__init__(param_groups, defaults={})

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        kind = group.get("kind")
        if kind not in _GROUP_DEFAULTS:
            raise ValueError(f'param group "kind" must be one of {sorted(_GROUP_DEFAULTS)}, got {kind!r}')
        if "lr" not in group:
            raise ValueError(f"{kind} param group needs an explicit 'lr'")
        allowed = {"params", "kind", "lr", "initial_lr", *_GROUP_DEFAULTS[kind]}
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"{kind} param group got unknown keys {unknown}; allowed: {sorted(allowed)}")
        for key, value in _GROUP_DEFAULTS[kind].items():
            group.setdefault(key, value)
        group.setdefault("initial_lr", group["lr"])
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if kind == "muon":
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"muon orthogonalizes 2-D matrices; got shape {tuple(p.shape)} (use adamw)")
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        rank, _, world_size = dist_info()
        jobs = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                jobs += [self._adamw_job(p, group, rank, world_size) for p in group["params"] if p.grad is not None]
            else:
                jobs += [self._muon_job(chunk, group, rank, world_size) for chunk in _muon_chunks(group, world_size)]
        # Each job is a generator that runs one phase per next(): every reduction goes out before any update
        # waits, so communication overlaps the updates (nanochat's 3-phase step).
        for _phase in range(3):
            for job in jobs:
                next(job, None)
        return loss

    def _adamw_job(self, p: torch.Tensor, group: dict, rank: int, world_size: int):
        # Shard along dim 0 when it divides evenly (NCCL needs equal pieces); else every rank all-reduces and
        # updates the whole tensor: correct, only not memory-sharded (nanochat's shapes are multiples of 64).
        sharded = world_size > 1 and p.size(0) % world_size == 0
        pending_grad = _reduce_scatter_mean(p.grad, world_size) if sharded else _all_reduce_mean(p.grad, world_size)
        yield  # phase 1 done: gradient reduction launched
        owned = p.chunk(world_size)[rank] if sharded else p  # (rows / world_size, ...) view of p, or all of p
        adamw_update(owned, pending_grad.wait(), self.state[p], group)
        if sharded:
            # In place: this rank's slice already sits at its place in p (NCCL documents in-place all-gather).
            gather = dist.all_gather_into_tensor(p, owned, async_op=True)
        yield  # phase 2 done: slice updated, gather launched
        if sharded:
            gather.wait()

    def _muon_job(self, chunk: list[torch.Tensor], group: dict, rank: int, world_size: int):
        # chunk: up to world_size same-shape matrices; rank r owns chunk[r] (ranks past the end own nothing).
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
        if world_size == 1:
            stacked = grads[0].unsqueeze(0)  # (1, rows, cols) view, no copy
        else:
            stacked = grads[0].new_zeros((world_size, *grads[0].shape))  # zero rows pad a short chunk
            for i, grad in enumerate(grads):
                stacked[i].copy_(grad)
        pending_grad = _reduce_scatter_mean(stacked, world_size)  # (1, rows, cols) for this rank
        yield  # phase 1 done
        averaged = pending_grad.wait()[0]
        owned = chunk[rank] if rank < len(chunk) else None
        if owned is not None and owned.grad is not None:
            muon_update(owned, averaged, self.state[owned], group)
        pending_params = _all_gather(owned if owned is not None else torch.zeros_like(chunk[0]), world_size)
        yield  # phase 2 done
        gathered = pending_params.wait()  # (world_size, rows, cols)
        for i, p in enumerate(chunk):
            if i != rank:
                p.copy_(gathered[i])


def _muon_chunks(group: dict, world_size: int) -> list[list[torch.Tensor]]:
    """The group's matrices with gradients, by shape (first-seen order, the same on every rank), in chunks of
    world_size; a chunk is reduced and gathered as one stacked tensor."""
    by_shape: dict[torch.Size, list[torch.Tensor]] = {}
    for p in group["params"]:
        by_shape.setdefault(p.shape, []).append(p)
    chunks = []
    for same_shape in by_shape.values():
        for start in range(0, len(same_shape), world_size):
            chunk = same_shape[start : start + world_size]
            if any(p.grad is not None for p in chunk):
                chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------------------------------------------------------
# nanochat's parameter groups


def build_optimizer(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0) -> MuonAdamW:
    """Muon for the block matrices, AdamW (betas 0.8, 0.95; eps 1e-10) for the embedding and lm_head.

    The AdamW LRs were tuned at width 768 (d12) and scale as 1/sqrt(width) (nanochat gpt.py setup_optimizers);
    Muon's is not scaled: its update has unit spectral norm at any width. `weight_decay` applies to every group.
    """
    roles = model.parameter_roles()
    adamw_lr_scale = (model.config.n_embd / 768) ** -0.5
    adamw = {"kind": "adamw", "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
    return MuonAdamW(
        [
            {**adamw, "params": roles["unembedding"], "lr": unembedding_lr * adamw_lr_scale},
            {**adamw, "params": roles["embedding"], "lr": embedding_lr * adamw_lr_scale},
            {"kind": "muon", "params": roles["matrix"], "lr": matrix_lr, "weight_decay": weight_decay},
        ]
    )
