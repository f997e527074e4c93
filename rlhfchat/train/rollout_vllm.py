"""PPO rollouts in vLLM (`ppo.rollout_backend: vllm`): GPU only, the optional extra `pip install 'rlhfchat[vllm]'`.

NOT RUN in this project's CI or on its developers' machines: they have no GPU and vLLM cannot be installed there.
The code follows vLLM's offline API as TRL's "colocate" mode uses it (vLLM 0.22 to 0.31, the versions TRL 1.16
supports); `tests/test_rollout.py` checks only the one-line errors for a missing vllm or GPU.

    backend = VLLMRollouts("runs/x/sft", recipe.ppo, accelerator, dtype="bfloat16")   # one engine per rank
    backend.sync_weights(policy.lm)                        # before the first rollout (a resumed run differs from sft/)
    rollout = backend.generate(prompt_ids, settings, device, seeds=[...])   # a Rollout, as the HF backend's
    ...  ppo.update(exp)  ...
    backend.sync_weights(policy.lm)                        # after every update: vLLM samples from the new policy

Colocated: every training rank builds its own vLLM engine on its own GPU, in its own process
(`distributed_executor_backend="external_launcher"`, the ranks that accelerate started), taking
`ppo.vllm.gpu_memory_utilization` of the GPU for its weights and KV cache. With `ppo.vllm.sleep: true` the engine
drops its weights and KV cache between generations (vLLM sleep level 2) so the update has the memory back; the
weights come back through `sync_weights`, which PPO calls after every update anyway.

The rollout is the HF backend's structure: left-padded prompt, right-padded response cut at EOS or at the first stop
sequence by the same `finish_responses`, masks and texts; `hidden` is None, so PPO runs one forward for the old
logprobs and values (vLLM's own logprobs come from another kernel and would put noise into the PPO ratio).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from rlhfchat.errors import RlhfchatError
from rlhfchat.lora import merged_lora_weight
from rlhfchat.decoding import GenerationSettings, finish_responses, left_pad
from rlhfchat.train.rollout import Rollout, check_backend


def vllm_weights(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of a HF causal LM under the names of its checkpoint, which vLLM's
    `load_weights` maps onto its own layout (e.g. q/k/v into one qkv_proj).

    A peft (LoRA) model yields its base weights with the adapters' delta added out of place, one layer at a time
    (lora.merged_lora_weight; the model is not touched, so no merge/unmerge rounding creeps into the base weights
    over thousands of syncs). Other tensors are yielded as they are (no copy).
    """
    if not hasattr(lm, "get_base_model"):
        for name, param in lm.named_parameters():
            yield name, param.data
        return
    base = lm.get_base_model()
    modules = dict(base.named_modules())
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # the adapters (added below), and the frozen original of a modules_to_save copy
        tensor = param.data
        if name.endswith(".base_layer.weight"):
            tensor, _ = merged_lora_weight(modules[name[: -len(".base_layer.weight")]])
        yield name.replace(".base_layer", "").replace(".modules_to_save.default", ""), tensor


class VLLMRollouts:
    """A colocated vLLM engine that samples PPO rollouts and takes the policy's weights after each update."""

    def __init__(self, model_dir: str | Path, cfg: Any, accelerator: Any, dtype: str = "bfloat16", seed: int = 0):
        check_backend("vllm")
        if getattr(cfg.lora, "quantize", None):
            raise RlhfchatError("ppo.rollout_backend: vllm with ppo.lora.quantize (a 4-bit base) is not supported; "
                                "set ppo.rollout_backend=hf")
        from vllm import LLM

        # external_launcher: vLLM joins the torch.distributed world accelerate started instead of spawning workers;
        # a single process without a launcher needs the same variables.
        os.environ.setdefault("RANK", str(accelerator.process_index))
        os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
        os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        self.sleep = bool(cfg.vllm.sleep)
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=dtype,
            seed=seed + accelerator.process_index,  # only used by requests without a seed of their own
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
            max_model_len=cfg.generation.max_prompt_length + cfg.generation.max_new_tokens,
            max_num_seqs=max(cfg.chunk_size, 1),
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=self.sleep,
        )
        from rlhfchat.models import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)  # ours (pad token, template), for the same cuts as the HF backend
        self.asleep = False
        if self.sleep:
            self.llm.sleep(level=2)  # weights and KV cache gone until the first sync_weights
            self.asleep = True
        accelerator.wait_for_everyone()

    def _model(self) -> Any:
        """The engine's torch model (in this process: external_launcher runs the worker here)."""
        try:
            return self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            raise RlhfchatError("ppo.rollout_backend: this vLLM version hides its model from the training process; "
                                "install a version that TRL supports (vllm>=0.22,<0.32)") from None

    @torch.no_grad()
    def sync_weights(self, lm: torch.nn.Module) -> None:
        """Load the policy's current weights (LoRA deltas added) into the engine, one tensor at a time.

        `lm` is the unwrapped causal LM (`policy.lm`); under DeepSpeed ZeRO-3 call this inside
        `Runtime.whole(...)` so every tensor is whole. Every rank calls it (each has an engine).
        """
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        model = self._model()
        for name, tensor in vllm_weights(lm):
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.asleep = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], settings: GenerationSettings, device: Any = None,
                 seeds: Sequence[int] | None = None) -> Rollout:
        """Sample one reply per prompt. Prompts as token ids -> Rollout (hidden=None)."""
        from vllm import SamplingParams

        if seeds is not None and len(seeds) != len(prompt_ids):
            raise RlhfchatError(f"seeds: expected one seed per prompt ({len(prompt_ids)}), got {len(seeds)}")
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        sample = settings.do_sample
        params = [SamplingParams(
            n=1,
            temperature=settings.temperature if sample else 0.0,
            top_k=settings.top_k if sample and settings.top_k > 0 else -1,
            top_p=settings.top_p if sample else 1.0,
            max_tokens=settings.max_new_tokens,
            min_tokens=settings.min_new_tokens,
            # stop early on a stop sequence but keep its text: finish_responses makes the exact cut, as for HF
            stop=list(settings.stop_sequences) or None,
            include_stop_str_in_output=True,
            seed=None if seeds is None else int(seeds[i]),  # a per-request generator: independent of the batch
        ) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], sampling_params=params,
                                    use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)
            self.asleep = True
        tok = self.tokenizer
        rows = []
        for out in outputs:
            o = out.outputs[0]
            tokens = list(o.token_ids)
            # ended on EOS: make sure the EOS is there, as HF generate leaves it
            if o.finish_reason == "stop" and o.stop_reason is None and (not tokens or tokens[-1] != tok.eos_token_id):
                tokens.append(tok.eos_token_id)
            rows.append(tokens[: settings.max_new_tokens])
        width = max(1, max(len(r) for r in rows))
        raw = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # (B, R) as generate returns it
        for i, r in enumerate(rows):
            raw[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        ids, mask = left_pad(prompt_ids, tok.pad_token_id, device)
        response_ids, response_mask, texts, ended = finish_responses(raw, tok, settings.stop_sequences)
        return Rollout(ids, mask, response_ids.to(device), response_mask.to(device), texts, ended, None)
