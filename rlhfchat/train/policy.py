"""The policy with a value head, and the frozen reference it is KL-penalised against.

    policy = build_policy("runs/tiny/sft", share_trunk=True, lora=LoraConfig())
    out = policy(input_ids, attention_mask, n_prompt)     # out.logprobs, out.values: (B, R)
    reference = Reference(policy, "runs/tiny/sft")          # a frozen copy, or the policy with LoRA disabled
    ref_logprobs = reference.logprobs(input_ids, attention_mask, n_prompt)

`input_ids` is a left-padded prompt of `n_prompt` columns followed by a right-padded response of R columns.
Only the R response positions go through the output layer: the hidden state at column t predicts token t + 1, so
the states of columns n_prompt - 1 .. n_prompt + R - 2 give the logprobs of the response tokens and the values
of the states before each of them (trlX v0.6.0's alignment: value t is the value of the state that emits token t).

- `share_trunk: true` (trlX v0.6.0 has no other): the value head reads the policy's last hidden state; one forward gives
  logprobs and values.
- `share_trunk: false`: a separate critic, a copy of the SFT model's trunk with its own value head.
- `value_head: mlp` (default): trlX's head (v0.6.0 `make_head`: Linear(d, 2d), ReLU, Linear(2d, 1)) with float32
  weights; `linear`: one Linear(d, 1); None (the critic-free estimators): no value head and no critic, `values` None.
- LoRA (`ppo.lora.enabled`): only the adapters (and the value head) train; the reference is the same network with
  the adapters disabled, so no second copy of the weights is held.
- `num_layers_unfrozen: N` (trlX v0.6.0's hydra): the embeddings and every decoder block below the top N stay frozen, so the
  reference is the policy's own frozen bottom under copies of what trains above it (`FrozenBranch`), not a second
  whole model; the update's backward stops at the lowest trainable block.
- `share_prompt_prefix: true`: the leading tokens all rows of a batch share (the system prompt) go through the trunk
  once per batch, and every forward here runs the last block's MLP only on the columns it reads (trunk.hidden_from).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfchat.config import LoraConfig
from rlhfchat.errors import RlhfchatError
from rlhfchat.train.ppo_math import entropy_from_logits, logprobs_of_labels
from rlhfchat.train.trunk import causal_parts, decoder_blocks, hidden_from, text_config


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor  # (B, R) log p(response token | everything before it)
    values: torch.Tensor | None  # (B, R) value of the state before each response token
    entropy: torch.Tensor | None  # (B, R) entropy of the next-token distribution


def response_states(trunk: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                    share_prefix: bool = True) -> torch.Tensor:
    """The states that predict the response tokens: columns n_prompt - 1 .. T - 2. (B, P + R) -> (B, R, H)."""
    return hidden_from(trunk, input_ids, attention_mask, n_prompt - 1, share_prefix)[:, :-1]


def output_logits(lm: nn.Module, states: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The output layer on hidden states. (B, R, H) -> (B, R, V).

    Under autocast (bf16 mixed precision) the output layer runs in its weights' own dtype: logprobs feed the
    PPO ratio, and bf16 logits would put percent-level noise into it. It is a small share of the compute.
    """
    _, head = causal_parts(lm)
    # A slice of the hidden states is not contiguous: linear would then run as a batched matmul against a copy of
    # the output matrix per row (a 16 x 8192 x 512 copy for a 16-row chunk), instead of one matmul.
    states = states.contiguous()
    if torch.is_autocast_enabled(states.device.type):
        with torch.autocast(states.device.type, enabled=False):
            logits = head(states.to(head.weight.dtype))
    else:
        logits = head(states)
    softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    if softcap:  # Gemma-style models cap their logits in the LM head's forward; do the same here
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                      temperature: float = 1.0, share_prefix: bool = True) -> torch.Tensor:
    """Logprobs of the response tokens under any HF causal LM. (B, P + R) -> (B, R)."""
    trunk, _ = causal_parts(lm)
    states = response_states(trunk, input_ids, attention_mask, n_prompt, share_prefix)
    return logprobs_of_labels(output_logits(lm, states, temperature), input_ids[:, n_prompt:])


