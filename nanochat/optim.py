"""The house optimizer: Muon for the block matrices, AdamW for the embeddings, lm_head, scalars and gates.

One class, `MuonAdamW`, runs in one process and under torch.distributed with the same code: without a process
group the collectives are skipped and each rank owns everything.

Contract:
- Param groups: "params", "kind" ("muon" or "adamw"), "lr", optional "role" (a name), and the kind's
  hyperparameters (missing ones take _GROUP_DEFAULTS). "initial_lr" and "initial_weight_decay" (default: the
  group's lr / weight_decay) let a loop schedule `lr = initial_lr * m` and `weight_decay = initial_weight_decay
  * m'` each step; so can momentum and beta2 be set. Muon's switches, all off by default (today's Muon) until
  the ablation decides: "beta2" (a float: NorMuon), "cautious_wd", "muoneq", "muon_plus" (see muon_update).
- backward (any number of micro-steps), `step()`, `zero_grad(set_to_none=True)`. No DDP wrapper: under a
  process group `step()` averages the gradients itself, so every rank calls it with the same parameters
  (gradients on the same ones; a None grad is skipped).
- State is sharded ZeRO-2 style (as nanochat's DistAdamW/DistMuon): an AdamW tensor whose dim 0 divides by the
  world size is reduce-scattered, updated by slice and all-gathered; the Muon matrices of one shape are split
  into world-size runs, rank r stepping the r-th run as one stacked batch (one process: all of them).
  `state_dict()` is per rank: resume with the same world size.
- Averages are SUM collectives divided by the world size: ReduceOp.AVG reached gloo only in 2025 (pytorch PR
  #149781, silent-correctness report in issue #162338); gloo has reduce_scatter_tensor since torch 2.3.
Not here: schedules, clipping.
"""

import functools

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as torch_adamw

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
    # bf16 is accurate enough: Muon needs the direction, not 16 digits (Jordan; 2505.16932). On this repo's CPU
    # (AVX512-BF16) bf16 is also 2.2x faster than fp32 (dev/BENCHMARKS.md, "Optimizer").
    x = update.bfloat16().reshape(-1, *update.shape[-2:])  # (batch, rows, cols): baddbmm wants 3-D
    transposed = update.size(-2) > update.size(-1)
    if transposed:
        x = x.mT  # (batch, cols, rows), now wide
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * _SAFETY + 1e-7)  # the paper divides the norm by 1.01 too
    for a, b, c in schedule:
        gram = x @ x.mT  # (batch, short, short)
        # a x + (b gram + c gram^2) x with the scaling and sums inside the matmuls: 10-25% less time on CPU
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if transposed else x).reshape(update.shape)


@functools.cache
def _compiled_orthogonalize():
    """Compiled on first CUDA use (fuses the elementwise work between matmuls); CPU runs stay eager."""
    return torch.compile(orthogonalize, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------
# The two update rules, applied to whatever part of a group this rank owns


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict) -> None:
    """AdamW (bias-corrected, decoupled weight decay) over all of a group's tensors in one call of torch's fused
    kernel (torch.optim.AdamW(fused=True)'s): one pass over memory, no compilation, so a schedule changing lr,
    betas or weight decay every step costs nothing (on this CPU 10x the single-tensor path; dev/BENCHMARKS.md)."""
    for p, state in zip(params, states):
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        step = state.get("step", 0)  # a 0-D float32 tensor on p's device, as the kernel wants; ints predate it
        if not torch.is_tensor(step) or step.device != p.device:
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
    beta1, beta2 = group["betas"]
    torch_adamw(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
        [s["step"] for s in states], fused=True, amsgrad=False, maximize=False, beta1=beta1, beta2=beta2,
        lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
    )  # fmt: skip


def _stacked_state(states: list[dict], key: str, like: torch.Tensor) -> torch.Tensor:
    """(k, ...) stack of one per-matrix state tensor (zeros shaped like `like` where missing)."""
    for state in states:
        if key not in state:
            state[key] = torch.zeros_like(like)
    return torch.stack([state[key] for state in states])


