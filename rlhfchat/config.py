"""The recipe: one YAML file mapped onto typed dataclasses, one per stage.

    recipe = load_recipe("recipes/tiny-cpu.yaml", ["ppo.init_kl_coef=0.05", "output_dir=/tmp/x"])

Every YAML key is a dataclass field; a default lives here and nowhere else. `key=value` overrides use dotted paths
and YAML syntax for the value (`data.eval_fraction=0`, `sft.lora.r=8`, `eval.tasks=[a,b]`). An unknown key or a
value of the wrong type is a `RlhfchatError` that names the key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfchat.config_inputs import (  # noqa: F401  (the recipe's sections, re-exported)
    SOURCES_SFT, SOURCES_PREFERENCES, SOURCES_PROMPTS, SourceConfig, DataConfig, TinyModelConfig, BaseConfig)
from rlhfchat.errors import RlhfchatError
from rlhfchat.typed import _set_dotted, from_dict, parse_override, to_dict  # noqa: F401  (the recipe's own API)

def function_path(path: str | None, where: str) -> tuple[str, str]:
    """A `module:function` path split in two; any other form is a one-line error naming `where` (the recipe key)."""
    module, sep, name = (path or "").partition(":")
    if not (sep and module and name):
        raise RlhfchatError(f"{where}: expected module:function (e.g. mypkg.rewards:brevity), got {path!r}")
    return module, name


@dataclass
class LoraConfig:
    """LoRA adapters (peft) for a training stage: only the adapters train; the saved folder has them merged in."""

    enabled: bool = False
    """Train LoRA adapters instead of every weight."""
    r: int = 16
    """The adapters' rank."""
    alpha: int = 32
    """The adapters' scale numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapters' input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters (Llama-style attention projections by default)."""
    quantize: Literal["4bit"] | None = None
    """QLoRA: `4bit` loads the frozen base in 4-bit NF4 through bitsandbytes (double quantization, bf16 compute)
    and trains the LoRA adapters on top (needs `enabled: true` and `pip install 'rlhfchat[qlora]'`). The saved
    folder is the base reloaded in `base.dtype` with the adapters merged in: an ordinary, unquantized model."""


@dataclass
class TrainerConfig:
    """What the stages on a Hugging Face Trainer (SFT, reward, DPO, KTO) share; `train/hf_stage.trainer_args` maps it."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    batch_size: int = 8
    """Per process; the global batch is batch_size x grad_accum x processes."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_length: int = 512
    """Tokens per example; longer ones are truncated."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the learning rate up from 0."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    lr_scheduler: str = "cosine"
    """The learning-rate schedule after warm-up (a transformers scheduler name: cosine, linear, constant, ...)."""
    save_steps: int = 100
    """Checkpoint every N steps (resume point for an interrupted run)."""
    logging_steps: int = 10
    """Write a metrics.jsonl line every N steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward instead of keeping them (less memory, more compute)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA or QLoRA adapters instead of training every weight."""
    report_to: list[str] = field(default_factory=list)
    """Where transformers logs go besides metrics.jsonl: tensorboard, wandb."""


@dataclass
class SFTConfig(TrainerConfig):
    """Supervised fine-tuning through TRL's SFTTrainer, loss on assistant tokens only."""

    packing: bool = False
    """Pack several conversations into each max_length sequence (TRL's packing)."""


@dataclass
class RewardConfig(TrainerConfig):
    """Reward model through TRL's RewardTrainer, initialised from the SFT checkpoint."""

    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    center_rewards_coefficient: float | None = None
    """TRL's auxiliary loss pulling the rewards' mean towards 0 (None: off)."""


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The loss types of TRL 1.16's DPOTrainer (trl/trainer/dpo_config.py)."""


