"""Where the RL loop's models run: the accelerator and every device quirk, behind one door chosen once.

    rt = Runtime.start(log_with=None, project_dir="runs/x/ppo")   # the launch layout; the process's memory settings
    rt.prepare_policy(policy)                                      # before the optimizer and the reference are made
    policy, optimizer = rt.prepare_training(policy, cfg)           # AdamW and its clipped step (optim.StepOptimizer)
    reference = rt.prepare_frozen_reference(reference); model = rt.prepare_frozen(model, device=None)
    with rt.generation(policy) as lm: ...                          # sample replies with the policy's network
    with rt.inference(policy): ...                                 # forwards that need no gradient
    with rt.micro_batch(policy, optimizer, last=True): ...         # one micro-batch's forward and backward
    rt.backward(loss); norm = optimizer.step()
    with rt.whole(policy) as unwrapped: ...                        # whole weights, to save them
    with rt.loop(): ...                                            # the training loop

What stays behind this door, so the loop reads as the algorithm:
- the layout (train/distributed.py): one process, DDP, DeepSpeed ZeRO-2/3 or FSDP, GPU or CPU over gloo; under
  ZeRO-3 the frozen networks become inference engines, generation gathers the weights once, saves gather them;
- CPU speed-ups (train/cpu.py): on a CPU the process's malloc settings, the math attention kernel for a bf16
  backward, LoRA adapters merged into copies of their weights for generation, and the frozen networks' weights
  resident in the process only while their layer runs; where the policy also trains
  outside DeepSpeed, trainable weights copied out of the file mapping and the fused RMSNorm backward; on any device,
  the objects loaded at start-up taken out of the garbage collector's generations for the loop;
- the optimizer step (train/optim.py): fused AdamW with the clip folded in, float32 master weights for a 16-bit
  policy, gradient norms taken as the backward finishes them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from rlhfchat.train import cpu, distributed
from rlhfchat.train.optim import StepOptimizer


class Runtime:
    """An accelerator and the device choices made for it (see the module docstring)."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.zero = distributed.zero_stage(accelerator)
        self.cpu = self.device.type == "cpu" and self.zero is None  # the CPU speed-ups apply
        self.sharded = accelerator.distributed_type.value == "FSDP" or self.zero == 3
        self.frozen_pages = cpu.FrozenPages()  # on a CPU: frozen weights resident only while their module runs

    @classmethod
    def start(cls, **accelerator_kwargs: Any) -> "Runtime":
        """The runtime of a stage: the launch layout's accelerator, and on a CPU the process's memory settings
        (every training step frees and allocates its activations and gradients again)."""
        rt = cls(distributed.new_accelerator(**accelerator_kwargs))
        if rt.device.type == "cpu":
            cpu.keep_freed_memory()
        return rt

    # -- setting up the models -----------------------------------------------------------------------------------
    def prepare_policy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """What the policy's network needs before training here (on a CPU: owned trainable weights, fused norms)."""
        if self.cpu:
            cpu.own_trainable_weights(policy)  # the optimizer would copy-on-write them from the file mapping
            cpu.fuse_norms(policy)  # a CPU's update spends as long in the RMSNorms' backward as in the attention
        return policy

    def prepare_training(self, policy: torch.nn.Module, cfg: Any) -> tuple[Any, StepOptimizer]:
        """The policy on its device under the layout, and its optimizer (cfg: learning_rate, adam_beta1/2,
        weight_decay, max_grad_norm, batch_size as DeepSpeed's micro-batch)."""
        if not distributed.is_partitioned(policy):
            policy.to(self.device)
        if self.zero is not None:  # the engine clips and steps; see micro_batch
            distributed.configure_deepspeed(self.accelerator, cfg.batch_size, cfg.max_grad_norm)
        params = [p for p in policy.parameters() if p.requires_grad]
        policy, optimizer = StepOptimizer.prepare(policy, params, self.accelerator, lr=cfg.learning_rate,
                                                  betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                  weight_decay=cfg.weight_decay, max_norm=cfg.max_grad_norm)
        if self.cpu:
            cpu.optimizer_state_up_front(optimizer.torch_optimizer)  # a compact heap (see cpu.py)
        return policy, optimizer

    def prepare_frozen_reference(self, reference: Any) -> Any:
        reference = reference.prepare(self.accelerator)  # ZeRO-3: an inference engine of its own
        if self.cpu and reference.lm is not None:  # a copy of its own (not the policy under LoRA or a branch)
            self.frozen_pages.add(reference.lm)
        return reference

    def prepare_frozen(self, model: torch.nn.Module, device: str | None = None) -> torch.nn.Module:
        """A frozen network (the reward model) on `device` outside the layout (a GPU of its own, loaded whole), or
        on this rank's device under the layout (ZeRO-3: an inference engine)."""
        if device:
            return model.to(device)
        if not distributed.is_partitioned(model):
            model = model.to(self.device)
        if self.cpu:
            self.frozen_pages.add(model)
        return distributed.prepare_frozen(model, self.accelerator)

    def loading_whole(self, whole: bool) -> contextlib.AbstractContextManager:
        """`from_pretrained` in the block loads whole weights, not ZeRO-3 partitions, when `whole`."""
        return distributed.whole_on_load(self.accelerator) if whole else contextlib.nullcontext()

    def unwrap(self, model: Any) -> Any:
        return distributed.unwrap(model, self.accelerator)

    # -- running them --------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    @contextlib.contextmanager
    def generation(self, policy: Any) -> Iterator[Any]:
        """The policy's causal LM, ready to sample from: under ZeRO-3 its weights gathered once for the block (not
        layer by layer at every token), under autocast, and on a CPU with LoRA adapters merged into copies of the
        weights they adapt (one product per layer instead of three; a GPU lacks the memory for the copies)."""
        from rlhfchat.lora import adapters_merged

        self.frozen_pages.release()  # generation reads none of them
        with distributed.gathered_for_generation(policy, self.accelerator) as unwrapped, self.autocast():
            merging = adapters_merged if self.device.type == "cpu" else contextlib.nullcontext
            with merging(unwrapped.lm) as lm:
                yield lm

    @contextlib.contextmanager
    def inference(self, model: Any) -> Iterator[None]:
        """Forwards of `model` (and the frozen networks) that need no gradient, under autocast."""
        with distributed.frozen_forward(model), self.autocast():
            yield

    @contextlib.contextmanager
    def micro_batch(self, policy: Any, optimizer: StepOptimizer, last: bool) -> Iterator[None]:
        """One micro-batch of a minibatch's gradient. Only the last synchronises: DDP's no_sync before it, and
        DeepSpeed's accumulation boundary (its engine ignores no_sync and steps inside that backward), so one
        optimizer step per minibatch; its backward finishes the gradients, whose norms are taken then."""
        self.accelerator.sync_gradients = last
        self.frozen_pages.release()  # nor does the update
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(policy)
        if last:
            optimizer.before_last_backward()
        with sync, self.autocast(), cpu.training_attention(self.device, self.accelerator.mixed_precision):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    @contextlib.contextmanager
    def whole(self, model: Any) -> Iterator[Any]:
        """The unwrapped model with whole weights (ZeRO-3: gathered on every rank, which must all enter)."""
        with distributed.gathered_for_generation(model, self.accelerator) as unwrapped:
            yield unwrapped

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        """The training loop: what was loaded before it stays out of full garbage collections."""
        with cpu.startup_objects_frozen():
            yield

    # -- across processes ----------------------------------------------------------------------------------------
    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the processes (identity on one)."""
        return self.accelerator.reduce(x, "sum") if self.processes > 1 else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x)
