"""What the loop reads from the feedback store (time windows, unpaired thumbs, arena battles), `rlhfchat feedback
stats`, the report's arena leaderboard, and `rounds.latest`: fast, on a real SQLite file."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest

from rlhfchat import rounds
from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.cli import main as cli
from rlhfchat.config import load_recipe
from rlhfchat.errors import RlhfchatError
from rlhfchat.eval.leaderboard import leaderboard


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


def add(store: FeedbackStore, prompt: str, content: str, model: str = "m") -> str:
    return store.add_reply(store.new_conversation("arena"), model=model, prompt=msgs(prompt), content=content,
                           sampling={})


def battle(store: FeedbackStore, a: str, b: str, winner: str, prompt: str = "p") -> None:
    store.arena_vote(add(store, prompt, f"{a} says {time.perf_counter_ns()}", a),
                     add(store, prompt, f"{b} says {time.perf_counter_ns()}", b), winner)


def test_since_and_until_keep_the_votes_and_thumbs_given_in_the_window(store):
    store.arena_vote(add(store, "p1", "good", "m1"), add(store, "p1", "bad", "m2"), "a")
    liked = add(store, "p2", "liked")
    store.thumb(liked, True)
    time.sleep(0.01)
    cut = datetime.now(timezone.utc)
    time.sleep(0.01)
    store.arena_vote(add(store, "p3", "x", "m1"), add(store, "p3", "y", "m2"), "b")
    store.thumb(add(store, "p4", "meh"), False)
    store.thumb(add(store, "p4", "fine"), True)

    def pairs(records):
        return {(r["prompt"][-1]["content"], r["chosen"], r["rejected"]) for r in records}

    assert pairs(store.preference_records(until=cut)) == {("p1", "good", "bad")}
    assert pairs(store.preference_records(since=cut)) == {("p3", "y", "x"), ("p4", "fine", "meh")}
    assert pairs(store.preference_records()) == pairs(store.preference_records(until=cut)) | pairs(
        store.preference_records(since=cut))
    # a naive time is UTC
    assert pairs(store.preference_records(until=cut.replace(tzinfo=None))) == {("p1", "good", "bad")}

    # Each thumbed reply is one unpaired example; a thumb taken back after the cut leaves that window empty of it.
    def examples(records):
        return {(r["prompt"][-1]["content"], r["completion"], r["label"]) for r in records}

    assert examples(store.unpaired_records(until=cut)) == {("p2", "liked", True)}
    assert examples(store.unpaired_records(since=cut)) == {("p4", "meh", False), ("p4", "fine", True)}
    store.thumb(liked, None)
    assert examples(store.unpaired_records()) == {("p4", "meh", False), ("p4", "fine", True)}
    assert {r["source"] for r in store.unpaired_records()} == {"feedback"}


def test_battles_keep_the_latest_vote_per_pair_and_leave_out_one_models_own_pairs(store):
    a, b = add(store, "p", "one", "ppo"), add(store, "p", "two", "sft")
    store.arena_vote(a, b, "b")
    store.arena_vote(a, b, "a")  # the same pair again: the latest vote counts
    store.arena_vote(add(store, "q", "x", "ppo"), add(store, "q", "y", "ppo"), "a")  # rates nothing
    store.arena_vote(add(store, "r", "x", "sft"), add(store, "r", "y", "ppo"), "tie")
    assert store.battles() == [("ppo", "sft", "a"), ("sft", "ppo", "tie")]
    assert store.vote_counts() == {"a": 2, "b": 1, "tie": 1, "both_bad": 0}


def test_feedback_stats_prints_counts_and_the_ratings_with_intervals(store, capsys):
    for winner in ["a"] * 24 + ["b"] * 6 + ["tie"] * 2:
        battle(store, "ppo", "sft", winner)
    store.thumb(add(store, "p", "nice"), True)
    assert cli(["feedback", "stats", "--db", store.url, "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "arena votes: 32 (a 24, b 6, tie 2, both_bad 0)" in out and "thumbs: 1 up, 0 down" in out
    expected = leaderboard(store.battles(), bootstrap=200, seed=0)
    assert [r.model for r in expected] == ["ppo", "sft"]
    lines = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("1 ", "2 "))]
    for cells, r in zip(lines, expected):
        assert cells[1] == r.model and cells[2] == f"{r.rating:.0f}"
        assert " ".join(cells[3:5]) == f"[{r.lower:.0f}, {r.upper:.0f}]" and r.lower < r.rating < r.upper
        assert cells[5:] == [str(r.battles), str(r.wins), str(r.ties), str(r.losses)]


def test_feedback_stats_of_a_store_without_arena_votes(store, capsys):
    assert cli(["feedback", "stats", "--db", store.url]) == 0
    assert "no leaderboard" in capsys.readouterr().out


def test_the_report_shows_the_leaderboard_of_the_runs_feedback_store(tmp_path):
    from rlhfchat.eval import report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    row = {"model": "sft", "path": str(run / "sft"), "reward_mean": None, "reward_std": None, "mean_length": 3.0,
           "math_exact_match": None, "math_n": 0, "kl_to_ref": None, "tasks": {}}
    (run / "eval" / "results.json").write_text(json.dumps({
        "run": "t", "created": "2026-01-01T00:00:00+00:00", "models": [row], "win_rates": {},
        "settings": {"prompts": 1, "max_new_tokens": 8, "tasks": [], "limit": None, "bootstrap": 50, "seed": 0}}))
    recipe = load_recipe(None, [f"output_dir={run}", "eval.bootstrap=50"])
    assert "Arena leaderboard" not in report.main(recipe).read_text()  # no store: no section

    store = FeedbackStore(run / "feedback.db")
    for winner in ["b"] * 9 + ["a"] * 3:
        battle(store, "ppo", "sft", winner)
    store.close()
    text = report.main(recipe).read_text()
    assert "## Arena leaderboard" in text
    [top] = [ln for ln in text.splitlines() if ln.startswith("| 1 |")]
    best = leaderboard([("ppo", "sft", w) for w in ["b"] * 9 + ["a"] * 3], bootstrap=50, seed=0)[0]
    assert top == (f"| 1 | **sft** | {best.rating:.0f} | [{best.lower:.0f}, {best.upper:.0f}] | 12 | 9 / 0 / 3 |")


def test_rounds_latest_reads_the_pointer_file(tmp_path):
    with pytest.raises(RlhfchatError, match="no finished round; run `rlhfchat iterate"):
        rounds.latest(tmp_path)
    root = tmp_path / "rounds"
    (root / "1").mkdir(parents=True)
    (root / "1" / "round.json").write_text(json.dumps({"round": 1, "status": "complete", "start": "sft",
                                                      "policy": "ppo"}))
    (root / "latest").write_text("1\n")
    assert rounds.latest(tmp_path) == [tmp_path / "ppo", tmp_path / "sft"]
    (root / "2").mkdir()
    (root / "2" / "round.json").write_text(json.dumps({"round": 2, "status": "complete", "start": "rounds/2/sft",
                                                      "policy": "rounds/2/dpo"}))
    (root / "latest").write_text("2\n")
    assert rounds.latest(tmp_path) == [tmp_path / "rounds" / "2" / "dpo", tmp_path / "ppo"]
    assert rounds.existing_rounds(tmp_path) == [1, 2]


def test_iterate_without_the_feedback_store_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"name: t\noutput_dir: {tmp_path / 'run'}\n")
    assert cli(["iterate", str(tmp_path / "r.yaml"), "--feedback", str(tmp_path / "none.db"), "seed=1"]) == 2
    err = capsys.readouterr().err
    assert "--feedback:" in err and "does not exist" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
