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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfchat.errors import RlhfchatError

SOURCES_SFT = ("oasst1", "gpt4all", "alpaca", "gsm8k", "messages")
SOURCES_PREFERENCES = ("oasst1", "hh_rlhf", "shp", "feedback", "preferences")
SOURCES_PROMPTS = ("oasst1", "gpt4all", "alpaca", "hh_rlhf", "shp", "feedback", "gsm8k", "messages", "preferences",
                   "prompts")


@dataclass
class SourceConfig:
    """One published dataset feeding one kind of record (sft, preferences or prompts)."""

    source: str
    """Adapter name (a module of rlhfchat/data/): the published formats oasst1, gpt4all, alpaca, hh_rlhf, shp, gsm8k;
    feedback (`rlhfchat feedback export`); and the standard formats messages (HF/TRL conversational, ShareGPT),
    preferences (TRL's preference formats) and prompts (plain or conversational prompt lists)."""
    path: str
    """A local file or folder (.parquet, .jsonl, .jsonl.gz, .json; folders searched recursively) or a hub id."""
    split: str = "train"
    """Split to read when `path` is a hub id."""
    subset: str | None = None
    """Hub configuration name or data_dir (e.g. `helpful-base` for hh-rlhf, `main` for gsm8k); for a local folder,
    its subfolder of that name when it has one."""
    weight: float = 1.0
    """Sampling weight: above 1 samples with replacement, below 1 subsamples."""
    max_examples: int | None = None
    """Keep at most this many records from this source (after weighting)."""
    langs: list[str] | None = None
    """oasst1: keep only trees whose root message is in one of these languages (e.g. [en])."""
    pairs: Literal["best_vs_rest", "all", "best_vs_worst"] = "best_vs_rest"
    """oasst1 preferences: which ranked replies become pairs."""
    min_score_ratio: float = 2.0
    """shp: skip pairs whose score_ratio is below this."""
    strict: bool = False
    """Make a malformed row an error instead of a counted skip."""
    held_out: bool = False
    """Every record of this source goes to the eval file of its kind, none to train (a published test split: give
    `split: test`). A kind with such a source takes its eval records from them alone: `eval_fraction` holds out
    nothing from its other sources."""


@dataclass
class DataConfig:
    """The data stage: sources -> canonical JSONL records + card.json."""

    eval_fraction: float = 0.05
    """Share of each kind held out for evaluation (0 keeps everything for training)."""
    sft: list[SourceConfig] = field(default_factory=list)
    preferences: list[SourceConfig] = field(default_factory=list)
    prompts: list[SourceConfig] = field(default_factory=list)
    dedupe: bool = True
    """Remove exact duplicates across sources (same messages, or same prompt/chosen/rejected)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise RlhfchatError(f"data.eval_fraction: expected a number in [0, 1), got {self.eval_fraction}")
        for kind, allowed in (("sft", SOURCES_SFT), ("preferences", SOURCES_PREFERENCES), ("prompts", SOURCES_PROMPTS)):
            for i, src in enumerate(getattr(self, kind)):
                if src.source not in allowed:
                    raise RlhfchatError(
                        f"data.{kind}[{i}].source: unknown source {src.source!r}; valid: {', '.join(allowed)}"
                    )
                if src.weight <= 0:
                    raise RlhfchatError(f"data.{kind}[{i}].weight: expected > 0, got {src.weight}")


@dataclass
class TinyModelConfig:
    """Shape of the `tiny` base model: a random-init Llama with a BPE tokenizer trained on the run's data."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512


