"""Stages, then a probe of PPO's frozen networks, in one launch (DeepSpeed's start-up is paid once):

    accelerate launch --config_file configs/accelerate/cpu-zero3.yaml tests/_zero_stages.py SPEC.json

SPEC: {"runs": [[stage, run_dir, [key=value, ...]], ...], "probe": {"run": dir, "out": file.pt} or null,
       "reload": {"run": dir, "overrides": [...], "out": file.json} or null}

`probe` computes what the frozen networks give for fixed replies here; `reload` loads the PPO run's last checkpoint
into a fresh PPO on this layout and reads its state back (optim.full_state), to compare with the files.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

STAGES = {"sft": "rlhfchat.train.sft", "reward": "rlhfchat.train.reward", "ppo": "rlhfchat.train.ppo"}
PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in ((1, 2), (7, 5), (0, 9))]
REPLIES = ["1 + 2 = 3.", "No. Ask someone else.", "0 + 9 = 9. The answer is 9."]


def probe(run: str | Path, reward_device: str | None = None) -> dict:
    """The reference's logprobs and the reward model's scores of fixed replies, as PPO computes them here."""
    import torch

    from rlhfchat.config import PPOConfig
    from rlhfchat.train.ppo import PPO
    from rlhfchat.decoding import encode_prompt, left_pad

    run = Path(run)
    cfg = PPOConfig(chunk_size=2, reward_device=reward_device)
    ppo = PPO.from_folders(run / "sft", run / "reward", cfg, seed=0, reward_max_length=96)
    tok = ppo.tokenizer
    prompt_ids, prompt_mask = left_pad([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id)
    replies = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in REPLIES]
    width = max(map(len, replies))
    response = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in replies])
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    ids, mask = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask], 1)
    frozen = [*ppo.reference.lm.parameters(), *ppo.scorer.model.parameters()]
    return {"ref_logprobs": ppo.reference.logprobs(ids, mask, prompt_ids.shape[1]) * response_mask,
            "scores": ppo.scorer.score(PROMPTS, REPLIES),
            "partitioned": all(p.numel() == 0 for p in frozen) and all(hasattr(p, "ds_id") for p in frozen),
            "reward_partitioned": any(hasattr(p, "ds_id") for p in ppo.scorer.model.parameters())}


def reload(run: str | Path, overrides: list[str]) -> dict:
    """The last checkpoint of `run`'s PPO loaded into a fresh PPO here, read back: does it match the files?"""
    import json as _json

    import torch
    from safetensors.torch import load_file

    from rlhfchat.config import load_recipe
    from rlhfchat.train.optim import full_state
    from rlhfchat.train.ppo import PPO
    from rlhfchat.train.ppo_checkpoint import latest_checkpoint

    run = Path(run)
    recipe = load_recipe(None, ["name=t", f"output_dir={run}", *overrides])
    ppo = PPO.from_folders(run / "sft", run / "reward", recipe.ppo, seed=recipe.seed, reward_max_length=96)
    ckpt = latest_checkpoint(run / "ppo" / "checkpoints")
    ppo.load_checkpoint(ckpt)
    weights, moments, step = full_state(ppo.optimizer.optimizer, ppo.trainable_parameters())
    files = {**load_file(ckpt / "trainable.safetensors"), **load_file(ckpt / "optimizer.safetensors")}
    ours = {**weights, **moments}
    return {"checkpoint": ckpt.name, "tensors": len(ours), "same_names": set(ours) == set(files),
            "max_diff": max(float((ours[k] - files[k]).abs().max()) for k in files),
            "step": step, "saved_step": _json.loads((ckpt / "state.json").read_text())["optimizer_step"],
            "equal": all(torch.equal(ours[k], files[k]) for k in files)}


def main(spec: dict) -> None:
    from rlhfchat.config import load_recipe

    for stage, run, overrides in spec["runs"]:
        importlib.import_module(STAGES[stage]).main(load_recipe(None, ["name=t", f"output_dir={run}", *overrides]))
    if spec.get("probe"):
        import torch

        from rlhfchat import manifest

        result = {"sharded": probe(spec["probe"]["run"]), "reward_whole": probe(spec["probe"]["run"], "cpu")}
        if manifest.is_main_process():
            torch.save(result, spec["probe"]["out"])
    if spec.get("reload"):
        from rlhfchat import manifest

        result = reload(spec["reload"]["run"], spec["reload"]["overrides"])
        if manifest.is_main_process():
            Path(spec["reload"]["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