def make_value_head(hidden_size: int, kind: str = "mlp") -> nn.Module:
    """`mlp`: trlX's value head (v0.6.0 and its last commit, `make_head`): Linear(d, 2d), ReLU, Linear(2d, 1) with
    torch's default initialisation; `linear`: Linear(d, 1). (.., d) -> (.., 1)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1))
    if kind == "linear":
        return nn.Linear(hidden_size, 1)
    raise RlhfchatError(f"ppo.value_head: expected mlp or linear, got {kind!r}")


class PolicyWithValueHead(nn.Module):
    """A HF causal LM (optionally with LoRA adapters) plus a value head, shared trunk or separate critic (or neither:
    critic-free)."""

    def __init__(self, lm: nn.Module, critic: nn.Module | None = None, temperature: float = 1.0,
                 share_prefix: bool = True, value_head: str | None = "mlp"):
        super().__init__()
        self.lm = lm
        self.critic = critic  # None: the value head reads the policy's own hidden state (share_trunk)
        # None: critic-free (GRPO, RLOO, REINFORCE++): no head, and forward's values are None
        self.value_head = None if value_head is None else make_value_head(_hidden_size(lm), value_head)
        self.temperature = temperature
        self.share_prefix = share_prefix  # see response_states

    @property
    def share_trunk(self) -> bool:
        return self.critic is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                with_values: bool = True, with_entropy: bool = False) -> PolicyOutput:
        """Logprobs, values and (optionally) entropy on the response positions. (B, P + R) -> (B, R) each."""
        trunk, _ = causal_parts(self.lm)
        states = response_states(trunk, input_ids, attention_mask, n_prompt, self.share_prefix)  # (B, R, H)
        logits = output_logits(self.lm, states, self.temperature)  # (B, R, V)
        logprobs = logprobs_of_labels(logits, input_ids[:, n_prompt:])
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits)
        values = None
        if with_values and self.value_head is not None:
            if self.critic is not None:
                states = response_states(self.critic, input_ids, attention_mask, n_prompt, self.share_prefix)
            values = self.values_of(states)  # (B, R, H) -> (B, R)
        return PolicyOutput(logprobs, values, entropy)

    def values_of(self, states: torch.Tensor) -> torch.Tensor:
        """The value head on hidden states. (B, R, H) -> (B, R) float32."""
        return self.value_head(states.to(next(self.value_head.parameters()).dtype)).squeeze(-1).float()

    def from_generation(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        n_prompt: int) -> PolicyOutput:
        """What `forward(..., with_entropy=True)` returns, from the hidden states generation already computed.

        hidden (B, R, H): the trunk's last hidden state at each generation step, i.e. the state before each
        response token. Only the output layer and the value head run; a separate critic needs its own forward.
        """
        logits = output_logits(self.lm, hidden, self.temperature)
        logprobs = logprobs_of_labels(logits, input_ids[:, n_prompt:])
        entropy = entropy_from_logits(logits)
        if self.value_head is None:
            values = None
        elif self.critic is None:
            values = self.values_of(hidden)
        else:
            values = self.values_of(response_states(self.critic, input_ids, attention_mask, n_prompt,
                                                    self.share_prefix))
        return PolicyOutput(logprobs, values, entropy)

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        """What `value_head.safetensors` holds: the head, plus the critic's trunk when it has its own (critic-free:
        nothing)."""
        if self.value_head is None:
            return {}
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.critic is not None:
            state.update({f"critic.{k}": v for k, v in self.critic.state_dict().items()})
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_value_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.value_head is None:
            return
        self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                         if k.startswith("value_head.")})
        if self.critic is not None:
            self.critic.load_state_dict({k[len("critic."):]: v for k, v in state.items() if k.startswith("critic.")})

    def save_pretrained(self, out_dir: str | Path) -> None:
        """A plain HF causal-LM folder (LoRA merged into the weights) plus `value_head.safetensors` (none when
        critic-free)."""
        from safetensors.torch import save_file

        from rlhfchat.lora import merged

        # LoRA: folds the adapters into the weights in place (no second copy); the policy computes the same function
        # afterwards, but the adapters are gone, so this is the last thing a run does. QLoRA: merged into the base
        # loaded again in full precision (lora.merged).
        self.lm = merged(self.lm)
        self.lm.save_pretrained(out_dir)
        if self.value_head is not None:
            save_file(self.value_state_dict(), str(Path(out_dir) / "value_head.safetensors"))


def freeze_bottom_layers(lm: nn.Module, num_layers_unfrozen: int) -> None:
    """Freeze everything below the top `num_layers_unfrozen` decoder blocks: the input embeddings, whatever else the
    trunk runs before its blocks (GPT-2's position embeddings, Bloom's embedding norm) and the lower blocks. The final
    norm and the output layer keep training, unless the output layer is tied to the input embeddings: then it is
    frozen with them. trlX v0.6.0's freeze_bottom_causal_layers freezes the lower blocks only; freezing what feeds them too
    keeps the shared bottom exactly the SFT model's (so the reference is exact) and stops the backward at the lowest
    trainable block."""
    trunk, _ = causal_parts(lm)
    blocks = decoder_blocks(trunk)
    if not 0 <= num_layers_unfrozen <= len(blocks):
        raise RlhfchatError(f"ppo.num_layers_unfrozen: expected -1 (all) or 0..{len(blocks)} (this model's "
                            f"decoder blocks), got {num_layers_unfrozen}")
    lm.get_input_embeddings().requires_grad_(False)
    for child in trunk.children():  # registered before the blocks: what the trunk runs on the input
        if child is blocks:
            break
        child.requires_grad_(False)
    for block in blocks[: len(blocks) - num_layers_unfrozen]:
        block.requires_grad_(False)


class FrozenBranch:
    """trlX v0.6.0's hydra reference: frozen copies of the parts of a partly frozen policy that train (the top blocks, the
    final norm, the output layer), taken while they still hold the SFT weights. Swapped into the policy for the
    reference's forward, they make it the SFT model again on top of the shared frozen bottom; nothing else of the
    model is held twice.
    """

    def __init__(self, lm: nn.Module):
        import copy

        trunk, head = causal_parts(lm)
        blocks = decoder_blocks(trunk)
        owners = [(blocks, name, child) for name, child in blocks.named_children()]
        owners += [(trunk, name, child) for name, child in trunk.named_children() if child is not blocks]
        owners += [(lm, name, child) for name, child in lm.named_children() if child is head]
        # The copies keep the policy's dtype: the reference then computes exactly what the policy did before its
        # first update (a zero KL at step 0, also under bf16 autocast), and they are a small part of the model.
        self.parts = []  # (owner module, attribute name, frozen copy)
        swapped = set()
        for owner, name, child in owners:
            if any(p.requires_grad for p in child.parameters()):
                self.parts.append((owner, name, copy.deepcopy(child).requires_grad_(False).eval()))
                swapped.update(id(p) for p in child.parameters())
        missed = [n for n, p in lm.named_parameters() if p.requires_grad and id(p) not in swapped]
        if missed:
            raise RlhfchatError(f"{type(lm).__name__}: {missed[0]} trains but is not in a block, the trunk's other "
                                "modules or the output layer; cannot build the shared-bottom reference")

    def to(self, device: torch.device) -> "FrozenBranch":
        for _, _, frozen in self.parts:
            frozen.to(device)
        return self

    @contextlib.contextmanager
    def swapped_in(self):
        """The policy computes the reference inside this block; its own modules are back afterwards."""
        trained = [(owner, name, getattr(owner, name)) for owner, name, _ in self.parts]
        try:
            for owner, name, frozen in self.parts:
                setattr(owner, name, frozen)
            yield
        finally:
            for owner, name, module in trained:
                setattr(owner, name, module)


def _hidden_size(lm: nn.Module) -> int:
    return int(text_config(lm).hidden_size)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratio must be 1 on the first update of a fresh rollout: no dropout anywhere (as TRL does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        config = getattr(module, "config", None)
        for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
            if config is not None and isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


def build_policy(sft_dir: str | Path, share_trunk: bool = True, lora: LoraConfig | None = None,
                 dtype: torch.dtype = torch.float32, temperature: float = 1.0, seed: int = 0,
                 gradient_checkpointing: bool = False, share_prefix: bool = True,
                 num_layers_unfrozen: int = -1, value_head: str | None = "mlp") -> PolicyWithValueHead:
    """The trainable policy from an SFT folder: LoRA adapters when `lora.enabled`, a value head unless `value_head` is
    None (critic-free: then no critic either, whatever `share_trunk`); with `num_layers_unfrozen` >= 0 only the top
    blocks (and the final norm and output layer) train."""
    from transformers import AutoModel, AutoModelForCausalLM

    if lora is not None and lora.quantize:  # QLoRA: a 4-bit frozen base under the adapters
        from rlhfchat.models import load_pretrained

        lm = load_pretrained(AutoModelForCausalLM, sft_dir, dtype, lora, "ppo.lora.quantize")
    else:
        lm = _load(AutoModelForCausalLM, sft_dir, dtype)
    if lora is not None and lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        lm = get_peft_model(lm, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    frozen_bottom = num_layers_unfrozen >= 0 and not (lora is not None and lora.enabled)
    if frozen_bottom:
        freeze_bottom_layers(lm, num_layers_unfrozen)
    critic = None if share_trunk or value_head is None else _load(AutoModel, sft_dir, dtype)
    if gradient_checkpointing:
        for model in (lm, critic):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                if model is lm and frozen_bottom:
                    # transformers makes the embeddings' output require grad for checkpointing; with a frozen bottom
                    # that would pull every frozen block into the backward. Non-reentrant checkpoints need no such
                    # hook: the graph then starts at the lowest trainable block, as without checkpointing.
                    if hasattr(model, "disable_input_require_grads"):
                        model.disable_input_require_grads()
                elif hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
                    model.enable_input_require_grads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        policy = PolicyWithValueHead(lm, critic, temperature=temperature, share_prefix=share_prefix,
                                     value_head=value_head)
    if policy.value_head is not None:
        policy.value_head.to(torch.float32)  # a small head; float32 keeps the value regression stable in bf16 runs
    disable_dropout(policy)
    return policy


def _load(auto_cls: Any, path: str | Path, dtype: torch.dtype) -> nn.Module:
    from rlhfchat.models import load_model_folder

    return load_model_folder(path, auto_cls, dtype)


class Reference:
    """The frozen SFT model that the KL penalty measures against.

    With LoRA it is the policy itself under `disable_adapter()` (no second copy). With a frozen bottom
    (`num_layers_unfrozen`) and `share_bottom`, it is the policy with a FrozenBranch swapped in. Otherwise a frozen copy
    loaded from the SFT folder (also under ZeRO-3 or FSDP, whose sharded modules cannot be swapped; under ZeRO-3 it is
    loaded partitioned and `prepare(accelerator)` gives it an inference engine). Build it right after the policy,
    before any training step or checkpoint load: the branch copies the weights it finds.
    Not an nn.Module on purpose: it is never trained or checkpointed.
    """

    def __init__(self, policy: PolicyWithValueHead, sft_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, share_bottom: bool = True):
        self.policy = policy
        self.uses_adapter = hasattr(policy.lm, "disable_adapter")
        self.lm = None
        self.branch = None
        partly_frozen = any(not p.requires_grad for p in policy.lm.parameters())
        if not self.uses_adapter and partly_frozen and share_bottom:
            self.branch = FrozenBranch(policy.lm)
        elif not self.uses_adapter:
            from transformers import AutoModelForCausalLM

            if sft_dir is None:
                raise RlhfchatError("a reference model needs the SFT folder when LoRA is off")
            self.lm = _load(AutoModelForCausalLM, sft_dir, dtype)
            self.lm.requires_grad_(False)
            self.lm.eval()
            disable_dropout(self.lm)

    def prepare(self, accelerator: Any) -> "Reference":
        """On the accelerator's device; a frozen copy gets what the launch layout needs (distributed.prepare_frozen)."""
        from rlhfchat.train.distributed import is_partitioned, prepare_frozen

        if self.branch is not None:
            self.branch.to(accelerator.device)
        if self.lm is not None:
            self.lm = prepare_frozen(self.lm if is_partitioned(self.lm) else self.lm.to(accelerator.device),
                                     accelerator)
        return self

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
        """Reference logprobs of the response tokens. (B, P + R) -> (B, R)."""
        from rlhfchat.train.distributed import frozen_forward

        with frozen_forward(self.policy.lm if self.lm is None else self.lm):
            return self._logprobs(input_ids, attention_mask, n_prompt)

    def _logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> torch.Tensor:
        t, share = self.policy.temperature, self.policy.share_prefix
        if self.uses_adapter:
            with self.policy.lm.disable_adapter():
                return response_logprobs(self.policy.lm, input_ids, attention_mask, n_prompt, t, share)
        if self.branch is not None:
            with self.branch.swapped_in():
                return response_logprobs(self.policy.lm, input_ids, attention_mask, n_prompt, t, share)
        return response_logprobs(self.lm, input_ids, attention_mask, n_prompt, t, share)