@dataclass
class BaseConfig:
    model: str = "tiny"
    """A Hugging Face model folder or hub id, or `tiny` (built locally, deterministic)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chat_template: str = "model"
    """The chat format of the whole run (SFT, reward, PPO, eval, serving): `model` keeps the base model's own chat
    template (Vicuna v0 when it has none), `vicuna_v0` is StableVicuna's, or the path of a Jinja template file. The
    SFT folder saves it with its tokenizer; every later stage reads it from there."""


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantize: Literal["4bit"] | None = None
    """QLoRA: `4bit` loads the frozen base in 4-bit NF4 through bitsandbytes (double quantization, bf16 compute)
    and trains the LoRA adapters on top (needs `enabled: true` and `pip install 'rlhfchat[qlora]'`). The saved
    folder is the base reloaded in `base.dtype` with the adapters merged in: an ordinary, unquantized model."""


@dataclass
class TrainerConfig:
    """What the two stages on a Hugging Face Trainer (SFT and reward) share; `train/hf_stage.trainer_args` maps it."""

    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    learning_rate: float = 2e-5
    batch_size: int = 8
    """Per process; the global batch is batch_size x grad_accum x processes."""
    grad_accum: int = 1
    max_length: int = 512
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    save_steps: int = 100
    """Checkpoint every N steps (resume point for an interrupted run)."""
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    report_to: list[str] = field(default_factory=list)
    """Where transformers logs go besides metrics.jsonl: tensorboard, wandb."""


@dataclass
class SFTConfig(TrainerConfig):
    """Supervised fine-tuning through TRL's SFTTrainer, loss on assistant tokens only."""

    packing: bool = False


@dataclass
class RewardConfig(TrainerConfig):
    """Reward model through TRL's RewardTrainer, initialised from the SFT checkpoint."""

    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    center_rewards_coefficient: float | None = None


