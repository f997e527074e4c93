"""The feedback store: every reply the chat front ends give, with thumbs and arena votes, in one SQL database.

    store = FeedbackStore("runs/tiny/feedback.db")            # a path (SQLite, WAL) or any SQLAlchemy URL
    conv = store.new_conversation(source="web")
    reply = store.add_reply(conv, completion)                 # an engine Completion: prompt, text, model, settings
    store.thumb(reply, up=True, comment="clear")              # up=False: thumbs down; up=None: taken back
    store.arena_vote(reply_a, reply_b, "a")                   # a, b, tie, both_bad
    store.export("prefs.jsonl")                               # canonical preference records, "source": "feedback"
    store.preference_records(since=t0, until=t1)              # only the votes and thumbs given in (t0, t1]
    store.unpaired_records()                                  # thumbed replies, one each (KTO's examples)
    store.battles()                                           # arena votes as (model A, model B, winner)

    rlhfchat feedback export --db URL --out prefs.jsonl [--since 2026-05-01T00:00]
    rlhfchat feedback stats --db URL                          # counts and the arena leaderboard

Export pairs: an arena vote for A or B gives (chosen = the winner's reply, rejected = the other's) on the prompt
both models saw; thumbs give every (up, down) pair of replies to the same prompt (the same messages, system prompt
included), where a reply's score is the sum of each user's latest thumb. Ties and "both bad" give no pair.
`since`/`until` (timezone-aware datetimes; naive ones are taken as UTC) keep the votes and thumbs given in that
window, judged by the vote's or thumb's own time: `rlhfchat iterate` takes each round's feedback this way.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import (
    JSON, DateTime, ForeignKey, Integer, String, Text, create_engine, event, func, inspect, select, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from rlhfchat.data.schema import preference, unpaired, write_jsonl
from rlhfchat.errors import RlhfchatError

WINNERS = ("a", "b", "tie", "both_bad")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("export", help="write arena votes and thumbs as canonical preference records (JSONL)")
    p.add_argument("--db", required=True, help="database URL (postgresql://...) or a SQLite file path")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--since", type=parse_time, default=None, metavar="TIME",
                   help="only votes and thumbs given after TIME (ISO 8601, e.g. 2026-05-01T12:00; UTC unless an "
                        "offset is given)")
    p = sub.add_parser("stats", help="counts of replies, thumbs and votes, and the arena leaderboard "
                                     "(Bradley-Terry ratings on the Elo scale with bootstrap intervals)")
    p.add_argument("--db", required=True, help="database URL (postgresql://...) or a SQLite file path")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-05-01T12:00, got {text!r}")
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def main(args: argparse.Namespace) -> None:
    store = FeedbackStore(args.db, create=False)
    try:
        if args.action == "stats":
            print(format_stats(store, bootstrap=args.bootstrap, seed=args.seed))
            return
        records = store.preference_records(since=args.since)
        n = write_jsonl(args.out, records)
        arena = sum(r["id"].startswith("feedback-arena-") for r in records)
        print(f"{n} preference records written to {args.out} ({arena} from arena votes, {n - arena} from thumbs)")
    finally:
        store.close()


def arena_leaderboard(store: FeedbackStore, bootstrap: int = 1000, seed: int = 0) -> list[Any]:
    """The arena's ratings (eval/leaderboard.py: Bradley-Terry on the Elo scale, bootstrap intervals), best first."""
    from rlhfchat.eval.leaderboard import leaderboard

    return leaderboard(store.battles(), bootstrap=bootstrap, seed=seed)


