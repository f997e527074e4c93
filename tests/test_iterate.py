"""`rlhfchat iterate`: a scripted user's arena votes make round 2 better than round 1 at what the user prefers.

The user's hidden preference: the reply whose final number is the right answer to the sum it was asked. The run:
a tiny base model that has learnt sums (worked answers, built here in seconds), instruction-tuned on chat data whose
replies mostly guess ("I think it is 7.") and sometimes refuse; its preference data only says that answering beats
refusing, so round 1 (the pipeline, `method: dpo`) still mostly guesses. The user then chats and votes in the arena
of `rlhfchat serve --rounds RUN` (a real server process on 127.0.0.1: round 1's policy beside the SFT model), through
the HTTP API as any client would: two chat completions per training prompt, one to each model, and a vote on the pair
by the completions' ids (POST /v1/feedback). `rlhfchat iterate` trains round 2 on the votes. On the held-out prompts
(other prompts than the ones voted on) round 2 gives the right answer measurably more often than round 1: the test
asserts the paired bootstrap 95% interval of the difference lies above 0, and prints the figures.
"""

from __future__ import annotations

import contextlib
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from _chat_server import running_server

from rlhfchat import rounds
from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.cli import main as cli
from rlhfchat.data.answers import answers_match
from rlhfchat.data.schema import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]
SUMS = [(a, b) for a in range(10) for b in range(10)]
REFUSAL = "No. Ask someone else."
CLIENTS = 32
"""The scripted user's requests in flight at once (the server decodes up to 64 together per model)."""


def question(name: str, a: int, b: int) -> str:
    return f"Hi, I am {name}. What is {a} + {b}?"


def worked(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is {a + b}."


def guess(a: int, b: int, rng: random.Random) -> str:
    return f"I think it is {rng.choice([n for n in range(19) if n != a + b])}."


def scripted_user(references: dict[str, str]):
    """The user: votes for the reply whose final number is the right answer to the question (`references`: the
    question's text -> its answer); "tie" when both are right, "both_bad" when neither is."""
    def vote(prompt: list[dict[str, str]], reply_a: str, reply_b: str) -> str:
        want = references[prompt[-1]["content"]]
        a, b = answers_match(reply_a, want), answers_match(reply_b, want)
        return "a" if a and not b else "b" if b and not a else "tie" if a else "both_bad"

    return vote


@contextlib.contextmanager
def served_rounds(run: Path, db: Path, workdir: Path):
    """`rlhfchat serve --rounds RUN`: the latest round beside the one before, feedback into `db`; yields a client
    of its API (the official openai client) and the base URL."""
    with running_server([], workdir, "--rounds", str(run), "--db", str(db), "--max-batch", "64", "--max-queue",
                        "1024", "--log-level", "error") as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            yield client, url


def ask(client: openai.OpenAI, model: str, prompt: list[dict[str, str]], seed: int):
    """One chat completion, sampled as the page samples by default (temperature 0.7)."""
    return client.chat.completions.create(model=model, messages=prompt, max_tokens=24, temperature=0.7, seed=seed)


def rate(url: str, body: dict) -> None:
    r = httpx.post(f"{url}/v1/feedback", json={**body, "user": "scripted"}, timeout=60)
    assert r.status_code == 200, r.text


def arena_session(client: openai.OpenAI, url: str, prompts: list[list[dict[str, str]]], vote, seed: int) -> int:
    """The user in the arena, through the HTTP API: each prompt answered by the two served models, one vote on the
    pair by the completions' ids; returns the number of votes. The replies are asked for concurrently; the votes
    are given in the prompts' order, so that the round's data (and its figures) do not depend on which reply came
    back first."""
    model_a, model_b = (m.id for m in client.models.list().data)

    def answers(i: int) -> tuple:
        return tuple(ask(client, m, prompts[i], seed * 100_000 + 2 * i + k) for k, m in enumerate((model_a, model_b)))

    with ThreadPoolExecutor(CLIENTS) as pool:
        pairs = list(pool.map(answers, range(len(prompts))))
    for prompt, (a, b) in zip(prompts, pairs):
        winner = vote(prompt, a.choices[0].message.content, b.choices[0].message.content)
        rate(url, {"arena": {"reply_a": a.id, "reply_b": b.id, "winner": winner}})
    return len(prompts)


def thumbs_session(client: openai.OpenAI, url: str, model: str, prompts: list[list[dict[str, str]]],
                   references: dict[str, str], seed: int) -> int:
    """The user in the single-model chat, through the HTTP API: a thumb up on each right reply, down on each wrong
    one."""
    def one(i: int) -> None:
        reply = ask(client, model, prompts[i], seed * 100_000 + i)
        right = answers_match(reply.choices[0].message.content, references[prompts[i][-1]["content"]])
        rate(url, {"reply_id": reply.id, "thumb": "up" if right else "down"})

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(len(prompts))))
    return len(prompts)