@dataclass
class PPOConfig:
    """Our PPO, faithful to trlX. Defaults are StableVicuna's published values."""

    num_rollouts: int = 128
    """Samples generated per PPO iteration (trlX method.num_rollouts)."""
    chunk_size: int = 16
    """Prompts per generation batch (trlX method.chunk_size)."""
    ppo_epochs: int = 4
    batch_size: int = 8
    """Minibatch size of the PPO update (trlX train.batch_size)."""
    grad_accum: int = 1
    total_steps: int = 100
    """Optimizer steps overall (trlX train.total_steps), counted as on one process: the run makes as many
    iterations of num_rollouts samples as fit, and the same iterations on any number of processes."""
    epochs: int = 100
    """Upper bound on passes over the prompt set (trlX train.epochs)."""
    learning_rate: float = 1e-6
    weight_decay: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    init_kl_coef: float = 0.1
    target: float | None = 6.0
    """Target KL of the adaptive controller; None uses a fixed KL coefficient."""
    horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    scale_reward: Literal["none", "running", "ref"] | None = None
    """trlX scale_reward: None/none, running (divide by running std), ref (by the reference's score std)."""
    ref_mean: float | None = None
    ref_std: float | None = None
    cliprange_reward: float = 10.0
    whiten_advantages: bool = True
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    stop_sequences: list[str] = field(default_factory=lambda: ["### Human:"])
    max_prompt_length: int = 256
    share_trunk: bool = True
    """The value head rides on the policy's network (one trunk) instead of a separate critic."""
    num_layers_unfrozen: int = -1
    """trlX model.num_layers_unfrozen: -1 trains every layer; N >= 0 freezes the embeddings and all decoder blocks
    but the top N (the final norm and the output layer still train, unless tied to the embeddings; trlX leaves the
    embeddings trainable, freezing them keeps the reference exact). The reference is then the policy's own frozen
    bottom under frozen copies of the top (trlX's hydra): no second whole model (under ZeRO-3 or FSDP it is one
    again), and the update's backward stops at the lowest trainable block. trlX's own examples use 2. Not with
    `lora`; a separate critic (`share_trunk: false`) trains in full."""
    share_prompt_prefix: bool = True
    """The leading tokens every prompt of a batch has in common (the system prompt, the template's opening) go
    through the policy, critic, reference and reward model once per batch, and generation prefills them once; their
    keys and values are shared by the rows. The same results and gradients for less compute. It does not apply to the
    update's forward under gradient checkpointing, or to sliding-window attention. Off: every row computes its whole
    prompt."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward_device: str | None = None
    """Where the reward model lives (e.g. cuda:7, a GPU the training ranks leave free, as StableVicuna's run did);
    None: on each rank's own device."""
    rollout_backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate (the default, CPU or GPU); vllm: a vLLM engine beside each training rank (GPU only,
    `pip install 'rlhfchat[vllm]'`), the policy's weights loaded into it after every update."""
    vllm_gpu_memory_utilization: float = 0.3
    """vllm: the share of each GPU that the engine takes for its weights and KV cache; training has the rest."""
    vllm_sleep: bool = True
    """vllm: drop the engine's weights and KV cache between generations (vLLM sleep mode), so the update gets the
    memory back; the weights return with the sync after each update."""
    save_steps: int = 20
    """Checkpoint every N PPO iterations."""
    eval_prompts: int = 64
    """Held-out prompts scored before and after PPO."""
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_layers_unfrozen < -1:
            raise RlhfchatError(f"ppo.num_layers_unfrozen: expected -1 (all layers) or a number of top layers >= 0, "
                                f"got {self.num_layers_unfrozen}")
        if self.num_layers_unfrozen >= 0 and self.lora.enabled:
            raise RlhfchatError("ppo.num_layers_unfrozen: LoRA already freezes the whole base model; set it to -1 "
                                "with ppo.lora.enabled")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise RlhfchatError(f"ppo.vllm_gpu_memory_utilization: expected a number in (0, 1], "
                                f"got {self.vllm_gpu_memory_utilization}")


@dataclass
class EvalConfig:
    prompts: int = 64
    """Held-out prompts answered by each model for win rate, length and KL."""
    max_new_tokens: int = 64
    tasks: list[str] = field(default_factory=lambda: ["rlhfchat_math", "rlhfchat_code", "rlhfchat_grammar"])
    """lm-eval task names (local task folders shipped with rlhfchat, or any task lm-eval knows when online)."""
    limit: int | None = None
    bootstrap: int = 1000
    models: list[str] = field(default_factory=list)
    """Extra model folders to evaluate beside the run's base, SFT and PPO models."""


@dataclass
class Recipe:
    """A whole run: data -> sft -> reward -> ppo -> eval."""

    name: str = "run"
    output_dir: str | None = None
    """Run folder; default runs/<name>."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise RlhfchatError(f"name: expected a non-empty name without '/', got {self.name!r}")
        if self.output_dir is None:
            self.output_dir = f"runs/{self.name}"
        for stage in ("sft", "reward", "ppo"):
            lora = getattr(self, stage).lora
            if lora.quantize and not lora.enabled:
                raise RlhfchatError(f"{stage}.lora.quantize: a {lora.quantize} base trains only through LoRA "
                                    f"adapters; set {stage}.lora.enabled=true")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


# --------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts to dataclasses, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RlhfchatError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RlhfchatError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RlhfchatError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RlhfchatError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RlhfchatError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RlhfchatError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RlhfchatError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise RlhfchatError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise RlhfchatError(f"{prefix}{key}: unknown key; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RlhfchatError(f"{prefix}{missing[0]}: required key is missing")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _set_dotted(data: dict[str, Any], cls: type, dotted: str, value: Any) -> None:
    """Set `a.b.c=value` in the raw dict, checking each part names a field of the dataclass it walks through."""
    parts = dotted.split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        key = ".".join(parts[: depth + 1])
        hints = typing.get_type_hints(node_cls)
        if part not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(node_cls))
            raise RlhfchatError(f"{key}: unknown key; valid keys: {valid}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if not dataclasses.is_dataclass(tp):
            raise RlhfchatError(f"{key}: is a {_type_name(tp)}, it has no sub-keys")
        child = node.get(part)
        if child is None:
            child = {}
        elif dataclasses.is_dataclass(child):
            child = to_dict(child)
        node[part] = child
        node, node_cls = child, tp


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RlhfchatError(f"override {text!r}: expected key=value (e.g. ppo.init_kl_coef=0.05)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise RlhfchatError(f"override {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return key.strip(), value


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
    for text in overrides:
        key, value = parse_override(text)
        tree: dict[str, Any] = {}
        node = tree
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        _resolve_paths(tree, Path.cwd())
        for part in parents:
            tree = tree[part]
        _set_dotted(data, Recipe, key, tree[last])
    try:
        recipe = from_dict(Recipe, data)
    except RlhfchatError as e:
        raise RlhfchatError(f"{path}: {e}" if path is not None else str(e)) from None
    recipe.output_dir = os.path.abspath(recipe.output_dir)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (all defaults filled in) as YAML."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True)


def config_hash(obj: Any) -> str:
    """A stable hash of a (section of a) recipe: what a stage's manifest compares to decide to skip."""
    blob = json.dumps(to_dict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
