"""What `rlhfchat serve` (and `chat`, `discord`) serve: model folders, hub ids (from the local hub cache offline),
served names (--name NAME=PATH), and the latest round of `rlhfchat iterate` beside the one before (--rounds); the
one-line errors when there is nothing right to serve. The live server is a real process on 127.0.0.1."""

from __future__ import annotations

import io
import json
import shutil

import httpx
import pytest
from _chat_server import running_server

from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.cli import main as cli
from rlhfchat.errors import RlhfchatError
from tests.test_publish import OFFLINE, cache_model, hub_cache, tiny_delta  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("hub_cache")  # offline, with an empty hub cache of our own
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: "):].rstrip("\n")


def write_rounds(run, tiny_model_dir, latest: int) -> None:
    """A run folder as `rlhfchat iterate` leaves it: round 1 the pipeline's dpo/, round 2 rounds/2/dpo/."""
    shutil.copytree(tiny_model_dir, run / "sft")
    shutil.copytree(tiny_model_dir, run / "dpo")
    (run / "recipe.yaml").write_text("name: loop\n")
    rounds = run / "rounds"
    (rounds / "1").mkdir(parents=True)
    (rounds / "1" / "round.json").write_text(json.dumps({"round": 1, "status": "complete", "start": "sft",
                                                         "policy": "dpo"}))
    if latest == 2:
        shutil.copytree(tiny_model_dir, rounds / "2" / "dpo")
        (rounds / "2" / "round.json").write_text(json.dumps({"round": 2, "status": "complete",
                                                             "start": "rounds/2/sft", "policy": "rounds/2/dpo"}))
    (rounds / "latest").write_text(f"{latest}\n")


def test_the_latest_rounds_a_hub_model_and_chosen_names_in_one_server(tiny_model_dir, hub_cache, tmp_path):
    cache_model(hub_cache, "org/tiny-chat", tiny_model_dir)  # a hub id, in the cache; the hub is out of reach
    run = tmp_path / "run"
    write_rounds(run, tiny_model_dir, latest=2)
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    with running_server(["org/tiny-chat"], tmp_path, "--rounds", str(run), "--name", f"tiny={tiny_model_dir}",
                        env=env) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["tiny-chat", "tiny", "round-2", "round-1"]
        for name in ("round-2", "tiny-chat"):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": name, "max_tokens": 4, "messages": [{"role": "user", "content": "What is 2 + 3?"}]})
            assert r.status_code == 200, r.text
        page = httpx.get(url).text
        assert "round-2" in page and "round-1" in page  # the page offers them (and the arena puts them side by side)
    store = FeedbackStore(run / "feedback.db", create=False)  # with --rounds, where `rlhfchat iterate` reads it
    try:
        assert sorted(r["model"] for r in (store.reply(i) for i in _reply_ids(store))) == ["round-2", "tiny-chat"]
    finally:
        store.close()


def _reply_ids(store: FeedbackStore) -> list[str]:
    from sqlalchemy import select

    from rlhfchat.chat.feedback import Reply

    with store.Session() as s:
        return list(s.scalars(select(Reply.id)))


def test_round_one_is_served_beside_the_sft_model_it_started_from(tiny_model_dir, tmp_path):
    from rlhfchat import rounds

    write_rounds(tmp_path, tiny_model_dir, latest=1)
    assert rounds.serving(tmp_path) == [("round-1", tmp_path / "dpo"), ("sft", tmp_path / "sft")]
    # straight after the pipeline, before any `iterate`: its finished policy is round 1, under the same names
    fresh = tmp_path / "fresh"
    shutil.copytree(tmp_path, fresh, ignore=shutil.ignore_patterns("rounds"))
    (fresh / "recipe.yaml").write_text("name: loop\nmethod: dpo\n")
    with pytest.raises(RlhfchatError, match="no finished round"):
        rounds.serving(fresh)  # dpo/ has no manifest saying it finished
    (fresh / "dpo" / "manifest.json").write_text(json.dumps({"stage": "dpo", "status": "complete"}))
    assert rounds.serving(fresh) == [("round-1", fresh / "dpo"), ("sft", fresh / "sft")]


def test_what_cannot_be_served_is_one_line_before_anything_loads(tiny_model_dir, tiny_delta, tmp_path, capsys,
                                                                  monkeypatch):
    import rlhfchat.chat.engine as engine_module

    monkeypatch.setattr(engine_module, "load_engine", lambda *a, **k: pytest.fail("a model was loaded"))
    assert "nothing to serve" in one_line_error(capsys, ["serve"])
    assert one_line_error(capsys, ["serve", str(tiny_model_dir), HUB_ID]) == f"{HUB_ID}: {OFFLINE}"
    assert one_line_error(capsys, ["serve", "--name", f"qwen={HUB_ID}"]) == f"--name qwen: {HUB_ID}: {OFFLINE}"
    assert one_line_error(capsys, ["serve", str(tiny_delta)]).startswith(
        f"{tiny_delta}: this is a weight delta: apply it with `rlhfchat delta apply")
    assert "no finished round; run `rlhfchat iterate" in one_line_error(capsys, ["serve", "--rounds", str(tmp_path)])
    assert "no such run folder" in one_line_error(capsys, ["serve", "--rounds", str(tmp_path / "none")])
    assert one_line_error(capsys, ["serve", str(tiny_model_dir), "--name", f"a={tmp_path}", "--name",
                                   f"a={tiny_delta}"]) == "--name: 'a' names two models; give one of them another NAME"
    assert "the same folder is given twice" in one_line_error(capsys, ["serve", str(tiny_model_dir),
                                                                      str(tiny_model_dir / ".")])
    for bad in ("no-equals-sign", "=path", "two words=x"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error
            cli(["serve", "--name", bad])
        assert e.value.code == 2 and "argument --name: " in capsys.readouterr().err
    # the other front ends take hub ids the same way
    assert one_line_error(capsys, ["chat", HUB_ID]) == f"{HUB_ID}: {OFFLINE}"
    monkeypatch.setenv("DISCORD_TOKEN", "not-a-real-token")
    assert one_line_error(capsys, ["discord", HUB_ID, "--db", str(tmp_path / "f.db")]) == f"{HUB_ID}: {OFFLINE}"
    assert not (tmp_path / "f.db").exists()


def test_the_terminal_chats_with_a_hub_model_from_the_cache(tiny_model_dir, hub_cache, capsys, monkeypatch):
    cache_model(hub_cache, "org/tiny-chat", tiny_model_dir)

    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\n"))  # one message, then the end of input
    assert cli(["chat", "org/tiny-chat"]) == 0
    out = capsys.readouterr().out
    assert "Chatting with tiny-chat." in out and out.count("\n") >= 3  # the greeting, the reply, the goodbye
