"""Build the fixtures `rlhfchat bench ppo` and scripts/bench_trl_{ppo,grpo}.py are measured on (docs/benchmarks.md).

    PYTHONPATH=. python scripts/bench_models.py OUT_DIR

Writes OUT_DIR/run/data (the data stage of recipes/tiny-cpu.yaml on the bundled sample data), OUT_DIR/policy (a
random-init Llama: hidden 512, 6 blocks, 8 heads, MLP 1408, a BPE vocabulary of at most 8,192 tokens trained on the
SFT and preference texts; on the sample data it reaches fewer, 20.45M parameters), OUT_DIR/reward (a one-label
sequence-classification model from the policy's weights, its head random with seed 1) and OUT_DIR/prompts.jsonl (the
first 64 training prompts as system prompt + the first user turn). Everything is seeded: the same folders each time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[2].strip())
    out = Path(sys.argv[1]).resolve()
    repo = Path(__file__).resolve().parent.parent
    data = out / "run" / "data"
    if not (data / "prompts.train.jsonl").exists():
        subprocess.run([sys.executable, "-m", "rlhfchat.cli", "data", str(repo / "recipes" / "tiny-cpu.yaml"),
                        f"output_dir={out / 'run'}"], check=True, cwd=repo)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfchat.config import TinyModelConfig
    from rlhfchat.data.chat_format import SYSTEM_PROMPT
    from rlhfchat.tiny import build_tiny

    corpus = [data / "sft.train.jsonl", data / "preferences.train.jsonl"]
    build_tiny(out / "policy", corpus, TinyModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                                       num_hidden_layers=6, num_attention_heads=8,
                                                       max_position_embeddings=1024))
    tokenizer = AutoTokenizer.from_pretrained(out / "policy")
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(out / "policy", num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(out / "reward")
    tokenizer.save_pretrained(out / "reward")

    rows = [json.loads(line) for line in (data / "prompts.train.jsonl").read_text().splitlines() if line.strip()][:64]
    with open(out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            user = [m for m in row["prompt"] if m["role"] == "user"][:1]
            f.write(json.dumps({"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *user]}) + "\n")
    print(json.dumps({"policy": str(out / "policy"), "reward": str(out / "reward"),
                      "prompts": str(out / "prompts.jsonl"),
                      "reward_params_m": round(sum(p.numel() for p in reward.parameters()) / 1e6, 2)}))


if __name__ == "__main__":
    main()