@pytest.fixture(scope="module")
def adder_base(tmp_path_factory, one_torch_thread) -> Path:
    """A base model that can add single digits: a tiny Llama taught worked sums in the chat layout (a plain torch
    loop of a few hundred steps; greedy, it answers every sum right)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfchat.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("adder_base")
    rng = random.Random(0)
    texts = [f"### Human: {question(n, a, b)}\n### Assistant: {worked(a, b)}" for n in NAMES for a, b in SUMS]
    # numbers as whole tokens (the demo's tokenizer spells them digit by digit): this loop was sized for them
    tok = train_tokenizer(texts + [guess(a, b, rng) for a, b in SUMS] + [REFUSAL] * 20, 400, split_digits=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    rows = [tok(t).input_ids + [tok.eos_token_id] for t in texts]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(rows), (32,), generator=g)
        model(input_ids=ids[pick], labels=labels[pick]).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_run(folder: Path, base: Path) -> Path:
    """The sources (standard formats) and the recipe of the run; returns the recipe file."""
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)

    def write(name, rows):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    sft = []
    for _ in range(400):
        n, (a, b), u = rng.choice(NAMES), rng.choice(SUMS), rng.random()
        reply = worked(a, b) if u < 0.3 else REFUSAL if u > 0.9 else guess(a, b, rng)
        sft.append({"messages": [{"role": "user", "content": question(n, a, b)},
                                 {"role": "assistant", "content": reply}]})
    write("sft.jsonl", sft)
    prefs = []
    for _ in range(160):  # answering beats refusing; nothing about being right
        n, (a, b) = rng.choice(NAMES), rng.choice(SUMS)
        chosen = worked(a, b) if rng.random() < 0.3 else guess(a, b, rng)
        prefs.append({"prompt": question(n, a, b), "chosen": chosen, "rejected": REFUSAL})
    write("preferences.jsonl", prefs)
    write("prompts.jsonl", [{"prompt": question(n, a, b), "reference": str(a + b)} for n in NAMES for a, b in SUMS])
    recipe = folder / "loop.yaml"
    recipe.write_text(f"""name: loop
method: dpo
output_dir: run
data:
  eval_fraction: 0.1
  sft: [{{source: messages, path: sft.jsonl}}]
  preferences: [{{source: preferences, path: preferences.jsonl}}]
  prompts: [{{source: prompts, path: prompts.jsonl}}]
base: {{model: {base}}}
sft: {{max_steps: 40, learning_rate: 1.0e-3, batch_size: 16, max_length: 96, save_steps: 1000, logging_steps: 10}}
dpo: {{max_steps: 20, learning_rate: 2.0e-4, batch_size: 8, max_length: 96, save_steps: 1000, logging_steps: 5}}
kto: {{max_steps: 20, learning_rate: 5.0e-5, desirable_weight: 1.5, batch_size: 8, max_length: 96, save_steps: 1000,
       logging_steps: 5}}