def muon_update(params: list[torch.Tensor], grads: torch.Tensor, states: list[dict], group: dict) -> None:
    """One Muon step for k same-shape matrices, `grads` stacked (k, rows, cols), orthogonalized as one batch.

    Momentum (Nesterov by default) -> [MuonEq] -> orthogonalize -> [Muon+] -> [NorMuon] -> decoupled weight decay
    ([cautious]) and the step with the shape-aware scale. Bracketed stages are off by default (today's Muon); the
    ablation decides which stay. State stays per matrix (checkpoints unchanged), stacked for the step.
    """
    rows, cols = params[0].shape
    momentum, lr, weight_decay = group["momentum"], group["lr"], group["weight_decay"]
    buffer = _stacked_state(states, "momentum_buffer", grads[0])
    buffer.lerp_(grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
    torch._foreach_copy_([s["momentum_buffer"] for s in states], list(buffer.unbind(0)))
    update = grads.lerp_(buffer, momentum) if group["nesterov"] else buffer  # grads is this step's own stack
    if group["muoneq"]:
        # MuonEq, its R variant (arXiv 2603.28254, the paper's default for hidden weights): every row of the
        # momentum to unit norm before the polar iteration, a cheap stand-in for whitening that evens out the
        # spectrum the finite iteration sees (orthogonalize's Frobenius normalization sets the overall scale).
        update = update / update.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    orthogonal = (_compiled_orthogonalize() if update.device.type == "cuda" else orthogonalize)(
        update, group["ns_steps"]
    ).to(grads.dtype)
    if group["muon_plus"]:
        # Muon+ as karpathy/nanochat (92d63d4, nanochat/optim.py) has it: the Frobenius norm to sqrt(min(rows,
        # cols)), a semi-orthogonal matrix's, undoing the iteration's under- or overshoot (Polar Express leaves
        # singular values in about [0.84, 1.13]). The paper (arXiv 2602.21545) normalizes columns and/or rows
        # instead (its code's norm_mode col / row / col_row / row_col); that variant is not built here.
        orthogonal *= min(rows, cols) ** 0.5 / orthogonal.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if group["beta2"] is not None:
        # NorMuon (arXiv 2510.05491): an EMA of each row's mean square of the orthogonalized update, the row
        # scaled by its inverse root, then the whole update rescaled to its norm before (the lr keeps its
        # meaning). Rows of the long side: the short side's vectors of an orthogonal update are orthonormal
        # already. The EMA starts at zero without bias correction: a uniform factor, undone by the rescale.
        short_dim = -1 if rows >= cols else -2
        second_moment = _stacked_state(states, "second_moment", orthogonal[0].mean(short_dim, keepdim=True))
        second_moment.lerp_(orthogonal.square().mean(short_dim, keepdim=True), 1 - group["beta2"])
        torch._foreach_copy_([s["second_moment"] for s in states], list(second_moment.unbind(0)))
        norm = orthogonal.norm(dim=(-2, -1), keepdim=True)
        orthogonal *= second_moment.clamp_min(1e-20).rsqrt()
        orthogonal *= norm / orthogonal.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-20)
    stacked = torch.stack(params)
    if weight_decay != 0 and group["cautious_wd"]:
        # Cautious weight decay (arXiv 2510.12402): decay only where the step -lr * O moves the weight toward
        # zero anyway, i.e. where O and the weight have the same sign.
        stacked.addcmul_(stacked, (orthogonal * stacked >= 0).to(stacked.dtype), value=-lr * weight_decay)
    elif weight_decay != 0:
        stacked.mul_(1 - lr * weight_decay)
    # O's RMS entry is 1/sqrt(max(rows, cols)); sqrt(max(1, rows/cols)) makes the step's lr/sqrt(fan_in) for tall
    # and wide matrices alike (Keller Jordan's Muon, kept by nanochat's muon.py).
    stacked.add_(orthogonal.to(stacked.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)
    torch._foreach_copy_(params, list(stacked.unbind(0)))


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
    # beta2 None: no NorMuon; cautious_wd / muoneq / muon_plus False: plain Muon (see muon_update)
    "muon": {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "weight_decay": 0.0, "beta2": None,
             "cautious_wd": False, "muoneq": False, "muon_plus": False},
}  # fmt: skip


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
        allowed = {"params", "kind", "role", "lr", "initial_lr", "initial_weight_decay", *_GROUP_DEFAULTS[kind]}
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise ValueError(f"{kind} param group got unknown keys {unknown}; allowed: {sorted(allowed)}")
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if kind == "muon":
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"muon orthogonalizes 2-D matrices; got shape {tuple(p.shape)} (use adamw)")
        super().add_param_group(_with_defaults(group))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # load_state_dict comes here too: groups saved before a key existed get it
        self.param_groups = [_with_defaults(group) for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        rank, _, world_size = dist_info()
        jobs = []
        for group in self.param_groups:
            if group["kind"] == "adamw":
                jobs.append(self._adamw_job(group, rank, world_size))
            else:
                jobs += [self._muon_job(same, group, rank, world_size) for same in _by_shape(group["params"])]
        # Each job is a generator that runs one phase per next(): every reduction goes out before any update
        # waits, so communication overlaps the updates (nanochat's 3-phase step).
        for _phase in range(3):
            for job in jobs:
                next(job, None)
        return loss

    def _adamw_job(self, group: dict, rank: int, world_size: int):
        # Shard along dim 0 when it divides evenly (NCCL needs equal pieces); else (scalars included) every rank
        # all-reduces and updates the whole tensor: correct, only not memory-sharded.
        params = [p for p in group["params"] if p.grad is not None]
        sharded = [world_size > 1 and p.dim() > 0 and p.size(0) % world_size == 0 for p in params]
        reduce = {True: _reduce_scatter_mean, False: _all_reduce_mean}
        pending = [reduce[s](p.grad, world_size) for p, s in zip(params, sharded)]
        yield  # phase 1 done: gradient reductions launched
        owned = [p.chunk(world_size)[rank] if s else p for p, s in zip(params, sharded)]  # views of p
        if params:
            adamw_update(owned, [x.wait() for x in pending], [self.state[p] for p in params], group)
        # In place: this rank's slice already sits at its place in p (NCCL documents in-place all-gather).
        gathers = [dist.all_gather_into_tensor(p, o, async_op=True) for p, o, s in zip(params, owned, sharded) if s]
        yield  # phase 2 done: slices updated, gathers launched
        for gather in gathers:
            gather.wait()

    def _muon_job(self, same_shape: list[torch.Tensor], group: dict, rank: int, world_size: int):
        # Rank r owns the r-th run of `per_rank` matrices and steps them as one (per_rank, rows, cols) batch; one
        # process owns them all. Zero matrices pad the stack to world_size * per_rank.
        per_rank = -(-len(same_shape) // world_size)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in same_shape]
        if world_size == 1:
            stacked = torch.stack(grads)  # a copy: the step may work in it
        else:
            stacked = torch.cat(
                [torch.stack(grads), grads[0].new_zeros((world_size * per_rank - len(grads), *grads[0].shape))]
            )
        pending_grads = _reduce_scatter_mean(stacked, world_size)  # (per_rank, rows, cols) for this rank
        yield  # phase 1 done
        mine = pending_grads.wait()
        owned = same_shape[rank * per_rank : (rank + 1) * per_rank]
        active = [i for i, p in enumerate(owned) if p.grad is not None]
        if active:
            grads = mine if len(active) == len(mine) else mine[active]
            muon_update([owned[i] for i in active], grads, [self.state[owned[i]] for i in active], group)
        if world_size > 1:
            shard = torch.zeros_like(mine)
            for row, p in zip(shard, owned):  # ranks past the end send zeros
                row.copy_(p)
            pending_params = _all_gather(shard, world_size)
        yield  # phase 2 done
        if world_size > 1:
            gathered = pending_params.wait().flatten(0, 1)  # (world_size * per_rank, rows, cols)
            for i, p in enumerate(same_shape):
                if i // per_rank != rank:
                    p.copy_(gathered[i])


def _with_defaults(group: dict) -> dict:
    """The group with its kind's missing keys; "initial_lr" / "initial_weight_decay" default to the current values
    (a loop schedules `lr = initial_lr * m` and `weight_decay = initial_weight_decay * m'`)."""
    group = {**_GROUP_DEFAULTS[group["kind"]], **group}
    group.setdefault("initial_lr", group["lr"])
    group.setdefault("initial_weight_decay", group["weight_decay"])
    return group


def _by_shape(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The matrices grouped by shape, in first-seen order (the same on every rank), those with no gradient at all
    left out."""
    by_shape: dict[torch.Size, list[torch.Tensor]] = {}
    for p in params:
        by_shape.setdefault(p.shape, []).append(p)
    return [same for same in by_shape.values() if any(p.grad is not None for p in same)]


# ---------------------------------------------------------------------------------------------------------------
# nanochat's parameter groups


# AdamW roles besides the embedding and lm_head, whose LRs are arguments: (lr, betas, lr scales as 1/sqrt(width),
# decays with `weight_decay`), as karpathy/nanochat's GPT.setup_optimizers at HEAD (92d63d4).
_ADAMW_ROLES = {
    "value_embedding": (0.15, (0.8, 0.995), True, True),  # 2-D tables, trained like the embedding
    "resid_scalars": (0.005, (0.8, 0.95), False, False),  # 1-D per-layer residual lambdas
    "x0_scalars": (0.5, (0.96, 0.95), False, False),  # 1-D per-layer x0 lambdas
    "gates": (0.2, (0.8, 0.95), False, False),  # small gate matrices and scalar lambdas (smear, backout)
}


def build_optimizer(
    model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.0, lr_frac=1.0, muon_options=None
) -> MuonAdamW:
    """Muon for the block matrices, AdamW (eps 1e-10) for the rest: one group per non-empty role of
    model.parameter_roles(), each group's "role" naming it.

    The AdamW LRs were tuned at width 768 (d12) and scale as 1/sqrt(width) (nanochat gpt.py setup_optimizers);
    Muon's is not scaled: its update has unit spectral norm at any width. `weight_decay` applies to the matrices,
    the embeddings and lm_head, not to scalars and gates. `lr_frac` multiplies every group's LR (the roles
    without an LR argument too). `muon_options` go into the Muon group as they are (e.g. {"beta2": 0.95,
    "cautious_wd": True}). A role this function does not know is an error: it would go untrained.
    """
    roles = {role: list(params) for role, params in model.parameter_roles().items()}
    unknown = sorted(set(roles) - {"matrix", "embedding", "unembedding", *_ADAMW_ROLES})
    if unknown:
        raise ValueError(f"build_optimizer has no group for parameter roles {unknown}: add them to optim._ADAMW_ROLES")
    width_scale = (model.config.n_embd / 768) ** -0.5
    specs = {"unembedding": (unembedding_lr, (0.8, 0.95), True, True), "embedding": (embedding_lr, (0.8, 0.95), True,
             True), "matrix": None, **_ADAMW_ROLES}  # fmt: skip
    groups = []
    for role, spec in specs.items():
        if not roles.get(role):
            continue
        if spec is None:
            groups.append({"kind": "muon", "role": role, "params": roles[role], "lr": matrix_lr * lr_frac,
                           "weight_decay": weight_decay, **(muon_options or {})})  # fmt: skip
            continue
        lr, betas, scaled, decays = spec
        groups.append({"kind": "adamw", "role": role, "params": roles[role], "betas": betas, "eps": 1e-10,
                       "lr": lr * lr_frac * (width_scale if scaled else 1.0),
                       "weight_decay": weight_decay if decays else 0.0})  # fmt: skip
    return MuonAdamW(groups)
