"""`rlhfchat ppo RECIPE.yaml`: PPO against the reward model, KL-penalised to the SFT model (trlX v0.6.0's algorithm;
docs/ppo.md lists where it differs and why).

    rlhfchat ppo recipes/tiny-cpu.yaml ppo.total_steps=16
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m rlhfchat ppo recipes/stablevicuna-13b.yaml

Reads  <run>/sft/ (policy and reference), <run>/reward/, <run>/data/prompts.{train,eval}.jsonl.
Writes <run>/ppo/: the policy as a HF causal-LM folder + tokenizer, value_head.safetensors, metrics.json
(held-out reward before and after, final KL, steps, wall time), metrics.jsonl (one line per iteration) and
checkpoints/ (the latest one; a rerun after a crash or a kill resumes from it and ends at the same step).

Each iteration ("step" in the logs) does, on every process, as trlX v0.6.0:
  1. generate   num_rollouts replies, chunk_size prompts at a time (left-padded, cut at stop sequences)
  2. score      the reward model on (prompt, reply); scale (none / running / ref) and clip to +-cliprange_reward
  3. forward    old logprobs, values, entropy from the hidden states generation computed (only the output layer
                and value head run again); reference logprobs (a frozen copy, the policy with LoRA disabled, or
                with num_layers_unfrozen the policy with frozen copies of its trained top swapped in)
  4. advantages per-token reward -kl_coef * (logp - ref_logp), score on the last real token; GAE; whitening
  5. update     ppo_epochs over shuffled minibatches of batch_size x grad_accum; clipped policy and value losses;
                one optimizer step per minibatch; the KL controller moves once per minibatch of the first epoch,
                n_steps = batch_size x grad_accum (trlX v0.6.0's post_backward_callback, with its train.batch_size)
  6. log        metrics.jsonl and the progress bar; a checkpoint every save_steps iterations and at the end
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlhfchat.atomic import atomic_file, write_json
from rlhfchat.config import PPOConfig, Recipe
from rlhfchat.data.chat_format import Prompt
from rlhfchat.errors import RlhfchatError
from rlhfchat.train import ppo_math as pm
from rlhfchat.train.experience import Experience, merge
from rlhfchat.train.policy import PolicyWithValueHead, Reference, build_policy
from rlhfchat.train.ppo_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rlhfchat.train.reward import RewardScorer
from rlhfchat.decoding import GenerationSettings, encode_prompt, generate_replies
from rlhfchat.train.rewards import Rewards, check_functions, needs_reward_model
from rlhfchat.train.rollout import check_backend, generate_rollout
from rlhfchat.train.runtime import Runtime


class PPO:
    """The models, the optimizer and the PPO state; `make_experience` is steps 1-4, `update` is step 5."""

    def __init__(self, policy: PolicyWithValueHead, reference: Reference, scorer: RewardScorer | None, tokenizer: Any,
                 cfg: PPOConfig, runtime: Runtime | None = None, vllm: Any = None):
        self.cfg = cfg
        self.rt = runtime or Runtime.start()
        self.accelerator = self.rt.accelerator
        self.tokenizer = tokenizer
        self.settings = GenerationSettings.from_ppo(cfg, tokenizer)  # with the chat template's end-of-turn tokens
        self.policy, self.optimizer = self.rt.prepare_training(policy, cfg)
        self.unwrapped: PolicyWithValueHead = self.rt.unwrap(self.policy)
        self.policy.eval()  # train() only inside update(); dropout is off either way
        self.reference = self.rt.prepare_frozen_reference(reference)
        self.scorer = scorer  # the reward model; None when no component of ppo.rewards is one
        if scorer is not None:
            scorer.model = self.rt.prepare_frozen(scorer.model, device=cfg.reward_device)  # reward_device: a GPU
        self.rewards = Rewards(cfg.rewards, scorer)
        self.kl_ctl = (pm.AdaptiveKLController(cfg.init_kl_coef, cfg.target, cfg.horizon) if cfg.target is not None
                       else pm.FixedKLController(cfg.init_kl_coef))
        self.moments = pm.RunningMoments()
        self.ref_std = cfg.ref_std
        self.mean_kl = 0.0
        self.optimizer_steps = 0
        self.vllm = vllm  # rollout_vllm.VLLMRollouts for ppo.rollout_backend=vllm; None: HF generate on the policy

    @classmethod
    def from_folders(cls, policy_dir: str | Path, reward_dir: str | Path | None, cfg: PPOConfig,
                     runtime: Runtime | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                     reward_max_length: int | None = None) -> "PPO":
        """The policy (and reference) from `policy_dir`, the reward model from `reward_dir` where a component of
        cfg.rewards needs it (else it is not loaded, and reward_dir may be None)."""
        from rlhfchat.models import load_tokenizer

        rt = runtime or Runtime.start()
        # Under bf16 mixed precision the frozen networks (reference, reward) hold bf16 weights: autocast would
        # cast them to bf16 on every forward anyway. The policy keeps `dtype` weights for the optimizer.
        frozen_dtype = torch.bfloat16 if rt.accelerator.mixed_precision == "bf16" else dtype
        tokenizer = load_tokenizer(policy_dir)
        policy = rt.prepare_policy(build_policy(
            policy_dir, share_trunk=cfg.share_trunk, lora=cfg.lora, dtype=dtype, temperature=cfg.generation.temperature,
            seed=seed, gradient_checkpointing=cfg.gradient_checkpointing, share_prefix=cfg.share_prompt_prefix,
            num_layers_unfrozen=cfg.num_layers_unfrozen, value_head=None if cfg.critic_free else cfg.value_head))
        reference = Reference(policy, policy_dir, dtype=frozen_dtype, share_bottom=not rt.sharded)
        scorer = None
        if needs_reward_model(cfg.rewards):
            if reward_dir is None:
                raise RlhfchatError("ppo.rewards: a reward_model component needs the run's reward model")
            with rt.loading_whole(bool(cfg.reward_device)):  # a reward model outside DeepSpeed is loaded whole
                scorer = RewardScorer(reward_dir, max_length=reward_max_length, dtype=frozen_dtype,
                                      batch_size=cfg.chunk_size, share_prefix=cfg.share_prompt_prefix)
        vllm = None
        if cfg.rollout_backend == "vllm":
            from rlhfchat.train.rollout_vllm import VLLMRollouts

            vllm = VLLMRollouts(policy_dir, cfg, rt.accelerator, dtype=str(dtype).removeprefix("torch."), seed=seed)
        return cls(policy, reference, scorer, tokenizer, cfg, rt, vllm)

    def sync_rollout_weights(self) -> None:
        """vLLM backend: load the policy's current weights into the engine (after every update; on every rank)."""
        if self.vllm is not None:
            with self.rt.whole(self.policy) as policy:
                self.vllm.sync_weights(policy.lm)

    # ---------------------------------------------------------------------------------------------------------
    def make_experience(self, prompts: Sequence[Prompt | dict], seeds: Sequence[int] | None = None
                        ) -> tuple[Experience, dict[str, float]]:
        """Steps 1-4 for one iteration's prompts (this process's share): samples_per_prompt replies to each.

        `prompts`: canonical prompt records (dicts with a `prompt`; the reward components read the whole record, e.g.
        its `reference`) or bare prompts. The samples are the prompts in order, each repeated samples_per_prompt
        times in a row (a group). `seeds` (one per sample) make each reply depend only on its prompt and its seed, not
        on which process or batch it is generated in: n processes then sample what one process samples.
        """
        cfg, device, policy = self.cfg, self.rt.device, self.unwrapped
        g = cfg.samples_per_prompt
        records = [rec for p in prompts for rec in [p if isinstance(p, dict) else {"prompt": p}] * g]
        if seeds is not None and len(seeds) != len(records):
            raise ValueError(f"make_experience: {len(seeds)} seeds for {len(prompts)} prompts x {g} samples")
        chunks, parts, times = [], [], {"gen_s": 0.0, "score_s": 0.0, "forward_s": 0.0}
        for start in range(0, len(records), cfg.chunk_size):
            batch_records = records[start : start + cfg.chunk_size]
            batch = [rec["prompt"] for rec in batch_records]
            batch_seeds = None if seeds is None else list(seeds[start : start + cfg.chunk_size])
            # 1. generate: left-padded prompts, sampled replies cut at stop sequences
            t0 = time.perf_counter()
            ids = [encode_prompt(self.tokenizer, p, cfg.generation.max_prompt_length) for p in batch]
            if self.vllm is not None:
                rollout = self.vllm.generate(ids, self.settings, device, seeds=batch_seeds)
            else:
                with self.rt.generation(self.policy) as lm:
                    rollout = generate_rollout(lm, self.tokenizer, ids, self.settings, cfg.rollout_backend, device,
                                               capture=True, seeds=batch_seeds)
            t1 = time.perf_counter()
            # 2. score: each component of ppo.rewards (the reward model reads the rendered conversation, the checks
            #    the reply's text and the prompt record)
            with self.rt.autocast():
                scores, chunk_parts = self.rewards.score(batch, rollout.texts, batch_records)
            scores = scores.to(device)
            parts.append(chunk_parts)
            t2 = time.perf_counter()
            # 3. forward: old logprobs, values (gae), entropy from the hidden states generation computed (no second
            #    pass through the trunk); the reference's logprobs (a frozen copy, the policy with LoRA disabled,
            #    or its frozen bottom under copies of the trained top)
            input_ids, attention_mask, n_prompt = rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1]
            with self.rt.inference(policy):
                if rollout.hidden is not None:
                    out = policy.from_generation(rollout.hidden, input_ids, attention_mask, n_prompt)
                else:
                    out = policy(input_ids, attention_mask, n_prompt, with_entropy=True)
                ref_logprobs = self.reference.logprobs(input_ids, attention_mask, n_prompt)
            mask = rollout.response_mask.float()
            # inference tensors cannot enter autograd later: clone them out of inference mode
            values = None if out.values is None else out.values.clone() * mask
            chunks.append(Experience(input_ids.clone(), attention_mask.clone(), n_prompt, mask, out.logprobs.clone(),
                                     ref_logprobs.clone(), values, scores, out.entropy.clone()))
            times["gen_s"] += t1 - t0
            times["score_s"] += t2 - t1
            times["forward_s"] += time.perf_counter() - t2
        exp = merge(chunks, self.tokenizer.pad_token_id)
        components = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

        # 2b. scale and clip the scores (trlX v0.6.0: running moments over every score seen, then the clip)
        all_scores = self.rt.gather(exp.scores)
        self.moments.update(all_scores)
        if self.ref_std is None:
            self.ref_std = float(all_scores.std()) if all_scores.numel() > 1 else 1.0
        scores = pm.scale_scores(exp.scores, self.cfg.scale_reward, self.moments.std, self.ref_std)
        scores = pm.clip_scores(scores, cfg.cliprange_reward)

        # 4. rewards and advantages over the whole rollout (normalised over every process's tokens, or per group:
        #    a group is on one process)
        kls = {name: self.rt.gather(v).mean() for name, v in pm.sequence_kls(exp.logprobs, exp.ref_logprobs,
                                                                              exp.mask).items()}
        self.mean_kl = float(kls[cfg.kl_estimator])
        beta = self.kl_ctl.value if cfg.kl_penalty == "reward" else 0.0  # else a loss term (minibatch_gradients)
        if cfg.critic_free:
            exp.rewards, exp.advantages = pm.critic_free_advantages(
                cfg.advantage_estimator, scores, exp.logprobs, exp.ref_logprobs, exp.mask, beta, g, cfg.gamma,
                all_reduce=self.rt.all_reduce)
        else:
            exp.rewards = pm.kl_penalty_rewards(exp.logprobs, exp.ref_logprobs, scores, exp.mask, beta)
            exp.advantages, exp.returns = pm.gae(exp.values, exp.rewards, exp.mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                exp.advantages = pm.whiten(exp.advantages, exp.mask, all_reduce=self.rt.all_reduce)
        # logged means over every process's samples and tokens
        flat = exp.scores.reshape(-1, g)
        sums = self.rt.all_reduce(torch.stack([
            exp.mask.sum(), torch.tensor(float(exp.mask.shape[0]), device=exp.mask.device),
            pm.masked_sum(exp.entropy, exp.mask), (flat == flat[:, :1]).all(dim=1).sum().to(exp.mask.dtype),
            *([pm.masked_sum(exp.returns, exp.mask), pm.masked_sum(exp.values, exp.mask)] if exp.values is not None
              else [])]).double()).tolist()
        n_tok = max(sums[0], 1.0)
        stats = {
            "score": float(all_scores.mean()), "score_std": float(all_scores.std()) if all_scores.numel() > 1 else 0.0,
            **{f"rewards/{name}": float(self.rt.gather(v.to(device)).mean()) for name, v in components.items()},
            "kl": self.mean_kl, **{f"kl_{name}": float(v) for name, v in kls.items()}, "kl_coef": self.kl_ctl.value,
            "response_len": sums[0] / sums[1], "entropy": sums[2] / n_tok,
            **({"returns": sums[4] / n_tok, "values": sums[5] / n_tok} if exp.values is not None else {}),
            **({"groups_without_signal": sums[3] / (sums[1] / g)} if g > 1 else {}), **times,
        }
        return exp, stats

    # ---------------------------------------------------------------------------------------------------------
    def minibatch_gradients(self, exp: Experience, idx: torch.Tensor) -> dict[str, float]:
        """Accumulate the gradient of one minibatch (rows `idx`) in micro-batches of cfg.batch_size.

        Every micro-batch divides by the minibatch's token count, so the accumulated gradient equals the gradient
        of the whole minibatch in one forward. With n processes that count is the token count of every process's
        minibatch over n: DDP (and DeepSpeed) average the n gradients, which gives the gradient of the global
        minibatch's mean. Only the last micro-batch synchronises (Runtime.micro_batch): one step per minibatch.
        """
        cfg = self.cfg
        n_tokens = (self.rt.all_reduce(exp.mask[idx].sum()) / self.rt.processes).clamp(min=1)
        micro = list(idx.split(cfg.batch_size))
        sums: dict[str, float] = {}
        for i, rows in enumerate(micro):
            mb = exp.select(rows)
            with self.rt.micro_batch(self.policy, self.optimizer, last=i == len(micro) - 1):
                out = self.policy(mb.input_ids, mb.attention_mask, mb.n_prompt, with_values=not cfg.critic_free)
                pg, clipfrac, approx_kl = pm.policy_loss(out.logprobs, mb.logprobs, mb.advantages, mb.mask,
                                                         cfg.cliprange, n_tokens)
                loss, terms = pg, {"policy_loss": pg, "clipfrac": clipfrac, "approx_kl": approx_kl}
                if not cfg.critic_free:
                    vf, vf_clipfrac = pm.value_loss(out.values, mb.values, mb.returns, mb.mask, cfg.cliprange_value,
                                                    n_tokens)
                    loss = loss + cfg.vf_coef * vf
                    terms.update(value_loss=vf, value_clipfrac=vf_clipfrac)
                if cfg.kl_penalty == "loss":  # GRPO: beta x k3 against the reference, in the loss
                    kl = pm.kl_loss(out.logprobs, mb.ref_logprobs, mb.mask, n_tokens)
                    loss = loss + self.kl_ctl.value * kl
                    terms["kl_loss"] = kl
                self.rt.backward(loss)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        return sums

    def update(self, exp: Experience) -> dict[str, float]:
        """Step 5: ppo_epochs over shuffled minibatches; one optimizer step per minibatch.

        The KL controller moves as trlX v0.6.0's does: once per minibatch of the rollout with n_steps = trlX's
        train.batch_size, the rows of one process's minibatch (v0.6.0 takes its ppo_epochs steps on each minibatch
        in turn and updates the controller after them; here the epochs go over reshuffled minibatches, and the
        controller moves once per minibatch of the first epoch, with the same KL measured at generation). About
        num_rollouts steps per iteration on any number of processes.
        """
        cfg = self.cfg
        self.policy.train()
        n = exp.input_ids.shape[0]
        minibatch = cfg.batch_size * cfg.grad_accum
        totals: dict[str, float] = {}
        count = 0
        for epoch in range(cfg.ppo_epochs):
            for idx in torch.randperm(n).split(minibatch):
                stats = self.minibatch_gradients(exp, idx)
                stats["grad_norm"] = self.optimizer.step()  # clipped to max_grad_norm; the norm before the clip
                self.optimizer.zero_grad()
                self.optimizer_steps += 1
                if epoch == 0:
                    self.kl_ctl.update(self.mean_kl, n_steps=minibatch)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        self.policy.eval()
        means = {key: value / max(count, 1) for key, value in totals.items()}
        if self.rt.processes > 1:  # each process's loss is its tokens' part of the global mean x n
            keys = [k for k in means if k != "grad_norm"]  # the norm is of the synchronised gradient already
            summed = self.rt.all_reduce(torch.tensor([means[k] for k in keys], dtype=torch.float64,
                                                     device=self.rt.device)).tolist()
            means.update({k: v / self.rt.processes for k, v in zip(keys, summed)})
        return means

    # ---------------------------------------------------------------------------------------------------------
    def evaluate(self, prompts: Sequence[Prompt | dict], seed: int) -> dict[str, Any]:
        """Mean and std of the reward (ppo.rewards' weighted sum) of sampled replies to held-out prompts (records or
        bare prompts), and each component's mean (`rewards`); every process calls it.

        The processes share the prompts; each reply has its own seed (the global RNG, and so training, is not
        touched), so the figures do not depend on the number of processes.
        """
        if not prompts:
            return {"reward": None, "reward_std": None, "response_len": None, "rewards": {}}
        records = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
        from accelerate.utils import gather_object

        rt = self.rt
        share = list(range(rt.rank, len(prompts), rt.processes))
        if rt.zero == 3:  # every rank runs the same forwards of the partitioned networks; the extra rows drop out
            share += [0] * (math.ceil(len(prompts) / rt.processes) - len(share))
        mine = [records[i]["prompt"] for i in share]
        with rt.generation(self.policy) as lm:
            replies = [r.text for r in generate_replies(
                lm, self.tokenizer, mine, self.settings, batch_size=self.cfg.chunk_size,
                max_prompt_length=self.cfg.generation.max_prompt_length, seeds=[seed * 1_000_003 + i for i in share])]
        with rt.autocast():
            total, parts = self.rewards.score(mine, replies, [records[i] for i in share])
        rows = [(i, s, len(self.tokenizer(r).input_ids), {k: float(v[j]) for k, v in parts.items()})
                for j, (i, s, r) in enumerate(zip(share, total.tolist(), replies))]
        rows = rows[: len(range(rt.rank, len(prompts), rt.processes))]
        rows = sorted(gather_object(rows) if rt.processes > 1 else rows, key=lambda row: row[0])
        all_scores = torch.tensor([s for _, s, _, _ in rows], dtype=torch.float64)
        return {"reward": float(all_scores.mean()),
                "reward_std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
                "response_len": float(np.mean([n for _, _, n, _ in rows])),
                "rewards": {k: float(np.mean([c[k] for _, _, _, c in rows])) for k in rows[0][3]}}

    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict(), "ref_std": self.ref_std,
                "mean_kl": self.mean_kl, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
        self.ref_std, self.mean_kl = state["ref_std"], state["mean_kl"]
        self.optimizer_steps = state["optimizer_steps"]

    def trainable_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(name, parameter) of everything that trains (LoRA adapters or the whole network, value head, critic)."""
        return [(n, p) for n, p in self.unwrapped.named_parameters() if p.requires_grad]

    def save_checkpoint(self, root: Path, step: int, extra: dict[str, Any]) -> None:
        """Checkpoint `step` under `root` (ppo_checkpoint): weights, optimizer, this object's state and `extra`."""
        save_checkpoint(root, step, self.accelerator, self.trainable_parameters(), self.optimizer.optimizer,
                        {"ppo": self.state_dict(), **extra})

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore a checkpoint (before the first update); returns its state.json."""
        state = load_checkpoint(path, self.accelerator, self.trainable_parameters(), self.optimizer.optimizer)
        self.load_state_dict(state["ppo"])
        return state


class PromptSampler:
    """Endless shuffled passes over the prompt set, reproducible from (seed, epoch, position)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            take = order[self.pos : self.pos + k - len(out)]
            out.extend(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


def plan_iterations(cfg: PPOConfig, n_prompts: int, n_processes: int = 1) -> tuple[int, int]:
    """(iterations, optimizer steps per iteration): as many whole iterations as fit in total_steps, at most
    `epochs` passes over the prompts (an iteration reads num_rollouts x n_processes / samples_per_prompt of them), at
    least one.

    Every process generates num_rollouts samples and takes the same optimizer steps (trlX v0.6.0), so the steps per
    iteration do not depend on the number of processes."""
    steps_per_iter = cfg.ppo_epochs * math.ceil(cfg.num_rollouts / (cfg.batch_size * cfg.grad_accum))
    iterations = max(1, cfg.total_steps // steps_per_iter)
    prompts_per_iter = cfg.num_rollouts * n_processes // cfg.samples_per_prompt
    iterations = min(iterations, max(1, cfg.epochs * n_prompts // prompts_per_iter))
    return iterations, steps_per_iter


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompt records (id, source, prompt and, where the data has one, reference): the rewards read them whole."""
    from rlhfchat.data.schema import read_jsonl

    return list(read_jsonl(path, "prompts"))


# -------------------------------------------------------------------------------------------------------------


def main(recipe: Recipe) -> dict[str, Any]:
    """The PPO stage (rlhfchat/stage.py: skipped when done, resumed from its last checkpoint); returns its metrics.
    The reward model is an input only where a component of ppo.rewards is one."""
    from rlhfchat import stage

    run, data = recipe.run_dir, recipe.run_dir / "data"
    reward = [run / "reward"] if needs_reward_model(recipe.ppo.rewards) else []
    return stage.run(recipe, "ppo", inputs=[run / "sft", *reward, data / "prompts.train.jsonl",
                                            data / "prompts.eval.jsonl"], optional=[data / "prompts.eval.jsonl"],
                     config={"ppo": recipe.ppo, "seed": recipe.seed},
                     body=lambda m: m.update(resumed_from_step=train(recipe).get("resumed_from_step")))


def train(recipe: Recipe) -> dict[str, Any]:
    """Run (or resume) PPO; returns what it writes to <run>/ppo/metrics.json (on rank 0; {} on the others)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from rlhfchat.models import folder_dtype, torch_dtype

    cfg, run = recipe.ppo, recipe.run_dir
    check_backend(cfg.rollout_backend)
    out_dir, ckpt_root = run / "ppo", run / "ppo" / "checkpoints"
    # without GPUs, `accelerate launch` ranks run over gloo on the CPU (DDP, or DeepSpeed under a DeepSpeed config)
    rt = Runtime.start(log_with=cfg.report_to or None, project_dir=str(out_dir))
    accelerator = rt.accelerator
    set_seed(recipe.seed)
    train_prompts = _read_prompts(run / "data" / "prompts.train.jsonl")
    eval_path = run / "data" / "prompts.eval.jsonl"
    eval_prompts = _read_prompts(eval_path)[: cfg.eval_prompts] if eval_path.is_file() else []
    if not train_prompts:
        raise RlhfchatError(f"{run / 'data' / 'prompts.train.jsonl'}: no prompts")
    check_functions(cfg.rewards)  # a bad module:function fails here, before any model is loaded

    # the policy in the dtype the SFT folder holds; the reward model reads texts as it was trained to (scoring.json)
    ppo = PPO.from_folders(run / "sft", run / "reward" if needs_reward_model(cfg.rewards) else None, cfg, rt,
                           dtype=torch_dtype(folder_dtype(run / "sft")), seed=recipe.seed)
    # Iterations (num_rollouts samples on each rank, as trlX v0.6.0) are the unit of progress: every rank takes the
    # same optimizer steps in each, so a checkpoint resumes on any number of ranks (an iteration then reads
    # num_rollouts x ranks prompts).
    iterations, steps_per_iter = plan_iterations(cfg, len(train_prompts), accelerator.num_processes)
    n_samples = cfg.num_rollouts * accelerator.num_processes  # per iteration, over every rank
    group = cfg.samples_per_prompt
    n_iter_prompts = n_samples // group  # each answered `group` times, the group on one rank
    sampler = PromptSampler(len(train_prompts), recipe.seed)
    metrics_path = out_dir / "metrics.jsonl"

    # Resume from the latest checkpoint, or start and measure the SFT policy on the held-out prompts.
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is not None:
        state = ppo.load_checkpoint(ckpt)
        sampler.load_state_dict(state["sampler"])
        start, before, elapsed = state["step"], state["eval_before"], state["wall_time_s"]
        if accelerator.is_main_process:  # drop lines logged after the checkpoint: they will be logged again
            lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
            with atomic_file(metrics_path) as f:
                f.writelines(line + "\n" for line in lines if json.loads(line)["step"] <= start)
        accelerator.print(f"[ppo] resuming from {ckpt} (step {start} of {iterations})")
    else:
        start, elapsed = 0, 0.0
        before = ppo.evaluate(eval_prompts, recipe.seed)
        if accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(metrics_path) as f:
                pass
    if cfg.report_to:
        accelerator.init_trackers("rlhfchat-ppo", config={k: v for k, v in vars(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})

    ppo.sync_rollout_weights()  # vLLM: the engine starts from the SFT folder (or asleep); a resumed policy differs
    t_start = time.perf_counter()
    bar = tqdm(range(start, iterations), initial=start, total=iterations, desc="ppo",
               disable=not accelerator.is_local_main_process)
    stats: dict[str, Any] = {}
    with rt.loop():
        for step in bar:
            t0 = time.perf_counter()
            # this process's share of the iteration's prompts (whole groups); each sample's seed depends only on its
            # place in the iteration, so any number of processes samples the same replies
            share = range(accelerator.process_index, n_iter_prompts, accelerator.num_processes)
            order = sampler.next(n_iter_prompts)
            seeds = [(recipe.seed * 1_000_003 + step) * n_samples + j * group + k for j in share for k in range(group)]
            exp, rollout_stats = ppo.make_experience([train_prompts[order[j]] for j in share], seeds)  # steps 1-4
            t1 = time.perf_counter()
            update_stats = ppo.update(exp)  # step 5
            ppo.sync_rollout_weights()
            # 6. log and checkpoint
            stats = {"step": step + 1, "optimizer_steps": ppo.optimizer_steps, **rollout_stats, **update_stats,
                     "train_s": time.perf_counter() - t1, "iteration_s": time.perf_counter() - t0}
            stats = {k: round(v, 6) if isinstance(v, float) else v for k, v in stats.items()}
            if accelerator.is_main_process:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(stats) + "\n")
            if cfg.report_to:
                accelerator.log(stats, step=step + 1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", pg=f"{stats['policy_loss']:.3f}",
                            **({"vf": f"{stats['value_loss']:.3f}"} if "value_loss" in stats else {}))
            if (step + 1) % cfg.save_steps == 0 or step + 1 == iterations:
                ppo.save_checkpoint(ckpt_root, step + 1, {
                    "sampler": sampler.state_dict(), "eval_before": before,
                    "wall_time_s": elapsed + time.perf_counter() - t_start,
                })
        bar.close()

    # The PPO policy on the same held-out prompts, then the model folder.
    metrics: dict[str, Any] = {}
    after = ppo.evaluate(eval_prompts, recipe.seed)
    if accelerator.is_main_process:
        last = stats or (json.loads(metrics_path.read_text().splitlines()[-1]) if metrics_path.is_file() else {})
        metrics = {
            "eval_reward_before": before["reward"], "eval_reward_after": after["reward"],
            "eval_reward_std_before": before["reward_std"], "eval_reward_std_after": after["reward_std"],
            "eval_response_len_before": before["response_len"], "eval_response_len_after": after["response_len"],
            "eval_rewards_before": before.get("rewards"), "eval_rewards_after": after.get("rewards"),
            "eval_prompts": len(eval_prompts), "kl": last.get("kl"), "kl_estimator": cfg.kl_estimator,
            "kl_k1": last.get("kl_k1"), "kl_coef": ppo.kl_ctl.value, "advantage_estimator": cfg.advantage_estimator,
            "steps": iterations, "optimizer_steps": ppo.optimizer_steps, "steps_per_iteration": steps_per_iter,
            "samples": iterations * n_samples, "resumed_from_step": start or None,
            "wall_time_s": round(elapsed + time.perf_counter() - t_start, 2),
        }
    with rt.whole(ppo.policy) as policy:  # ZeRO-3: whole weights to save (every rank gathers)
        if accelerator.is_main_process:
            policy.save_pretrained(out_dir)
            ppo.tokenizer.save_pretrained(out_dir)
            write_json(out_dir / "metrics.json", metrics)
    if accelerator.is_main_process:
        r0, r1, kl = (f"{x:.4g}" if isinstance(x, float) else x for x in (before["reward"], after["reward"],
                                                                           metrics["kl"]))
        accelerator.print(f"[ppo] held-out reward {r0} -> {r1}; KL {kl}; {iterations} steps; model in {out_dir}")
    accelerator.wait_for_everyone()
    if cfg.report_to:
        accelerator.end_training()
    return metrics


if __name__ == "__main__":
    from rlhfchat.config import load_recipe

    main(load_recipe(sys.argv[1], sys.argv[2:]))
