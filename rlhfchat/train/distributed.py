"""accelerate and DeepSpeed behind one door: the Accelerator PPO runs under, the DeepSpeed settings its own loop
needs, frozen networks under ZeRO-3, and whole weights for a save.

    accelerator = new_accelerator(log_with=None)              # DDP, DeepSpeed or one process; GPU or CPU
    configure_deepspeed(accelerator, micro_batch=8, max_grad_norm=1.0)  # before prepare()
    reference_lm = prepare_frozen(reference_lm, accelerator)  # ZeRO-3: an inference engine
    with whole_parameters(model):                              # ZeRO-3: every rank gathers; rank 0 then saves
        ...

On a machine without GPUs, `accelerate launch` with a DeepSpeed config (configs/accelerate/cpu-zero2.yaml,
cpu-zero3.yaml) runs DeepSpeed's CPU accelerator over gloo: DS_ACCELERATOR=cpu (when this module is imported) and an
explicit gloo backend are set here (without the backend accelerate finds none for the CPU and falls back to one
process while DeepSpeed sees two).
Without DeepSpeed the ranks run data-parallel on the CPU over gloo (accelerate's cpu=True).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from rlhfchat.errors import RlhfchatError

_FROZEN_ENGINES: list[Any] = []  # DeepSpeed inference engines of the frozen networks: alive as long as the process

if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator, chosen before anything imports deepspeed (accelerate's
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # unwrap_model does, wherever it is installed); no detection warning


def deepspeed_selected() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def new_accelerator(**kwargs: Any) -> Any:
    """The Accelerator for the launch layout: accelerate's own choice on GPUs; on a CPU DeepSpeed over gloo under a
    DeepSpeed config, else data parallelism over gloo (or one process)."""
    from accelerate import Accelerator

    if deepspeed_selected():
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RlhfchatError("accelerate config: DeepSpeed is selected but deepspeed is not installed; "
                                "DS_BUILD_OPS=0 pip install 'rlhfchat[deepspeed]'") from None
    if torch.cuda.is_available():
        return Accelerator(**kwargs)
    if deepspeed_selected():
        from accelerate.utils import InitProcessGroupKwargs

        return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kwargs)
    return Accelerator(cpu=True, **kwargs)


def zero_stage(accelerator: Any) -> int | None:
    """The DeepSpeed ZeRO stage an accelerator runs under, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def configure_deepspeed(accelerator: Any, micro_batch: int, max_grad_norm: float) -> None:
    """The DeepSpeed settings of a loop that prepares no dataloader (PPO): call before `accelerator.prepare`.

    The engine clips at `max_grad_norm` in its step (accelerate's clip_grad_norm_ does nothing under DeepSpeed). It
    does not count micro-batches (gradient_accumulation_steps 1, so it does not divide the losses either): the loop
    marks each minibatch's last micro-batch itself (`accelerator.sync_gradients`), and the engine steps after that
    one's backward only, one optimizer step per minibatch.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = int(micro_batch) * accelerator.num_processes
    config["gradient_clipping"] = float(max_grad_norm)
    accelerator.gradient_accumulation_steps = 1


def prepare_frozen(model: nn.Module, accelerator: Any) -> nn.Module:
    """A frozen network (the reference, the reward model) ready for forwards under the launch layout.

    Under ZeRO-3 it was loaded partitioned (accelerate's zero3_init_flag), so it gets a DeepSpeed engine without an
    optimizer whose hooks gather each layer's weights for its forward, as TRL's prepare_deepspeed does (TRL 1.16);
    the module itself is returned: its submodules (trunk, output layer, score head) can be called directly. Under
    ZeRO-1/2, DDP or one process it is held whole on every rank and returned as it is (TRL gives it a ZeRO-0 engine,
    which changes nothing in float32 and bf16). Every rank must run the same forwards under ZeRO-3 (collectives).
    """
    if zero_stage(accelerator) != 3:
        return model
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):  # training-only blocks: an engine without an optimizer has no use for them
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    config["train_micro_batch_size_per_gpu"] = config.get("train_micro_batch_size_per_gpu", 1)
    if config["train_micro_batch_size_per_gpu"] == "auto":
        config["train_micro_batch_size_per_gpu"] = 1
    config.pop("train_batch_size", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    _FROZEN_ENGINES.append(engine)
    return engine.module


@contextlib.contextmanager
def whole_on_load(accelerator: Any) -> Iterator[None]:
    """`from_pretrained` inside the block loads whole weights, not ZeRO-3 partitions (a model that lives outside
    DeepSpeed, such as a reward model on a GPU of its own)."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def is_partitioned(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a ZeRO-3 partition."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with its ZeRO-3 partitions gathered for reading (saving a folder): every rank must enter. A no-op for
    a model that is not partitioned."""
    if not is_partitioned(model):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield model


def frozen_forward(model: nn.Module) -> contextlib.AbstractContextManager:
    """The grad mode for forwards that need no gradient: inference mode, or no_grad where DeepSpeed's ZeRO-3 hooks
    gather the weights (a tensor they allocate in inference mode could not be used by autograd later)."""
    return torch.no_grad() if is_partitioned(model) else torch.inference_mode()


def unwrap(model: Any, accelerator: Any) -> Any:
    """The module inside the layout's wrapper. Without DeepSpeed or FSDP the only wrapper is DDP's, taken off here:
    accelerate's unwrap_model imports deepspeed wherever it is installed (about 20 MB of a CPU run's memory)."""
    if zero_stage(accelerator) is None and accelerator.distributed_type.value != "FSDP":
        while isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        return model
    return accelerator.unwrap_model(model)


@contextlib.contextmanager
def gathered_for_generation(model: Any, accelerator: Any) -> Iterator[Any]:
    """The unwrapped model, with its parameters gathered once for the whole block under DeepSpeed ZeRO-3.

    Under ZeRO-3 each rank holds a shard of every parameter and DeepSpeed's hooks all-gather a layer's weights
    before its forward and free them after: once per layer per generated token. Here the whole model is gathered
    once (deepspeed.zero.GatheredParameters), the hooks are taken off for the block and put back after, as TRL's
    unwrap_model_for_generation does (its hook helpers are reused). Costs a full copy of the weights per GPU for
    the duration (26 GB for 13B in bf16). Every rank must enter the block (the gather is a collective).
    Anything else (DDP, FSDP, ZeRO-1/2, one process): a no-op yielding `unwrap(model, accelerator)`.

        with gathered_for_generation(policy, accelerator) as unwrapped:
            rollout = generate_rollout(unwrapped.lm, tokenizer, ids, settings, device=device, capture=True)
    """
    if zero_stage(accelerator) != 3:
        yield unwrap(model, accelerator)
        return
    try:
        import deepspeed
    except ImportError:
        raise RlhfchatError("accelerate config: DeepSpeed ZeRO-3 is selected but deepspeed is not installed; "
                            "pip install deepspeed") from None
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        remove_hooks(model)
        try:
            yield accelerator.unwrap_model(model)
        finally:
            add_hooks(model)
