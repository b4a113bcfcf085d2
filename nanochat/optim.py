"""The house optimizer: Muon for the block matrices, AdamW for the embedding and the unembedding.

One class, `MuonAdamW`, runs in one process and under torch.distributed with the same code: every step runs
three phases over a list of jobs (launch gradient reductions; wait for each, update the part this rank owns,
launch the parameter gather; wait for the gathers). Without a process group the collectives are skipped and
each job owns everything, so the single-process run is the distributed algorithm at world size 1.

Contract:
- Param groups are dicts with "params", "kind" ("muon" or "adamw"), "lr", and the kind's hyperparameters
  (AdamW: betas, eps, weight_decay; Muon: momentum, nesterov, ns_steps, weight_decay); missing
  ones take the defaults below. "initial_lr" is stored (default: lr) so a training loop schedules
  `group["lr"] = group["initial_lr"] * multiplier`; Muon's momentum is likewise set from outside.
- The training loop runs backward (any number of accumulation micro-steps), then `step()`, then
  `zero_grad(set_to_none=True)`. There is no DDP wrapper: under a process group `step()` averages the gradients
  across ranks itself, so every rank must call it, and every rank must hold the same parameters, in the same
  order, with gradients on the same ones (true for data-parallel copies of one model). A parameter whose grad is
  None is skipped.
- Work and state are sharded (ZeRO-2 style, as nanochat's DistAdamW/DistMuon): an AdamW parameter whose dim 0
  divides by the world size is reduce-scattered along dim 0, each rank updates its slice with Adam state for that
  slice, and the slices are all-gathered; Muon matrices of one shape go in chunks of world-size matrices, rank r
  owns the r-th of each chunk (receives its averaged gradient, keeps its momentum, computes its update), and
  the updated matrices are all-gathered. `state_dict()` is therefore per rank (save one file per rank) and a
  resumed run must use the same world size.
- Averages are SUM collectives divided by the world size: ReduceOp.AVG reached gloo only in 2025 (pytorch PR
  #149781) and has a silent-correctness report there (pytorch issue #162338). gloo has reduce_scatter_tensor
  since torch 2.3 (pytorch PR #118911, emulated as all-reduce + slice), so gloo and NCCL run the same calls.

Not here: learning-rate or momentum schedules, gradient clipping, NorMuon / cautious weight decay and the
other later nanochat refinements (promote them with evidence), fused or compiled AdamW.
"""

import functools

import torch
import torch.distributed as dist

from nanochat.common import dist_info

# ---------------------------------------------------------------------------------------------------------------
# Orthogonalization (the "O" in Muon)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, Algorithm 1): the degree-5 polynomial of
# each iteration is minimax-optimal for sign(x) on the singular values that iteration can still see, so five
# steps land much closer to the polar factor than a fixed polynomial. The paper lists eight (a, b, c) fitted for
# singular values in [1e-3, 1]; later steps repeat the last one, (15/8, -10/8, 3/8), the classic quintic
# Newton-Schulz that converges to 1. (modded-nanogpt and nanochat's HEAD use a set recomputed with a 2% margin,
# first triple (8.1566, -22.483, 15.879); these are the paper's own.)
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
# The paper's bf16 safety margin (its Section 4.4): every polynomial but the last is evaluated at x / 1.01
# (a / 1.01, b / 1.01^3, c / 1.01^5), so a singular value that rounding pushes slightly past the top of the
# fitted interval is still mapped near 1 instead of being blown up.
_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_PAPER[:-1]
) + (_POLAR_EXPRESS_PAPER[-1],)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate polar factor U V^T of `update` (..., rows, cols) = U S V^T, in bf16, same shape.

    Normalizing by the Frobenius norm puts every singular value in [0, 1]; each step then applies the odd
    polynomial a x + b x^3 + c x^5 to all singular values at once using only matmuls. Tall matrices are
    transposed first so the Gram matrix X X^T is the small (min(rows, cols))^2 one. After 5 steps the singular
    values above 1e-3 of the largest sit in about [0.84, 1.13]. (Keller Jordan's quintic, which this replaced,
    leaves them in [0.68, 1.14] and twice as far from the polar factor: tests/test_optim.py measures both.)
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
    """Built on first CUDA use: compiling fuses the elementwise work between matmuls; CPU runs stay eager (tests
    must start fast) and importing this module compiles nothing."""
    return torch.compile(orthogonalize, dynamic=False)


