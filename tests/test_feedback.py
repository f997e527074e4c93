"""The feedback store on SQLite and on a real PostgreSQL server; export to canonical preference records."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

from rlhfchat.chat.engine import Completion, SamplingParams
from rlhfchat.chat.feedback import FeedbackStore
from rlhfchat.cli import main as cli
from rlhfchat.data.schema import read_jsonl
from rlhfchat.errors import RlhfchatError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.isfile(f"{d}/initdb") and os.path.isfile(f"{d}/pg_ctl"):
            return d
    return None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's package) in a temporary folder, on a free local port."""
    pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL server not installed (no /usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")
    pytest.importorskip("psycopg2")
    root = tempfile.mkdtemp(prefix="rlhfchat-pg-")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(root, "data"), _free_port()
    subprocess.run([*as_user, f"{pg}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, f"{pg}/pg_ctl", "-D", data, "-l", f"{root}/server.log", "-w", "-t", "60",
                    "-o", f"-p {port} -h 127.0.0.1 -k {root} -F", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # as a user writes it: the installed driver is found
    finally:
        subprocess.run([*as_user, f"{pg}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = FeedbackStore(tmp_path / "run" / "feedback.db")
    else:
        s = FeedbackStore(request.getfixturevalue("postgres_url"))
    yield s
    from rlhfchat.chat.feedback import Base

    if request.param == "postgres":
        Base.metadata.drop_all(s.engine)  # the next test starts from empty tables
    s.close()


def prompt(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": text}]


def test_store_records_replies_settings_thumbs_and_votes_with_timestamps(store):
    conv = store.new_conversation("web", client="tester")
    params = SamplingParams(temperature=0.3, top_k=5, seed=1)
    completion = Completion(text="2 + 3 = 5.", finish_reason="stop", prompt_tokens=12, completion_tokens=7,
                            messages=prompt("2 + 3?"), model="tiny-ppo", params=params)
    a = store.add_reply(conv, completion)
    b = store.add_reply(conv, model="tiny-sft", prompt=prompt("2 + 3?"), content="6", sampling={"temperature": 1.0})
    store.thumb(a, up=True)
    store.thumb(b, up=False, user="someone")
    store.arena_vote(a, b, "a")
    assert store.counts() == {"conversations": 1, "replies": 2, "thumbs": 2, "arena_votes": 1}
    rec = store.reply(a)
    assert rec["model"] == "tiny-ppo" and rec["prompt"] == prompt("2 + 3?") and rec["content"] == "2 + 3 = 5."
    assert rec["sampling"]["temperature"] == 0.3 and rec["sampling"]["top_k"] == 5 and rec["sampling"]["seed"] == 1
    assert rec["finish_reason"] == "stop" and rec["prompt_tokens"] == 12 and rec["created_at"] is not None
    [vote] = store.arena_votes()
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == ("tiny-ppo", "tiny-sft", "a")
    assert vote["created_at"] is not None
    with pytest.raises(RlhfchatError, match="^reply_id:"):
        store.thumb("nope", up=True)
    with pytest.raises(RlhfchatError, match="^winner:"):
        store.arena_vote(a, b, "c")


def test_export_gives_the_expected_pairs(store, tmp_path):
    conv = store.new_conversation("arena")

    def reply(p: str, content: str, model: str = "m") -> str:
        return store.add_reply(conv, model=model, prompt=prompt(p), content=content, sampling={})

    # arena: A wins, B wins, a tie and "both bad" (no pairs from those two)
    r1, r2 = reply("p1", "good one", "ppo"), reply("p1", "bad one", "sft")
    store.arena_vote(r1, r2, "a")
    r3, r4 = reply("p2", "worse", "ppo"), reply("p2", "better", "sft")
    store.arena_vote(r3, r4, "b")
    store.arena_vote(reply("p3", "x"), reply("p3", "y"), "tie")
    store.arena_vote(reply("p3", "u"), reply("p3", "w"), "both_bad")
    # thumbs: up vs each down on the same prompt
    up, down1, down2 = reply("p4", "liked"), reply("p4", "disliked 1"), reply("p4", "disliked 2")
    store.thumb(up, True)
    store.thumb(down1, False)
    store.thumb(down2, False)
    # a thumb taken back counts for nothing; thumbs on different prompts never pair
    taken_back, lone_down = reply("p5", "taken back"), reply("p5", "lone down")
    store.thumb(taken_back, True, user="u1")
    store.thumb(taken_back, None, user="u1")
    store.thumb(lone_down, False)
    store.thumb(reply("p6", "up elsewhere"), True)
    store.thumb(reply("p7", "down elsewhere"), False)
    # a user's latest thumb counts: u1 changed their mind on r16
    r16, r17 = reply("p8", "changed to down"), reply("p8", "up")
    store.thumb(r16, True, user="u1")
    store.thumb(r16, False, user="u1")
    store.thumb(r17, True, user="u1")

    out = tmp_path / "prefs.jsonl"
    assert cli(["feedback", "export", "--db", store.url, "--out", str(out)]) == 0
    records = list(read_jsonl(out, kind="preferences"))
    assert {r["source"] for r in records} == {"feedback"}
    pairs = {(r["prompt"][-1]["content"], r["chosen"], r["rejected"]) for r in records}
    assert pairs == {
        ("p1", "good one", "bad one"), ("p2", "better", "worse"),
        ("p4", "liked", "disliked 1"), ("p4", "liked", "disliked 2"),
        ("p8", "up", "changed to down"),
    }
    assert len(records) == len(pairs) == len({r["id"] for r in records})
    assert all(r["prompt"] == prompt(r["prompt"][-1]["content"]) for r in records)  # system prompt included


def test_sqlite_store_uses_wal(tmp_path):
    from sqlalchemy import text

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        with store.engine.connect() as c:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        store.close()


def test_export_of_a_missing_database_is_a_one_line_error(tmp_path, capsys):
    assert cli(["feedback", "export", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_keeps_feedback_in_the_run_folder_by_default(tmp_path, monkeypatch):
    from rlhfchat.chat.feedback import db_url, default_db

    run = tmp_path / "runs" / "tiny"
    (run / "ppo").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: tiny\n")
    assert default_db([run / "ppo", run / "sft"]) == run / "feedback.db"
    monkeypatch.chdir(tmp_path)
    assert default_db([tmp_path / "some-model"]) == tmp_path / "feedback.db"  # not a run: the current folder
    assert db_url("fb.db") == f"sqlite:///{tmp_path / 'fb.db'}"
    # a PostgreSQL URL without a driver gets the installed one (SQLAlchemy alone would take psycopg 3); a named one
    # stays as it is
    import importlib.util

    driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"  # the postgres extra brings psycopg2
    assert db_url("postgresql://h/db") == db_url("postgres://h/db") == f"postgresql+{driver}://h/db"
    assert db_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"


def test_thumb_comments_and_a_store_made_before_them(store):
    from sqlalchemy import text

    from rlhfchat.chat.feedback import format_stats

    conv = store.new_conversation("api")
    r = store.add_reply(conv, model="m", prompt=prompt("2 + 3?"), content="6", sampling={})
    store.thumb(r, up=False, user="ann", comment="It is 5.")
    assert [(t["value"], t["user"], t["comment"]) for t in store.thumbs(r)] == [(-1, "ann", "It is 5.")]
    assert "thumbs: 0 up, 1 down (each user's latest thumb on a reply), 1 with a comment" in format_stats(store, 0)
    # a store written before thumbs had comments: opened again, it gets the column and keeps its thumbs
    with store.engine.begin() as c:
        c.execute(text("ALTER TABLE thumbs DROP COLUMN comment"))
    again = FeedbackStore(store.url)
    try:
        again.thumb(r, up=True, comment="Better now.")
        assert [(t["value"], t["comment"]) for t in again.thumbs(r)] == [(-1, None), (1, "Better now.")]
    finally:
        again.close()
