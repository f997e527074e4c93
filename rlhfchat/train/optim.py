"""The PPO update's optimizer: torch's AdamW (fused, with the gradient clip folded into it, where it can be; on float32
master copies of 16-bit weights), the gradient's norm taken while the backward finishes each gradient, and the
optimizer's state whole and by parameter name for checkpoints.

    optimizer = adamw(params, accelerator, lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-6)
    norms = GradNorms(params)               # one process: hooks record each finished gradient's squared norm
    norms.start()                           # before the minibatch's last backward
    norm = clip_and_step(optimizer, params, max_norm, accelerator, norms)
    weights, moments, step = full_state(optimizer, named_params)       # any layout: DeepSpeed ZeRO, DDP, one process
    load_full_state(optimizer, named_params, weights, moments, step)   # on any other layout

The norm is what `clip_grad_norm_` returns and the step what it then does, without its two passes over every gradient
(one to take the norm, one to scale the gradients). Under DeepSpeed the engine has clipped and stepped already in the
minibatch's last backward (distributed.configure_deepspeed); clip_and_step then only reads its norm.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhfchat.errors import RlhfchatError

MOMENTS = ("exp_avg", "exp_avg_sq")


def fused_supported(accelerator: Any) -> bool:
    """Whether the fused AdamW kernel runs here: a CPU or a CUDA GPU, one process or DDP (not DeepSpeed, not FSDP)."""
    return accelerator.device.type in ("cpu", "cuda") and accelerator.distributed_type.value in (
        "NO", "MULTI_GPU", "MULTI_CPU")


def adamw(params: Sequence[torch.Tensor], accelerator: Any, **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW, fused where it can be: one pass over each tensor instead of a dozen (a tenth of a CPU step).

    16-bit parameters on one process or under DDP (`base.dtype: bfloat16`) get float32 master copies
    (MasterWeightAdamW): at PPO's learning rates most of AdamW's updates to a bf16 weight are below its rounding step
    and would be lost. DeepSpeed keeps float32 master weights of its own; FSDP and fp16 loss scaling are refused.
    """
    params = list(params)
    fused = fused_supported(accelerator) or None
    layout = accelerator.distributed_type.value
    if layout != "DEEPSPEED" and any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
        if layout == "FSDP":
            raise RlhfchatError("base.dtype: 16-bit policy weights under FSDP would train without float32 master "
                                "weights; set base.dtype=float32 (FSDP's mixed_precision bf16 computes in bf16)")
        if accelerator.mixed_precision == "fp16":
            raise RlhfchatError("base.dtype: 16-bit policy weights under fp16 mixed precision cannot be unscaled by "
                                "the loss scaler; use mixed_precision bf16, base.dtype=float32, or a DeepSpeed config")
        return MasterWeightAdamW(params, fused=fused, **kwargs)
    return torch.optim.AdamW(params, fused=fused, **kwargs)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW on float32 copies ("master weights") of 16-bit parameters; float32 parameters are stepped as they are.

    `step()` takes each 16-bit parameter's gradient in float32 into its copy, steps the copies, and rounds them back
    into the parameters, so updates smaller than a bf16 weight's rounding step add up in the copy instead of being
    lost. Memory: 4 bytes per 16-bit parameter more (and a float32 gradient during the step). The clip (clip_and_step)
    reads and scales the parameters' own gradients, as without copies.
    """

    def __init__(self, params: Sequence[torch.Tensor], **kwargs: Any):
        self.model_params = list(params)
        masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.model_params]
        super().__init__(masters, **kwargs)

    def masters(self) -> list[torch.Tensor]:
        """The tensors AdamW steps, one per model parameter, in the same order."""
        return [p for group in self.param_groups for p in group["params"]]

    def step(self, closure: Any = None) -> Any:
        pairs = [(p, m) for p, m in zip(self.model_params, self.masters()) if m is not p]
        with torch.no_grad():
            for p, m in pairs:
                m.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        with torch.no_grad():
            for p, m in pairs:
                p.copy_(m)
                m.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()


class GradNorms:
    """Squared norms of the gradients, each taken by a post-accumulate-grad hook as the backward finishes it.

    The gradient is then still in cache: on the benchmark's 27.7M-parameter policy this takes 3 ms a step, against
    8 ms for get_total_norm's pass over every gradient before the step.
    Only for one process (DDP's gradients are averaged after the hooks run). `start()` before the backward that
    finishes the gradients (a minibatch's last micro-batch); `total(params)` afterwards.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.squares: dict[int, torch.Tensor] | None = None
        for p in params:
            p.register_post_accumulate_grad_hook(self._record)

    def start(self) -> None:
        self.squares = {}

    def _record(self, param: torch.Tensor) -> None:
        if self.squares is None or param.grad is None:
            return
        flat = param.grad.detach().reshape(-1)
        if flat.dtype in (torch.float32, torch.float64):  # BLAS's dot: the fastest read of it
            self.squares[id(param)] = torch.dot(flat, flat)
        else:
            self.squares[id(param)] = torch.linalg.vector_norm(flat, dtype=torch.float32).square()

    def total(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The global norm of `params`' gradients, or None where a hook did not record each of them; resets."""
        squares, self.squares = self.squares or {}, None
        if len(squares) != len(params) or not all(id(p) in squares for p in params):
            return None
        return torch.stack([squares[id(p)].float() for p in params]).sum().sqrt()


def clip_and_step(optimizer: Any, params: Sequence[torch.Tensor], max_norm: float, accelerator: Any,
                  norms: GradNorms | None = None) -> float:
    """Clip the gradient's global norm to `max_norm`, take the optimizer step; returns the norm before the clip.

    With the fused AdamW (no fp16 loss scaler) the clip goes into the fused kernel as its gradient scale, the hook
    torch's GradScaler uses: the kernel divides each gradient by max(1, norm / max) as it reads it. `params`: those
    with a gradient.
    """
    if accelerator.distributed_type.value == "DEEPSPEED":  # the engine clipped and stepped in the last backward
        return float(accelerator.deepspeed_engine_wrapped.get_global_grad_norm())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    fused = bool(inner.defaults.get("fused"))
    norm = norms.total(params) if norms is not None else None
    if not (fused and accelerator.scaler is None):
        norm = accelerator.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return float(norm)
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # DDP: of the synchronised gradient
    # torch's clip_grad_norm_ multiplies by max / (norm + 1e-6) when that is below 1: the same factor, inverted
    inner.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    try:
        optimizer.step()
    finally:
        del inner.grad_scale
    return float(norm)


class StepOptimizer:
    """The policy's optimizer as the loop uses it: `step()` clips and steps, returning the norm before the clip.

        policy, optimizer = StepOptimizer.prepare(policy, params, accelerator, lr=..., betas=..., weight_decay=...,
                                                  max_norm=1.0)
        optimizer.before_last_backward()   # the backward that finishes a minibatch's gradients comes next
        norm = optimizer.step(); optimizer.zero_grad()

    AdamW as `adamw` makes it, prepared with the policy by accelerate (`.optimizer`: what checkpoints read); on one
    process with the fused kernel (no loss scaler) the gradient norms are taken by GradNorms' hooks.
    """

    def __init__(self, optimizer: Any, params: Sequence[torch.Tensor], accelerator: Any, max_norm: float,
                 norms: GradNorms | None):
        self.optimizer, self.params, self.accelerator, self.max_norm, self.norms = (optimizer, list(params),
                                                                                   accelerator, max_norm, norms)

    @classmethod
    def prepare(cls, policy: Any, params: Sequence[torch.Tensor], accelerator: Any, *, max_norm: float,
                **adamw_kwargs: Any) -> tuple[Any, "StepOptimizer"]:
        """(the prepared policy, its optimizer)."""
        params = list(params)
        optimizer = adamw(params, accelerator, **adamw_kwargs)
        fused = bool(optimizer.defaults.get("fused"))
        policy, optimizer = accelerator.prepare(policy, optimizer)
        one_process = accelerator.num_processes == 1 and accelerator.scaler is None  # see GradNorms
        return policy, cls(optimizer, params, accelerator, max_norm, GradNorms(params) if fused and one_process
                           else None)

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW inside accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    @property
    def fused(self) -> bool:
        return bool(self.torch_optimizer.defaults.get("fused"))

    def before_last_backward(self) -> None:
        if self.norms is not None:
            self.norms.start()

    def step(self) -> float:
        return clip_and_step(self.optimizer, [p for p in self.params if p.grad is not None], self.max_norm,
                             self.accelerator, self.norms)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------------------------------
# The optimizer's state, whole and by name: what a checkpoint holds, loadable on any number of processes.


def _deepspeed(params: Sequence[torch.Tensor]) -> bool:
    """Whether DeepSpeed's ZeRO optimizer owns these parameters (ZeRO-3 partitions, or ZeRO-1/2's float32 fragments)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params)


def _stepped(inner: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """id(model parameter) -> the tensor the optimizer steps for it (its master copy, or itself)."""
    masters = inner.masters() if isinstance(inner, MasterWeightAdamW) else params
    model_params = inner.model_params if isinstance(inner, MasterWeightAdamW) else params
    return {id(p): m for p, m in zip(model_params, masters)}


def _step_count(torch_optimizer: torch.optim.Optimizer) -> int:
    steps = [float(s["step"]) for s in torch_optimizer.state.values() if "step" in s]
    return int(max(steps, default=0))


def full_state(optimizer: Any, named_params: Sequence[tuple[str, torch.Tensor]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """(weights, moments, step) of the trainable parameters `named_params`, whole, on the CPU: each one's float32 value
    (the master copy where there is one), AdamW's `NAME.exp_avg` and `NAME.exp_avg_sq`, and the step count.

    Under DeepSpeed every rank must call it (the partitions are gathered: DeepSpeed's safe_get_full_* functions).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    params = [p for _, p in named_params]
    weights, moments = {}, {}
    if _deepspeed(params):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for name, p in named_params:
            weights[name] = safe_get_full_fp32_param(p).detach().float().cpu()
            for key in MOMENTS:
                moments[f"{name}.{key}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu()
        return weights, moments, _step_count(inner.optimizer)
    stepped = _stepped(inner, params)
    for name, p in named_params:
        m = stepped[id(p)]
        weights[name] = m.detach().float().cpu()
        state = inner.state.get(m, {})
        for key in MOMENTS:
            moments[f"{name}.{key}"] = (state[key] if key in state else torch.zeros_like(m)).detach().float().cpu()
    return weights, moments, _step_count(inner)


def load_full_state(optimizer: Any, named_params: Sequence[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor],
                    moments: dict[str, torch.Tensor], step: int) -> None:
    """Put what full_state returned (on this or any other layout) into the parameters and the optimizer: the float32
    values into the master copies and the parameters, the moments and the step count into AdamW's state.

    Call it before the first step (the optimizer's state is created here). Under DeepSpeed every rank must call it.
    """
    missing = [n for n, _ in named_params if n not in weights or f"{n}.exp_avg" not in moments]
    if missing:
        raise RlhfchatError(f"checkpoint does not match the model: {len(missing)} trainable parameters missing, "
                            f"e.g. {missing[0]}")
    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for _, p in named_params]
    if _deepspeed(params):
        _load_deepspeed(inner, named_params, weights, moments, step)
        return
    stepped = _stepped(inner, params)
    order = {id(m): i for i, m in enumerate(m for g in inner.param_groups for m in g["params"])}
    state = {}
    with torch.no_grad():
        for name, p in named_params:
            m = stepped[id(p)]
            m.copy_(weights[name])
            if m is not p:
                p.copy_(weights[name])
            state[order[id(m)]] = {"step": torch.tensor(float(step)),
                                   **{key: moments[f"{name}.{key}"] for key in MOMENTS}}
    # torch's own loading puts every tensor on its parameter's device and dtype (and `step` where fused needs it)
    inner.load_state_dict({"state": state, "param_groups": inner.state_dict()["param_groups"]})


def _load_deepspeed(zero_optimizer: Any, named_params: Sequence[tuple[str, torch.Tensor]],
                    weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """load_full_state under DeepSpeed ZeRO (deepspeed 0.19): AdamW's state over the flat float32 partitions is
    created (zeros at `step`: torch creates it at the first step otherwise), then each parameter's slices of the
    weights and moments are set (safe_set_full_*), and the model's own copy of the weights too (ZeRO-3: gathered,
    written on rank 0 and partitioned again)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    torch_optimizer = zero_optimizer.optimizer
    # ZeRO-3 hands its flat partitions to the torch optimizer only while it steps; ZeRO-1/2 keep them in its groups
    flat = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or [
        p for g in torch_optimizer.param_groups for p in g["params"]]
    for p in flat:  # what torch's AdamW creates at its first step (a float32 step count on the CPU, zero moments)
        torch_optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: views of the new state tensors
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in named_params:
        for key, value in ((None, weights[name]), *((k, moments[f"{name}.{k}"]) for k in MOMENTS)):
            if hasattr(p, "ds_id"):
                _set_zero3_slice(zero_optimizer, p, value, key)
            elif key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
    params = [p for _, p in named_params]
    with torch.no_grad():
        if any(hasattr(p, "ds_id") for p in params):
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    for name, p in named_params:
                        p.data.copy_(weights[name])
        else:
            for name, p in named_params:
                p.data.copy_(weights[name])


def _set_zero3_slice(zero_optimizer: Any, param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of a whole tensor into a ZeRO-3 parameter's float32 partition (key None) or its AdamW state.

    What DeepSpeed 0.19's set_full_hp_param does, for any size: the partitions are padded to a multiple of the number
    of ranks, which that function forgets (a 1-element bias on 2 ranks fails there)."""
    import torch.distributed as dist

    part, _ = zero_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    group = zero_optimizer._get_param_partition_group(param)
    n = part.numel()
    padded = torch.zeros(n * dist.get_world_size(group=group), dtype=part.dtype)
    padded[: value.numel()] = value.flatten()
    part.data.copy_(padded.narrow(0, n * dist.get_rank(group=group), n))
