"""The one-GPU check of issue 17 (run it through scripts/gpu_check.sh): the pipeline's SFT, reward and PPO stages for a
few steps on a random-init Llama of about 0.5B parameters in bf16, HF generate for the rollouts, on one GPU.

    scripts/gpu_check.sh                         # ~0.5B (hidden 1280, 24 layers): a GPU, under 8 minutes
    scripts/gpu_check.sh --tiny --out x.json     # a 2-layer model: the same steps on a CPU, to check the script

Writes one JSON file (and prints it): per stage the wall time and peak GPU memory (torch.cuda.max_memory_allocated);
SFT and reward tokens per second (the tokens the Trainer counted over its train_runtime); PPO's generated tokens per
second, the share of an iteration spent generating (gen_s / iteration_s from metrics.jsonl) and the model FLOPs
utilisation of the update: 6 x the policy's non-embedding parameters x the tokens the update's forwards and backwards
read (real tokens of every row, every PPO epoch), over the update's time, over the GPU's peak dense bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # base.tiny fields
    "0.5b": {"vocab_size": 8192, "hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 24,
             "num_attention_heads": 20, "max_position_embeddings": 2048},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 512},
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense, datasheets


def overrides(tiny: bool, out_dir: Path) -> list[str]:
    size = SIZES["tiny" if tiny else "0.5b"]
    steps = 4 if tiny else 20
    return [
        f"output_dir={out_dir}", "base.dtype=bfloat16", *(f"base.tiny.{k}={v}" for k, v in size.items()),
        f"sft.max_steps={steps}", "sft.batch_size=8", "sft.max_length=512", "sft.logging_steps=1",
        "sft.save_steps=100000",
        f"reward.max_steps={steps}", "reward.batch_size=8", "reward.max_length=512", "reward.logging_steps=1",
        "reward.save_steps=100000",
        "ppo.num_rollouts=32" if not tiny else "ppo.num_rollouts=8", "ppo.chunk_size=16" if not tiny else
        "ppo.chunk_size=8", "ppo.batch_size=8" if not tiny else "ppo.batch_size=4", "ppo.ppo_epochs=2",
        "ppo.total_steps=16" if not tiny else "ppo.total_steps=8", f"ppo.generation.max_new_tokens={16 if tiny else 128}",
        f"ppo.generation.min_new_tokens={16 if tiny else 128}", "ppo.generation.stop_sequences=[]", "ppo.eval_prompts=8",
        "ppo.save_steps=100000", "ppo.generation.max_prompt_length=256",
    ]


class Gpu:
    """Peak memory and synchronised clocks; no-ops on a CPU."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def peak_gb(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def name(self) -> str:
        return self.torch.cuda.get_device_name() if self.cuda else "cpu"


def trainer_figures(stage_dir: Path) -> dict[str, Any]:
    """Tokens/s of an HF Trainer stage from its metrics.jsonl: the last `num_tokens` over `train_runtime`."""
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = next((x for x in reversed(lines) if "train_runtime" in x), {})
    tokens = max((x["num_tokens"] for x in lines if "num_tokens" in x), default=None)
    runtime = summary.get("train_runtime")
    return {"train_runtime_s": runtime, "train_samples_per_s": summary.get("train_samples_per_second"),
            "tokens": tokens, "tokens_per_s": round(tokens / runtime, 1) if tokens and runtime else None,
            "final_loss": next((x["loss"] for x in reversed(lines) if "loss" in x), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU smoke test of this script)")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON goes (default gpu_check.json)")
    parser.add_argument("--workdir", default=None, help="run folder (default: a new temporary one)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    args = parser.parse_args()

    import torch

    from rlhfchat.config import load_recipe
    from rlhfchat.data import mixture
    from rlhfchat.train import ppo, reward, sft

    gpu = Gpu()
    run = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check."))
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml", overrides(args.tiny, run))
    result: dict[str, Any] = {"device": gpu.name(), "torch": torch.__version__, "dtype": recipe.base.dtype,
                              "size": "tiny" if args.tiny else "0.5b", "run": str(run)}
    t_all = time.perf_counter()
    mixture.main(recipe)

    # PPO's update, timed with its tokens (every row's real tokens, every PPO epoch)
    update_log: list[tuple[float, int]] = []
    original_update = ppo.PPO.update

    def timed_update(self, exp):
        t0 = gpu.now()
        out = original_update(self, exp)
        update_log.append((gpu.now() - t0, int(exp.attention_mask.sum()) * self.cfg.ppo_epochs))
        return out

    ppo.PPO.update = timed_update
    for name, stage in (("sft", sft), ("reward", reward), ("ppo", ppo)):
        gpu.reset()
        t0 = gpu.now()
        stage.main(recipe)
        result[name] = {"wall_s": round(gpu.now() - t0, 2), "peak_gpu_gb": gpu.peak_gb()}
    for name in ("sft", "reward"):
        result[name].update(trainer_figures(run / name))

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run / "sft"))
    params = sum(p.numel() for p in lm.parameters())
    non_embedding = params - lm.get_input_embeddings().weight.numel()
    iters = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    gen_s, iter_s = sum(x["gen_s"] for x in iters), sum(x["iteration_s"] for x in iters)
    new_tokens = sum(x["response_len"] for x in iters) * recipe.ppo.num_rollouts
    update_s, update_tokens = sum(t for t, _ in update_log), sum(n for _, n in update_log)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu.name()), None)
    achieved = 6 * non_embedding * update_tokens / update_s / 1e12 if update_s else None
    result["params_m"] = round(params / 1e6, 1)
    result["ppo"].update({
        "iterations": len(iters), "samples_per_iteration": recipe.ppo.num_rollouts,
        "generate_share": round(gen_s / iter_s, 3), "gen_tokens_per_s": round(new_tokens / gen_s, 1),
        "iteration_s": [x["iteration_s"] for x in iters], "update_s": round(update_s, 3),
        "update_tokens": update_tokens, "update_tflops": round(achieved, 2) if achieved else None,
        "peak_tflops": peak, "mfu": round(achieved / peak, 4) if achieved and peak else None,
        "mfu_formula": "6 x non-embedding params x update tokens / update seconds / peak bf16 FLOP/s",
        "kl": iters[-1]["kl"], "score": iters[-1]["score"],
    })
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