def format_stats(store: FeedbackStore, bootstrap: int = 1000, seed: int = 0) -> str:
    """What `rlhfchat feedback stats` prints: the counts, then the leaderboard as a text table."""
    c = store.counts()
    thumbs = store.thumb_counts()
    outcomes = store.vote_counts()
    lines = [f"feedback in {store.safe_url()}",
             f"  {c['conversations']} conversations, {c['replies']} replies",
             f"  thumbs: {thumbs['up']} up, {thumbs['down']} down (each user's latest thumb on a reply), "
             f"{thumbs['comments']} with a comment",
             f"  arena votes: {c['arena_votes']} ({', '.join(f'{k} {v}' for k, v in outcomes.items())})"]
    rows = arena_leaderboard(store, bootstrap, seed)
    if not rows:
        lines.append("no arena votes between two different models yet: no leaderboard")
        return "\n".join(lines)
    lines += ["", f"arena leaderboard (Bradley-Terry on the Elo scale; 95% interval from {bootstrap} bootstrap "
                  "resamples of the votes):"]
    table = [["rank", "model", "rating", "95% interval", "battles", "wins", "ties", "losses"]]
    for i, r in enumerate(rows, 1):
        table.append([str(i), r.model, f"{r.rating:.0f}", f"[{r.lower:.0f}, {r.upper:.0f}]", str(r.battles),
                      str(r.wins), str(r.ties), str(r.losses)])
    widths = [max(len(row[k]) for row in table) for k in range(len(table[0]))]
    for row in table:
        lines.append("  " + "  ".join(cell.ljust(w) if k == 1 else cell.rjust(w)
                                       for k, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def db_url(db: str | Path) -> str:
    """A SQLAlchemy URL from a URL or a file path (a path means SQLite)."""
    db = str(db)
    if "://" in db:
        scheme, rest = db.split("://", 1)
        if scheme in ("postgresql", "postgres"):  # no driver named: the one installed (the postgres extra's psycopg2)
            return f"postgresql+{_postgres_driver()}://{rest}"
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


def _postgres_driver() -> str:
    """psycopg (3) where it is installed, else psycopg2 (what `pip install 'rlhfchat[postgres]'` brings); SQLAlchemy
    alone would take psycopg for a plain postgresql:// URL and fail where only psycopg2 is there."""
    import importlib.util

    return next((name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)), "psycopg")


def default_db(model_dirs: list[str | Path]) -> Path:
    """Where `serve` keeps feedback without --db: feedback.db in the run folder of the first model
    (runs/NAME/ when serving runs/NAME/ppo), else in the current folder."""
    parent = Path(model_dirs[0]).resolve().parent
    if (parent / "recipe.yaml").is_file():
        return parent / "feedback.db"
    return Path.cwd() / "feedback.db"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(t: datetime | None) -> datetime | None:
    """A time as the store compares it: timezone-aware UTC (a naive time is taken as UTC)."""
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _window(query: Any, column: Any, since: datetime | None, until: datetime | None) -> Any:
    """`query` limited to rows whose `column` time is in (since, until]."""
    if since is not None:
        query = query.where(column > _utc(since))
    if until is not None:
        query = query.where(column <= _utc(until))
    return query


def _new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    pass


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_id)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    source: Mapped[str] = mapped_column(String(32))  # web, arena, terminal, discord, api
    client: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)


class Reply(Base):
    __tablename__ = "replies"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    model: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[list] = mapped_column(JSON)  # the messages the model saw
    content: Mapped[str] = mapped_column(Text)
    sampling: Mapped[dict] = mapped_column(JSON)
    finish_reason: Mapped[str] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)


class Thumb(Base):
    __tablename__ = "thumbs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reply_id: Mapped[str] = mapped_column(ForeignKey("replies.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    value: Mapped[int] = mapped_column(Integer)  # +1 up, -1 down, 0 taken back
    user: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    comment: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


ADDED_COLUMNS = {"thumbs": {"comment": "TEXT"}}
"""Columns added after a table's first release: a store made before them gets them when it is opened (SQLite and
PostgreSQL both take `ALTER TABLE ... ADD COLUMN`), so an old feedback.db keeps working."""


class ArenaVote(Base):
    __tablename__ = "arena_votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    reply_a_id: Mapped[str] = mapped_column(ForeignKey("replies.id"))
    reply_b_id: Mapped[str] = mapped_column(ForeignKey("replies.id"))
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    winner: Mapped[str] = mapped_column(String(16))  # a, b, tie, both_bad
    user: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)


# the Discord bot's links (chat/discord_bot.DiscordLinks): which Discord thread and message is which conversation
# and reply, and the bot's own settings (its salt). One schema, created with the store.
class DiscordThread(Base):
    """A thread the bot opened, its conversation in the store, and the question it was opened with."""

    __tablename__ = "discord_threads"
    thread_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"), index=True)
    opening: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class DiscordMessage(Base):
    """One Discord message of a bot reply (a reply over 2000 characters has several)."""

    __tablename__ = "discord_messages"
    message_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    reply_id: Mapped[str] = mapped_column(ForeignKey("replies.id"), index=True)
    thread_id: Mapped[Optional[str]] = mapped_column(String(32), nullable=True)