@dataclass
class DPOConfig(TrainerConfig):
    """Direct preference optimisation through TRL's DPOTrainer, from the SFT model, on the preference pairs.

    The reference is the SFT model: a frozen copy, or with `lora` the same weights with the adapters switched off.
    """

    learning_rate: float = 1e-6
    lr_scheduler: str = "linear"
    loss_type: Literal[DPO_LOSSES] = "sigmoid"
    """TRL's DPO loss: sigmoid (the DPO paper's), hinge (SLiC), ipo, robust (with label_smoothing), bco_pair,
    sppo_hard, nca_pair, exo_pair, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, or sft (the plain
    SFT loss on the chosen replies)."""
    beta: float = 0.1
    """How far the policy may move from the reference: the KL weight of the implicit reward (IPO's tau); higher
    keeps it closer."""
    label_smoothing: float = 0.0
    """robust: the assumed share of flipped labels, in [0, 0.5); exo_pair: its epsilon."""
    precompute_ref_log_probs: bool = False
    """Score every pair under the reference once before training, so that no reference is kept in memory."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise RlhfchatError(f"dpo.beta: expected a number above 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise RlhfchatError(f"dpo.label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing}")


@dataclass
class KTOConfig(TrainerConfig):
    """Kahneman-Tversky optimisation through TRL's KTOTrainer, from the SFT model, on unpaired examples.

    Each preference pair gives two examples (the chosen reply desirable, the rejected one undesirable); in
    `rlhfchat iterate`, every thumbed reply gives one. The reference is the SFT model, as for DPO.
    """

    learning_rate: float = 1e-6
    lr_scheduler: str = "linear"
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    """TRL's KTO loss: kto (the KTO paper's, with its batch estimate of the KL term; needs batch_size >= 2) or
    apo_zero_unpaired (APO-zero's unpaired form)."""
    beta: float = 0.1
    """How far the policy may move from the reference; higher keeps it closer."""
    desirable_weight: float = 1.0
    """Weight of the desirable examples' loss; the KTO paper keeps desirable_weight x desirable examples over
    undesirable_weight x undesirable ones between 1 and 4/3."""
    undesirable_weight: float = 1.0
    """Weight of the undesirable examples' loss."""
    precompute_ref_log_probs: bool = False
    """Score every example under the reference once before training, so that no reference is kept in memory."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise RlhfchatError(f"kto.beta: expected a number above 0, got {self.beta}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise RlhfchatError("kto.desirable_weight, kto.undesirable_weight: expected numbers above 0")
        if self.loss_type == "kto" and self.batch_size < 2:
            raise RlhfchatError("kto.batch_size: the kto loss estimates its KL term within a batch; expected 2 or "
                                f"more, got {self.batch_size}")


@dataclass
class IterateConfig:
    """`rlhfchat iterate`: how a round's training data is made from the feedback collected since the last round."""

    feedback_weight: float = 1.0
    """Sampling weight of the new feedback's records, as a data source's `weight`: above 1 repeats them (drawn with
    replacement), below 1 subsamples them."""
    preferences_weight: float = 1.0
    """Sampling weight of the recipe's own preference data (data/preferences.train.jsonl) in each round; 0 trains
    on the feedback alone."""
    min_records: int = 1
    """A round needs at least this many new records (preference pairs, and for KTO thumbed replies); with fewer,
    `rlhfchat iterate` says so and starts no round."""

    def __post_init__(self) -> None:
        if self.feedback_weight <= 0:
            raise RlhfchatError(f"iterate.feedback_weight: expected > 0, got {self.feedback_weight}")
        if self.preferences_weight < 0:
            raise RlhfchatError(f"iterate.preferences_weight: expected >= 0, got {self.preferences_weight}")
        if self.min_records < 1:
            raise RlhfchatError(f"iterate.min_records: expected 1 or more, got {self.min_records}")


@dataclass
class GenerationConfig:
    """How PPO samples its replies (trlX v0.6.0's gen_kwargs; StableVicuna's: top_k 0, top_p 1.0, temperature 1)."""

    max_new_tokens: int = 128
    """Longest reply, in tokens."""
    min_new_tokens: int = 0
    """Shortest reply: EOS is not sampled before this many tokens."""
    top_k: int = 0
    """Sample from the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches p (1.0: all)."""
    temperature: float = 1.0
    """Divide the logits by this before sampling; PPO's logprobs use the same tempered distribution."""
    stop_sequences: list[str] = field(default_factory=lambda: ["### Human:"])
    """Texts that end a reply when the model writes them instead of EOS (cut there, as trlX v0.6.0 does)."""
    max_prompt_length: int = 256
    """Tokens of a prompt the policy sees; longer prompts lose their beginning (the assistant's cue stays)."""


@dataclass
class VLLMConfig:
    """The vLLM rollout backend (`rollout_backend: vllm`, GPU only)."""

    gpu_memory_utilization: float = 0.3
    """The share of each GPU that the engine takes for its weights and KV cache; training has the rest."""
    sleep: bool = True
    """Drop the engine's weights and KV cache between generations (vLLM sleep mode), so the update gets the memory
    back; the weights return with the sync after each update."""

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise RlhfchatError(f"ppo.vllm.gpu_memory_utilization: expected a number in (0, 1], "
                                f"got {self.gpu_memory_utilization}")


@dataclass
class RewardComponentConfig:
    """One term of the RL reward (rlhfchat/train/rewards.py); a reply's reward is the weighted sum of the terms."""

    kind: Literal["reward_model", "math", "function"] = "reward_model"
    """reward_model: the run's reward model's score; math: 1 when the reply's final answer equals the prompt record's
    `reference` (0 when it does not, or the prompt has none); function: a Python function named by `function`."""
    weight: float = 1.0
    """The component's weight in the sum."""
    function: str | None = None
    """kind function: `module:function` (importable), called as f(prompt messages, reply text, prompt record) ->
    float."""
    name: str | None = None
    """The name the component is logged and reported under (default: its kind, or the function's name)."""

    def __post_init__(self) -> None:
        if self.kind == "function" and not self.function:
            raise RlhfchatError("ppo.rewards: a component of kind function needs `function: module:function`")


ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
"""The estimators whose baseline is the other samples of the same prompt (ppo.samples_per_prompt of them)."""


@dataclass
class PPOConfig:
    """Our PPO, faithful to trlX v0.6.0 (the StableVicuna run's version; docs/ppo.md lists every difference and why).
    Defaults are StableVicuna's published values."""

    num_rollouts: int = 128
    """Samples each process generates per PPO iteration (trlX v0.6.0 method.num_rollouts, per process): an iteration
    makes num_rollouts x processes samples."""
    chunk_size: int = 16
    """Prompts per generation batch on each process (trlX v0.6.0 method.chunk_size)."""
    ppo_epochs: int = 4
    """Passes of the update over each iteration's samples."""
    batch_size: int = 8
    """Rows per micro-batch of the PPO update on each process (trlX v0.6.0 train.batch_size, which has no
    accumulation); an optimizer step takes batch_size x grad_accum rows from each process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    total_steps: int = 100
    """Optimizer steps overall (trlX v0.6.0 train.total_steps, where the run stops mid-iteration): the run makes as many
    whole iterations as fit. Every process takes the same steps, so the count does not depend on the number of
    processes."""
    epochs: int = 100
    """Upper bound on passes over the prompt set (each iteration reads num_rollouts x processes prompts). trlX v0.6.0's
    train.epochs bounds the number of iterations instead."""
    learning_rate: float = 1e-6
    """AdamW's learning rate (constant)."""
    weight_decay: float = 1e-6
    """AdamW's weight decay."""
    adam_beta1: float = 0.9
    """AdamW's beta1."""
    adam_beta2: float = 0.95
    """AdamW's beta2."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this before each step (trlX v0.6.0 does not clip; docs/ppo.md)."""
    init_kl_coef: float = 0.1
    """The KL penalty's starting coefficient (beta): each token's reward is -beta x (logp - ref_logp)."""
    target: float | None = 6.0
    """Target KL of the adaptive controller; None uses a fixed KL coefficient."""
    horizon: int = 10000
    """The adaptive controller's horizon: beta moves by error x n_steps / horizon per update (Ziegler et al.)."""
    gamma: float = 1.0
    """GAE's discount."""
    lam: float = 0.95
    """GAE's lambda."""
    cliprange: float = 0.2
    """PPO's clip of the probability ratio, 1 +- cliprange."""
    cliprange_value: float = 0.2
    """Clip of the new values around the old ones in the value loss."""
    vf_coef: float = 1.0
    """Weight of the value loss beside the policy loss."""
    scale_reward: Literal["none", "running", "ref"] | None = None
    """trlX v0.6.0 scale_reward: None/none, running (divide by running std), ref (by the reference's score std)."""
    ref_std: float | None = None
    """scale_reward ref: the std to divide the scores by (None: the std of the first iteration's scores)."""
    cliprange_reward: float = 10.0
    """Clip the reward-model scores to +-this (after scaling)."""
    whiten_advantages: bool = True
    """gae: normalise the advantages to mean 0 and std 1 over each iteration's tokens (over every process), as trlX
    v0.6.0. REINFORCE++ always normalises over the batch; the group estimators normalise within each group instead."""
    rewards: list[RewardComponentConfig] = field(default_factory=lambda: [RewardComponentConfig()])
    """The reward's components, weighted and summed (default: the reward model alone, StableVicuna's). Each is
    logged per step in metrics.jsonl and reported by eval; a run none of whose components is the reward model loads
    none. E.g. [{kind: reward_model}, {kind: math, weight: 2}, {kind: function, function: "mymod:f"}]."""
    advantage_estimator: Literal[ESTIMATORS] = "gae"
    """gae: trlX v0.6.0's PPO, a value head (or critic) and GAE; grpo: each reply's reward normalised by the mean
    and std of its prompt's group (Shao et al. 2024); dr_grpo: centred only (Liu et al. 2025); rloo: minus the mean
    of the group's other replies (Ahmadian et al. 2024); reinforce_pp: REINFORCE++, returns-to-go of the KL-shaped
    reward normalised over the batch (Hu et al. 2025). The critic-free four build no value head and no critic."""
    samples_per_prompt: int = 1
    """Replies sampled for each prompt (the group): num_rollouts is then num_rollouts / samples_per_prompt prompts
    x samples_per_prompt replies per process, and a prompt's group stays on one process. grpo, dr_grpo and rloo
    need 2 or more."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference enters, with the coefficient the controller sets (init_kl_coef, target): reward
    (trlX v0.6.0) puts -beta x (logp - ref_logp) in each token's reward; loss (GRPO) adds beta x the mean of
    k3 = e^(ref - logp) - (ref - logp) - 1 over the tokens to the policy loss, and the reward is the score alone."""
    kl_estimator: Literal["trlx", "k1", "k3"] = "trlx"
    """The per-reply KL that `kl` in the logs holds and the adaptive controller (target) reads, summed over the
    reply's tokens with r = logp - ref_logp: trlx = e^r - 1 - r (trlX v0.6.0's; its mean is chi2 - KL, not a KL,
    and explodes once the policy is sharp: eval/kl.py), k1 = r (unbiased), k3 = e^-r - 1 + r (unbiased, >= 0).
    All three are logged (kl_trlx, kl_k1, kl_k3) whichever is chosen."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How replies are sampled."""
    share_trunk: bool = True
    """The value head rides on the policy's network (one trunk, as trlX v0.6.0 always does) instead of a separate
    critic."""
    value_head: Literal["mlp", "linear"] = "mlp"
    """mlp: trlX v0.6.0's value head, Linear(d, 2d), ReLU, Linear(2d, 1); linear: one Linear(d, 1)."""
    num_layers_unfrozen: int = -1
    """trlX v0.6.0 model.num_layers_unfrozen: -1 trains every layer; N >= 0 freezes the embeddings and all decoder
    blocks but the top N (the final norm and the output layer still train, unless tied to the embeddings; trlX v0.6.0
    leaves the embeddings trainable, freezing them keeps the reference exact). The reference is then the policy's own
    frozen bottom under frozen copies of the top (trlX v0.6.0's hydra): no second whole model (under ZeRO-3 or FSDP it
    is one again), and the update's backward stops at the lowest trainable block. trlX v0.6.0's default PPO config
    uses 2. Not with `lora`; a separate critic (`share_trunk: false`) trains in full."""
    share_prompt_prefix: bool = True
    """The leading tokens every prompt of a batch has in common (the system prompt, the template's opening) go
    through the policy, critic, reference and reward model once per batch, and generation prefills them once; their
    keys and values are shared by the rows. The same results and gradients for less compute. It does not apply to the
    update's forward under gradient checkpointing, or to sliding-window attention. Off: every row computes its whole
    prompt."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the policy (the reference is then the same network with the adapters off)."""
    reward_device: str | None = None
    """Where the reward model lives (e.g. cuda:7, a GPU the training ranks leave free, as StableVicuna's run did);
    None: on each rank's own device."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate (the default, CPU or GPU); vllm: a vLLM engine beside each training rank (GPU only,
    `pip install 'rlhfchat[vllm]'`), the policy's weights loaded into it after every update."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's settings (rollout_backend: vllm)."""
    save_steps: int = 20
    """Checkpoint every N PPO iterations."""
    eval_prompts: int = 64
    """Held-out prompts scored before and after PPO."""
    gradient_checkpointing: bool = False
    """Recompute the policy's activations in the backward instead of keeping them."""
    report_to: list[str] = field(default_factory=list)
    """Trackers besides metrics.jsonl (accelerate's: tensorboard, wandb)."""

    def __post_init__(self) -> None:
        g = self.samples_per_prompt
        if g < 1:
            raise RlhfchatError(f"ppo.samples_per_prompt: expected 1 or more, got {g}")
        if self.num_rollouts % g:
            raise RlhfchatError(f"ppo.num_rollouts: expected a multiple of ppo.samples_per_prompt ({g}), "
                                f"got {self.num_rollouts}")
        if self.advantage_estimator in GROUP_ESTIMATORS and g < 2:
            raise RlhfchatError(f"ppo.samples_per_prompt: {self.advantage_estimator} compares the replies to one "
                                f"prompt; expected 2 or more, got {g}")
        if not self.rewards:
            raise RlhfchatError("ppo.rewards: expected at least one component (reward_model, math or function)")
        for i, c in enumerate(self.rewards):  # the path's form here; the import when the PPO stage starts
            if c.kind == "function":
                function_path(c.function, f"ppo.rewards[{i}].function")
        if self.num_layers_unfrozen < -1:
            raise RlhfchatError(f"ppo.num_layers_unfrozen: expected -1 (all layers) or a number of top layers >= 0, "
                                f"got {self.num_layers_unfrozen}")
        if self.num_layers_unfrozen >= 0 and self.lora.enabled:
            raise RlhfchatError("ppo.num_layers_unfrozen: LoRA already freezes the whole base model; set it to -1 "
                                "with ppo.lora.enabled")

    @property
    def critic_free(self) -> bool:
        """No value head and no critic: every estimator but gae."""
        return self.advantage_estimator != "gae"


@dataclass
class EvalConfig:
    """The eval stage: every model of the run on held-out prompts, lm-eval tasks and exact answers."""

    prompts: int = 64
    """Held-out prompts answered by each model for win rate, length and KL."""
    max_new_tokens: int = 64
    """Longest reply each model writes."""
    tasks: list[str] = field(default_factory=lambda: ["rlhfchat_math", "rlhfchat_code", "rlhfchat_grammar"])
    """lm-eval task names (local task folders shipped with rlhfchat, or any task lm-eval knows when online)."""
    limit: int | None = None
    """Run each lm-eval task on at most this many items (None: all)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the win rates' 95% intervals."""
    models: list[str] = field(default_factory=list)
    """Extra model folders (or hub ids) to evaluate beside the run's base, SFT and PPO (or DPO, KTO) models."""
    win_rates: bool = True
    """Score every reply with the run's reward model (the reward column and the win rates). Under `method: dpo` or
    `kto` the reward stage then runs for this alone; false leaves it and the reward scores out."""
    judge: str | None = None
    """A second judge: a reward model folder or hub id independent of the run (one label, as a reward stage
    writes). Its scores and win rates are reported beside those of the run's own reward model, which the policy was
    trained against (PPO), or which shares its training data (DPO, KTO), and so cannot judge it impartially."""


METHODS = ("ppo", "dpo", "kto")


@dataclass
class Recipe:
    """A whole run: data -> sft -> reward -> ppo -> eval (or data -> sft -> dpo|kto -> eval)."""

    name: str = "run"
    """The run's name (the default run folder is runs/<name>)."""
    output_dir: str | None = None
    """Run folder; default runs/<name>."""
    seed: int = 0
    """Seed of every random draw of the run (data splits, initialisation, sampling)."""
    method: Literal[METHODS] = "ppo"
    """How the policy learns from preferences after SFT: ppo (a reward model, then PPO against it: StableVicuna's
    recipe), dpo or kto (TRL's DPOTrainer / KTOTrainer on the preference data directly; the reward model is still
    trained when `eval.win_rates` needs it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data stage."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """The base model and chat format."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """The reward model."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO and its critic-free siblings (method: ppo)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO (method: dpo)."""
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO (method: kto)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and the report."""
    iterate: IterateConfig = field(default_factory=IterateConfig)
    """`rlhfchat iterate`: rounds from collected feedback."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise RlhfchatError(f"name: expected a non-empty name without '/', got {self.name!r}")
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        for stage in ("sft", "reward", "ppo", "dpo", "kto"):
            lora = getattr(self, stage).lora
            if lora.quantize and not lora.enabled:
                raise RlhfchatError(f"{stage}.lora.quantize: a {lora.quantize} base trains only through LoRA "
                                    f"adapters; set {stage}.lora.enabled=true")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def _local_or_hub(base: Path, value: str) -> str:
    """A recipe's path, absolute: relative to `base` where it is there or cannot be a hub id, else left (a hub id)."""
    import os

    from rlhfchat.data.readers import _looks_local

    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if (base / p).exists() or _looks_local(value):
        return os.path.abspath(base / p)
    return value


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the paths of a raw recipe dict absolute against `base`: output_dir, base.model, base.chat_template,
    every data source's path and eval.models (model and data entries that are hub ids stay as they are)."""
    import os

    if isinstance(data.get("output_dir"), str):
        data["output_dir"] = os.path.abspath(base / Path(data["output_dir"]).expanduser())
    section = data.get("base")
    if isinstance(section, dict):
        for key in ("model", "chat_template"):
            if isinstance(section.get(key), str):
                section[key] = _local_or_hub(base, section[key])
    section = data.get("data")
    if isinstance(section, dict):
        for kind in ("sft", "preferences", "prompts"):
            for src in section.get(kind) or []:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    src["path"] = _local_or_hub(base, src["path"])
    section = data.get("eval")
    if isinstance(section, dict) and isinstance(section.get("models"), list):
        section["models"] = [_local_or_hub(base, m) if isinstance(m, str) else m for m in section["models"]]
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or start from defaults when `path` is None) and apply `key=value` overrides.

    Relative paths in the file are taken from the recipe file's folder, those in overrides from the current folder,
    and the recipe comes back with them absolute (a default output_dir, runs/<name>, is in the current folder), so
    the run folder's saved recipe works from anywhere. Hub ids stay as they are.
    """
    import os

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            found = sorted(p.name for p in path.glob("*.yaml"))
            names = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise RlhfchatError(f"{path}: a folder; expected a recipe file" + (f" (here: {names})" if found else ""))
        if not path.is_file():
            raise RlhfchatError(f"{path}: recipe file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise RlhfchatError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RlhfchatError(f"{path}: expected a mapping of recipe keys at the top level")
        data = _resolve_paths(loaded, path.resolve().parent)
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        keys.append(key)
        tree: dict[str, Any] = {}
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        _resolve_paths(tree, Path.cwd())
        for part in parents:
            tree = tree[part]
        try:
            _set_dotted(data, Recipe, key, tree[last])
        except RlhfchatError as e:
            raise RlhfchatError(f"override {text}: {e}") from None
    try:
        recipe = from_dict(Recipe, data)
    except RlhfchatError as e:  # named after what set the field: an override, else the file
        field = str(e).split(":", 1)[0]
        hit = [t for k, t in zip(keys, overrides) if field == k or field.startswith((k + ".", k + "["))]
        if hit:
            raise RlhfchatError(f"override {hit[-1]}: {e}") from None
        where = str(path) if path is not None else ""
        if overrides:
            where += (" with " if where else "") + "overrides " + " ".join(overrides)
        raise RlhfchatError(f"{where}: {e}" if where else str(e)) from None
    recipe.output_dir = os.path.abspath(recipe.output_dir)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (all defaults filled in) as YAML."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def config_hash(obj: Any) -> str:
    """A stable hash of a (section of a) recipe: what a stage's manifest compares to decide to skip."""
    blob = json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