def _orthogonalize_on_device(update: torch.Tensor, steps: int) -> torch.Tensor:
    fn = _compiled_orthogonalize() if update.device.type == "cuda" else orthogonalize
    return fn(update, steps)


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
    ortho = _orthogonalize_on_device(update, group["ns_steps"])
    rows, cols = param.shape
    # O has min(rows, cols) unit singular values, so its RMS entry is 1/sqrt(max(rows, cols)); the factor
    # sqrt(max(1, rows/cols)) makes the step's RMS entry lr/sqrt(cols) = lr/sqrt(fan_in) for tall and wide
    # matrices alike (Keller Jordan's Muon, kept by nanochat's muon.py).
    if group["weight_decay"] != 0:
        param.mul_(1 - lr * group["weight_decay"])
    param.add_(ortho.to(param.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Collectives that do nothing without a process group


class _Pending:
    """A launched async collective (or none) and the tensor it fills; `wait()` returns that tensor, divided by
    `divisor` to turn a SUM into a mean."""

    def __init__(self, result: torch.Tensor, work=None, divisor: int = 1):
        self.result, self.work, self.divisor = result, work, divisor

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        if self.divisor != 1:
            self.result.div_(self.divisor)
        return self.result


def _reduce_scatter_mean(stacked: torch.Tensor, world_size: int) -> _Pending:
    """Rank r receives the mean over ranks of stacked.chunk(world_size)[r] (dim 0; a new tensor). At world size 1
    that chunk is `stacked` itself."""
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, _, world_size = dist_info()
        jobs = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                jobs += [self._adamw_job(p, group, rank, world_size) for p in group["params"] if p.grad is not None]
            else:
                jobs += [self._muon_job(chunk, group, rank, world_size) for chunk in _muon_chunks(group, world_size)]
        # Each job is a generator that runs one phase per next(): all reductions go out before any update waits,
        # so communication of later parameters overlaps the updates of earlier ones (nanochat's 3-phase step).
        for _phase in range(3):
            for job in jobs:
                next(job, None)
        return loss

    def _adamw_job(self, p: torch.Tensor, group: dict, rank: int, world_size: int):
        # Shard along dim 0 when it divides evenly (NCCL's reduce-scatter and all-gather need equal pieces).
        # Otherwise (and at world size 1) every rank all-reduces the full gradient and runs the full update with
        # a full copy of the state: correct, only not memory-sharded; nanochat's shapes are multiples of 64.
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
    """The group's matrices that have gradients, grouped by shape (first-seen order, identical on every rank)
    and cut into chunks of world_size; a chunk is reduced and gathered as one stacked tensor."""
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


def build_optimizer(
    model,
    matrix_lr: float = 0.02,
    embedding_lr: float = 0.2,
    unembedding_lr: float = 0.004,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    adam_eps: float = 1e-10,
    muon_momentum: float = 0.95,
) -> MuonAdamW:
    """Muon for the block matrices, AdamW for the embedding and lm_head (nanochat's setup_optimizers).

    The AdamW learning rates were tuned at width 768 (d12) and scale as 1/sqrt(width): lr = base * (n_embd /
    768) ** -0.5 (nanochat gpt.py setup_optimizers; reference notes 1.6). Muon's lr is not scaled: its update
    already has unit spectral norm whatever the width. `weight_decay` applies to every group (0 by default, as
    nanochat's base run).
    """
    roles = model.parameter_roles()
    adamw_lr_scale = (model.config.n_embd / 768) ** -0.5
    adamw = {"kind": "adamw", "betas": adam_betas, "eps": adam_eps, "weight_decay": weight_decay}
    return MuonAdamW(
        [
            {**adamw, "params": roles["unembedding"], "lr": unembedding_lr * adamw_lr_scale},
            {**adamw, "params": roles["embedding"], "lr": embedding_lr * adamw_lr_scale},
            {
                "kind": "muon",
                "params": roles["matrix"],
                "lr": matrix_lr,
                "momentum": muon_momentum,
                "weight_decay": weight_decay,
            },
        ]
    )