class DiscordSetting(Base):
    __tablename__ = "discord_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class FeedbackStore:
    """Conversations, replies, thumbs and arena votes in SQLite (WAL) or any SQLAlchemy database. Thread-safe."""

    def __init__(self, db: str | Path, *, create: bool = True):
        self.url = db_url(db)
        if self.url.startswith("sqlite:///") and not create:
            path = Path(self.url[len("sqlite:///"):])
            if not path.is_file():
                raise RlhfchatError(f"--db: {path} does not exist")
        if self.url.startswith("sqlite:///"):
            Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        except Exception as e:  # bad URL, missing driver
            raise RlhfchatError(f"--db: cannot use {self.safe_url()} ({str(e).splitlines()[0]})") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)
        except Exception as e:
            raise RlhfchatError(f"--db: cannot open {self.safe_url()} ({str(e).splitlines()[0]})") from None
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    def safe_url(self) -> str:
        """The URL with any password hidden, for messages."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "the database URL"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing
    def new_conversation(self, source: str = "web", client: str | None = None) -> str:
        with self.Session.begin() as s:
            conv = Conversation(source=source, client=client)
            s.add(conv)
        return conv.id

    def add_reply(self, conversation_id: str, completion: Any = None, *, model: str | None = None,
                  prompt: list[dict[str, str]] | None = None, content: str | None = None,
                  sampling: dict[str, Any] | None = None, finish_reason: str = "stop",
                  reply_id: str | None = None) -> str:
        """Record one reply: from an engine Completion, or from the keyword fields; returns its id."""
        if completion is not None:
            model, prompt, content = completion.model, completion.messages, completion.text
            sampling, finish_reason = completion.params.to_dict(), completion.finish_reason
            tokens = (completion.prompt_tokens, completion.completion_tokens)
        else:
            tokens = (0, 0)
        with self.Session.begin() as s:
            reply = Reply(id=reply_id or _new_id(), conversation_id=conversation_id, model=model, prompt=prompt,
                          content=content, sampling=sampling or {}, finish_reason=finish_reason,
                          prompt_tokens=tokens[0], completion_tokens=tokens[1])
            s.add(reply)
        return reply.id

    def thumb(self, reply_id: str, up: bool | None, user: str | None = None, comment: str | None = None) -> int:
        """Thumbs up (True), down (False) or taken back (None) on a reply, with an optional comment; a user's latest
        thumb counts. Returns the thumb's id."""
        with self.Session.begin() as s:
            if s.get(Reply, reply_id) is None:
                raise RlhfchatError(f"reply_id: no reply {reply_id!r}")
            thumb = Thumb(reply_id=reply_id, value=0 if up is None else (1 if up else -1), user=user, comment=comment)
            s.add(thumb)
        return thumb.id

    def arena_vote(self, reply_a_id: str, reply_b_id: str, winner: str, user: str | None = None) -> int:
        if winner not in WINNERS:
            raise RlhfchatError(f"winner: expected one of {', '.join(WINNERS)}, got {winner!r}")
        with self.Session.begin() as s:
            a, b = s.get(Reply, reply_a_id), s.get(Reply, reply_b_id)
            if a is None or b is None:
                raise RlhfchatError(f"reply_{'a' if a is None else 'b'}_id: no such reply")
            vote = ArenaVote(reply_a_id=a.id, reply_b_id=b.id, model_a=a.model, model_b=b.model, winner=winner,
                                  user=user)
            s.add(vote)
        return vote.id

    # ------------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        with self.Session() as s:
            return {name: s.scalar(select(func.count()).select_from(t)) or 0 for name, t in (
                ("conversations", Conversation), ("replies", Reply), ("thumbs", Thumb),
                ("arena_votes", ArenaVote))}

    def arena_votes(self) -> list[dict[str, Any]]:
        with self.Session() as s:
            return [{"id": v.id, "created_at": v.created_at, "reply_a_id": v.reply_a_id, "reply_b_id": v.reply_b_id,
                     "model_a": v.model_a, "model_b": v.model_b, "winner": v.winner, "user": v.user}
                    for v in s.scalars(select(ArenaVote).order_by(ArenaVote.id))]

    def thumbs(self, reply_id: str | None = None) -> list[dict[str, Any]]:
        """Every thumb given (on one reply, or on all), oldest first: value +1, -1 or 0 (taken back)."""
        query = select(Thumb).order_by(Thumb.id)
        if reply_id is not None:
            query = query.where(Thumb.reply_id == reply_id)
        with self.Session() as s:
            return [{c.name: getattr(t, c.name) for c in Thumb.__table__.columns} for t in s.scalars(query)]

    def reply(self, reply_id: str) -> dict[str, Any] | None:
        with self.Session() as s:
            r = s.get(Reply, reply_id)
            return None if r is None else {c.name: getattr(r, c.name) for c in Reply.__table__.columns}

    def _latest_votes(self, s: Any, since: datetime | None, until: datetime | None) -> list[Any]:
        """The arena votes in the window, the latest one per pair of replies (a re-vote replaces the first)."""
        latest: dict[tuple[str, str], Any] = {}
        for v in s.scalars(_window(select(ArenaVote), ArenaVote.created_at, since, until).order_by(ArenaVote.id)):
            latest[(v.reply_a_id, v.reply_b_id)] = v
        return sorted(latest.values(), key=lambda v: v.id)

    def _scores(self, s: Any, since: datetime | None, until: datetime | None) -> dict[str, int]:
        """Each thumbed reply's score in the window: the sum over users of their latest thumb (+1, -1, 0)."""
        latest: dict[tuple[str, str | None], int] = {}
        for t in s.scalars(_window(select(Thumb), Thumb.created_at, since, until).order_by(Thumb.id)):
            latest[(t.reply_id, t.user)] = t.value
        score: dict[str, int] = defaultdict(int)
        for (reply_id, _), value in latest.items():
            score[reply_id] += value
        return score

    def thumb_counts(self) -> dict[str, int]:
        """{"up", "down"}: the users' latest thumbs, one per user and reply, that are up or down; "comments": the
        thumbs given with a comment."""
        with self.Session() as s:
            latest: dict[tuple[str, str | None], int] = {}
            comments = 0
            for t in s.scalars(select(Thumb).order_by(Thumb.id)):
                latest[(t.reply_id, t.user)] = t.value
                comments += bool(t.comment)
        return {"up": sum(v > 0 for v in latest.values()), "down": sum(v < 0 for v in latest.values()),
                "comments": comments}

    def vote_counts(self) -> dict[str, int]:
        """Arena votes by outcome: {"a", "b", "tie", "both_bad"}."""
        with self.Session() as s:
            found = dict(s.execute(select(ArenaVote.winner, func.count()).group_by(ArenaVote.winner)).all())
        return {w: int(found.get(w, 0)) for w in WINNERS}

    def battles(self, since: datetime | None = None, until: datetime | None = None) -> list[tuple[str, str, str]]:
        """Arena votes as (model A, model B, winner) for eval/leaderboard.py: the latest vote per pair of replies;
        votes between two replies of one model (which rate nothing) are left out."""
        with self.Session() as s:
            return [(v.model_a, v.model_b, v.winner) for v in self._latest_votes(s, since, until)
                    if v.model_a != v.model_b]

    def unpaired_records(self, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
        """Each thumbed reply as one KTO example (train/kto.py's unpaired records): desirable when its score (the
        users' latest thumbs summed) is above 0, undesirable below; the thumbs of the window only."""
        with self.Session() as s:
            score = self._scores(s, since, until)
            rated = s.scalars(select(Reply).where(Reply.id.in_([r for r, v in score.items() if v]))
                              .order_by(Reply.created_at, Reply.id))
            return [unpaired(f"feedback-thumb-{r.id}", "feedback", r.prompt, r.content, score[r.id] > 0)
                    for r in rated]

    def preference_records(self, since: datetime | None = None, until: datetime | None = None
                           ) -> list[dict[str, Any]]:
        """Canonical preference records from arena votes (A or B) and thumbs (up vs down on the same prompt), of the
        votes and thumbs given in (since, until] (everything by default)."""
        records = []
        with self.Session() as s:
            for v in self._latest_votes(s, since, until):
                if v.winner not in ("a", "b"):
                    continue
                a, b = s.get(Reply, v.reply_a_id), s.get(Reply, v.reply_b_id)
                chosen, rejected = (a, b) if v.winner == "a" else (b, a)
                if chosen.content != rejected.content:
                    records.append(preference(f"feedback-arena-{v.id}", "feedback", chosen.prompt, chosen.content,
                                              rejected.content))

            score = self._scores(s, since, until)
            by_prompt: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
            rated = [r for r in s.scalars(select(Reply).where(Reply.id.in_(list(score)))
                                          .order_by(Reply.created_at, Reply.id)) if score[r.id]]
            for r in rated:
                ups, downs = by_prompt[json.dumps(r.prompt, sort_keys=True, ensure_ascii=False)]
                (ups if score[r.id] > 0 else downs).append(r)
            for ups, downs in by_prompt.values():
                for up in ups:
                    for down in downs:
                        if up.content != down.content:
                            records.append(preference(f"feedback-thumbs-{up.id}-{down.id}", "feedback", up.prompt,
                                                      up.content, down.content))
        return records

    def export(self, out: str | Path) -> int:
        """Write the preference records to a JSONL file; returns how many."""
        return write_jsonl(out, self.preference_records())


def same_question(prompt_a: list[dict[str, str]], prompt_b: list[dict[str, str]]) -> bool:
    """Whether two replies answer the same question: the same system prompt and user turns. Earlier assistant turns
    may differ: in a conversation with two models each sees its own replies (as in the web page's arena)."""
    def asked(prompt: list[dict[str, str]]) -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in prompt if m["role"] != "assistant"]

    return asked(prompt_a) == asked(prompt_b)


def _add_missing_columns(engine: Any) -> None:
    """ADDED_COLUMNS that a store made by an older rlhfchat lacks."""
    found = inspect(engine)
    for table, columns in ADDED_COLUMNS.items():
        have = {c["name"] for c in found.get_columns(table)}
        for name, sql_type in columns.items():
            if name not in have:
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets the web server write while an export reads; a busy timeout instead of 'database is locked'."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