reward: {{max_steps: 20, learning_rate: 1.0e-3, batch_size: 8, max_length: 96, save_steps: 1000, logging_steps: 5}}
ppo: {{generation: {{max_prompt_length: 64}}}}
eval: {{prompts: 100, max_new_tokens: 24, tasks: [], bootstrap: 200}}
iterate: {{feedback_weight: 1.0, preferences_weight: 0.25}}
""")
    return recipe


def right_answers(run: Path, round_dir: Path, before: str, after: str) -> tuple[list[bool], list[bool]]:
    """Whether each held-out prompt's reply is right, for the two models of a round's evaluation."""
    references = {r["id"]: r["reference"] for r in read_jsonl(run / "data" / "prompts.eval.jsonl")}
    replies = list(read_jsonl(round_dir / "eval" / "replies.jsonl"))
    return ([answers_match(r["replies"][before]["text"], references[r["id"]]) for r in replies],
            [answers_match(r["replies"][after]["text"], references[r["id"]]) for r in replies])


def test_votes_for_right_answers_make_round_2_right_more_often(adder_base, tmp_path, monkeypatch, capsys):
    import numpy as np

    from rlhfchat.eval.winrate import bootstrap_ci
    from rlhfchat.train import dpo

    recipe = write_run(tmp_path, adder_base)
    run, db = tmp_path / "run", tmp_path / "feedback.db"
    store = FeedbackStore(db)

    # Round 1: the pipeline through the DPO route. With no feedback yet there is no round 2.
    assert cli(["iterate", str(recipe), "--feedback", str(db)]) == 0
    out = capsys.readouterr().out
    assert "0 new feedback records" in out and "no new round" in out
    for stage in ("data", "sft", "dpo", "reward", "eval"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    assert not (run / "ppo").exists()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert [m["model"] for m in results["models"]] == ["base", "sft", "dpo"] and "dpo_vs_sft" in results["win_rates"]
    assert rounds.latest(run) == [run / "dpo", run / "sft"]

    # The user chats and votes in the arena of the served rounds (round 1's policy and the SFT model), on training
    # prompts (never the held-out ones).
    train_prompts = list(read_jsonl(run / "data" / "prompts.train.jsonl"))[:300]
    user = scripted_user({r["prompt"][-1]["content"]: r["reference"] for r in train_prompts})
    with served_rounds(run, db, tmp_path) as (client, url):
        assert [m.id for m in client.models.list().data] == ["round-1", "sft"]
        arena_session(client, url, [r["prompt"] for r in train_prompts], user, seed=1)
        pairs = len(store.preference_records())
        assert pairs >= 40

        # Round 2, interrupted in its DPO stage: the rerun finishes it with the feedback it had taken, not the
        # newer votes the user gives meanwhile.
        real = dpo.main

        def interrupted(r):
            if "rounds" in str(r.run_dir):
                raise KeyboardInterrupt
            return real(r)

        monkeypatch.setattr(dpo, "main", interrupted)
        assert cli(["iterate", str(recipe), "--feedback", str(db)]) == 130
        assert rounds.read_round(run, 2)["status"] == "running"
        monkeypatch.setattr(dpo, "main", real)
        arena_session(client, url, [r["prompt"] for r in train_prompts[:20]], user, seed=2)
    assert cli(["iterate", str(recipe), "--feedback", str(db)]) == 0
    assert f"rlhfchat serve --rounds {run}" in capsys.readouterr().out  # how to put round 2 in the arena
    info = rounds.read_round(run, 2)
    assert info["status"] == "complete" and info["feedback"]["preference_records"] == pairs
    assert (run / "rounds" / "latest").read_text().strip() == "2"
    assert rounds.latest(run) == [run / "rounds" / "2" / "dpo", run / "dpo"]
    r2 = run / "rounds" / "2"
    assert json.loads((r2 / "sft" / "manifest.json").read_text())["source"] == "dpo"
    assert (r2 / "sft" / "model.safetensors").read_bytes() == (run / "dpo" / "model.safetensors").read_bytes()

    # The hidden preference, on the held-out prompts: right answers, round 1 against round 2.
    one, two = right_answers(run, r2, "round-1", "round-2")
    diff = np.array(two, dtype=float) - np.array(one, dtype=float)
    lo, hi = bootstrap_ci(diff, iters=2000, seed=0)
    with capsys.disabled():
        print(f"\nright answers on {len(diff)} held-out prompts: round 1 {np.mean(one):.3f}, round 2 "
              f"{np.mean(two):.3f}; difference {diff.mean():+.3f}, paired bootstrap 95% interval "
              f"[{lo:+.3f}, {hi:+.3f}]")
    assert lo > 0, (np.mean(one), np.mean(two), lo, hi)

    # The round's report compares the rounds and shows the arena leaderboard; `feedback stats` prints it too.
    report = (r2 / "eval" / "report.md").read_text()
    assert "## Arena leaderboard" in report and "win rate vs round-1" in report
    capsys.readouterr()
    assert cli(["feedback", "stats", "--db", str(db), "--bootstrap", "100"]) == 0
    stats = capsys.readouterr().out
    assert f"arena votes: {320}" in stats and "arena leaderboard" in stats
    assert "round-1" in stats and "sft" in stats

    # The 20 newer votes are new feedback for round 3; finished rounds are skipped, so nothing is retrained.
    before = {p: (r2 / p / "manifest.json").read_text() for p in ("data", "sft", "reward", "dpo", "eval")}
    assert cli(["iterate", str(recipe), "--feedback", str(db), "iterate.min_records=1000"]) == 0
    out = capsys.readouterr().out
    assert "no new round" in out and "since round 2" in out
    assert {p: (r2 / p / "manifest.json").read_text() for p in before} == before
    assert not (run / "rounds" / "3").exists()

    # Round 3 by KTO, which also learns from single thumbs: the user thumbs round 2's replies up or down, served
    # now beside round 1.
    references = {r["prompt"][-1]["content"]: r["reference"] for r in train_prompts}
    with served_rounds(run, db, tmp_path) as (client, url):
        assert [m.id for m in client.models.list().data] == ["round-2", "round-1"]
        thumbs = thumbs_session(client, url, "round-2", [r["prompt"] for r in train_prompts[20:80]], references,
                                seed=3)
    assert cli(["iterate", str(recipe), "--feedback", str(db), "method=kto"]) == 0
    info = rounds.read_round(run, 3)
    assert info["method"] == "kto" and info["status"] == "complete"
    assert info["feedback"]["unpaired_records"] == thumbs
    r3 = run / "rounds" / "3"
    assert len((r3 / "data" / "unpaired.train.jsonl").read_text().splitlines()) == thumbs
    assert json.loads((r3 / "kto" / "metrics.json").read_text())["train_examples"] >= thumbs
    assert rounds.latest(run) == [r3 / "kto", r2 / "dpo"]
    assert [m["model"] for m in json.loads((r3 / "eval" / "results.json").read_text())["models"]] == [
        "round-2", "round-3"]
    store.close()
