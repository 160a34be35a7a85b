#!/usr/bin/python3
"""Small Flask-SQLAlchemy app with two databases, used by the integration tests.

Written for Debian's python3-flask-sqlalchemy 3.0.x (SQLAlchemy 1.4): binds are
configured with SQLALCHEMY_BINDS and models pick one with __bind_key__.

  INSTANCE_DIR/app.db    default bind: user, post
  INSTANCE_DIR/audit.db  bind "audit": event

Usage:
  flask_app.py INSTANCE_DIR --node N --seed S --ops K [--sleep-ms X] [--journal-file PATH]
  flask_app.py INSTANCE_DIR --init-only        # db.create_all() and exit

Each op is one ORM change (add/update/delete) followed by a commit; about half
of them are followed by an audit Event in a second commit.  (One commit per
database keeps the journal exact: a session commit spanning both binds is not
atomic, and a lock error between the two COMMITs would leave a committed but
unjournaled change.)
Integer ids come from the node's range (node*1_000_000 + counter), post ids
are uuid4 text, so inserts never collide; updates/deletes pick existing rows
at random, including rows other nodes created.

Journal: same convention as random_writer.py -- one JSON line per committed
change, after the commit succeeded, on stdout or --journal-file:
  {"node": 1, "txn": 3, "db": "app.db", "table": "user", "op": "insert",
   "key": {"id": 1000003}}
A test can only require that rows inserted by some node and deleted by no
node exist everywhere.  Lock errors and rows that vanished under us are
retried; `LOCKED n` and `STALE n` go to stderr at the end.
"""

import argparse
import datetime as dt
import os
import random
import sys
import time
import uuid

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm.exc import ObjectDeletedError, StaleDataError

# Value pools, Journal and the id range are shared with the plain writer.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_writer import (  # noqa: E402
    NODE_RANGE, Journal, StopOnTerm, is_locked_error, maybe_null, pick_blob, pick_real, pick_text,
)

# engine_options given to the constructor apply to every bind; in 3.0.x
# SQLALCHEMY_ENGINE_OPTIONS would only reach the default bind.
db = SQLAlchemy(engine_options={"connect_args": {"timeout": 30}})


class User(db.Model):
    __tablename__ = "user"
    # autoincrement=False: ids are assigned from the node's range.
    id = db.Column(db.Integer, primary_key=True, autoincrement=False)
    name = db.Column(db.String(200), nullable=False)  # deliberately not unique (yet)
    email = db.Column(db.String(200))
    created = db.Column(db.DateTime, nullable=False)
    score = db.Column(db.Float)
    avatar = db.Column(db.LargeBinary, nullable=True)


class Post(db.Model):
    __tablename__ = "post"
    id = db.Column(db.String(36), primary_key=True)  # uuid4 text
    # Declared FK; SQLite does not enforce it (PRAGMA foreign_keys is off), so a
    # post inserted on one node while another deletes the user may be orphaned.
    user_id = db.Column(db.Integer, db.ForeignKey("user.id"), nullable=False)
    title = db.Column(db.String(300), nullable=False)
    body = db.Column(db.Text)
    published = db.Column(db.Boolean, nullable=False, default=False)


class Event(db.Model):
    __bind_key__ = "audit"
    __tablename__ = "event"
    id = db.Column(db.Integer, primary_key=True, autoincrement=False)
    kind = db.Column(db.String(50), nullable=False)
    payload = db.Column(db.Text)
    at = db.Column(db.DateTime, nullable=False)


DB_FILE = {User: "app.db", Post: "app.db", Event: "audit.db"}


def create_app(instance_dir):
    instance_dir = os.path.abspath(instance_dir)
    os.makedirs(instance_dir, exist_ok=True)
    app = Flask(__name__, instance_path=instance_dir)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(instance_dir, "app.db")
    app.config["SQLALCHEMY_BINDS"] = {"audit": "sqlite:///" + os.path.join(instance_dir, "audit.db")}
    db.init_app(app)
    return app


class Actions:
    def __init__(self, node, rng):
        self.node = node
        self.rng = rng
        self.counter = self._start_counter()

    def _start_counter(self):
        """Continue after this node's highest id already present (restarts)."""
        lo, hi = self.node * NODE_RANGE, self.node * NODE_RANGE + NODE_RANGE - 1
        best = lo
        for model in (User, Event):
            m = db.session.scalar(select(func.max(model.id)).where(model.id.between(lo, hi)))
            if m is not None:
                best = max(best, m)
        return best - lo

    def next_id(self):
        self.counter += 1
        return self.node * NODE_RANGE + self.counter

    def when(self):
        # Whole microseconds: SQLAlchemy stores DateTime as ISO text on SQLite.
        base = dt.datetime(2000, 1, 1)
        return base + dt.timedelta(microseconds=self.rng.randrange(30 * 365 * 86400 * 10**6))

    def pick(self, model):
        """A random existing row (from any node) or None; count+OFFSET keeps it seeded."""
        count = db.session.scalar(select(func.count()).select_from(model))
        if not count:
            return None
        return db.session.scalars(
            select(model).order_by(model.id).offset(self.rng.randrange(count)).limit(1)).first()

    def entry(self, model, op, obj_id):
        return {"node": self.node, "db": DB_FILE[model], "table": model.__tablename__,
                "op": op, "key": {"id": obj_id}}

    # Each action stages changes in the session and returns journal entries.

    def add_user(self):
        rng = self.rng
        u = User(id=self.next_id(), name=pick_text(rng), email=maybe_null(rng, f"n{self.node}@example.com"),
                 created=self.when(), score=maybe_null(rng, pick_real(rng)),
                 avatar=maybe_null(rng, pick_blob(rng), p=0.3))
        db.session.add(u)
        return [self.entry(User, "insert", u.id)]

    def update_user(self):
        u = self.pick(User)
        if u is None:
            return self.add_user()
        rng = self.rng
        if rng.random() < 0.5:
            u.name = pick_text(rng)
        else:
            u.score = maybe_null(rng, pick_real(rng))
            u.avatar = maybe_null(rng, pick_blob(rng), p=0.3)
        return [self.entry(User, "update", u.id)]

    def delete_user(self):
        u = self.pick(User)
        if u is None:
            return self.add_user()
        # Like a real app, remove the user's posts first (no ORM cascade configured).
        posts = db.session.scalars(select(Post).where(Post.user_id == u.id)).all()
        out = []
        for p in posts:
            db.session.delete(p)
            out.append(self.entry(Post, "delete", p.id))
        db.session.delete(u)
        out.append(self.entry(User, "delete", u.id))
        return out

    def add_post(self):
        u = self.pick(User)
        if u is None:
            return self.add_user()
        rng = self.rng
        p = Post(id=str(uuid.uuid4()), user_id=u.id, title=pick_text(rng),
                 body=maybe_null(rng, pick_text(rng)), published=rng.random() < 0.5)
        db.session.add(p)
        return [self.entry(Post, "insert", p.id)]

    def update_post(self):
        p = self.pick(Post)
        if p is None:
            return self.add_post()
        rng = self.rng
        p.title = pick_text(rng)
        p.published = not p.published
        return [self.entry(Post, "update", p.id)]

    def delete_post(self):
        p = self.pick(Post)
        if p is None:
            return self.add_post()
        db.session.delete(p)
        return [self.entry(Post, "delete", p.id)]

    def add_event(self, kind="manual"):
        e = Event(id=self.next_id(), kind=kind, payload=maybe_null(self.rng, pick_text(self.rng)),
                  at=self.when())
        db.session.add(e)
        return [self.entry(Event, "insert", e.id)]

    def update_event(self):
        e = self.pick(Event)
        if e is None:
            return self.add_event()
        e.payload = pick_text(self.rng)
        return [self.entry(Event, "update", e.id)]

    def delete_event(self):
        e = self.pick(Event)
        if e is None:
            return self.add_event()
        db.session.delete(e)
        return [self.entry(Event, "delete", e.id)]

    def random_action(self):
        return self.rng.choices(
            ["add_user", "update_user", "delete_user", "add_post", "update_post", "delete_post",
             "add_event", "update_event", "delete_event"],
            weights=[4, 3, 1, 4, 3, 1, 2, 1, 1])[0]


def commit_with_retry(stage, stats):
    """stage() adds changes to the session; commit them, retrying on conflicts.

    Default pysqlite behaviour (like a normal Flask app): the SELECT that picked
    a row runs before the implicit BEGIN, so the agent may change or delete that
    row in between.  SQLAlchemy then raises StaleDataError/ObjectDeletedError;
    like a lock error, we roll back and re-draw the op."""
    for attempt in range(1000):
        try:
            entries = stage()
            db.session.commit()
            return entries
        except (OperationalError, StaleDataError, ObjectDeletedError) as exc:
            db.session.rollback()
            if isinstance(exc, OperationalError):
                if not is_locked_error(exc):
                    raise
                stats["locked"] += 1
            else:
                stats["stale"] += 1
            time.sleep(min(0.5, 0.01 * (attempt + 1)))
    raise RuntimeError("gave up after 1000 retries")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("instance_dir")
    ap.add_argument("--node", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=0)
    ap.add_argument("--sleep-ms", type=float, default=0)
    ap.add_argument("--journal-file", default=None, help="append the op journal here instead of stdout")
    ap.add_argument("--init-only", action="store_true", help="create the tables and exit")
    args = ap.parse_args(argv)
    if not args.init_only and (args.node is None or not 1 <= args.node < 1000):
        ap.error("--node in 1..999 is required unless --init-only")
    # SIGTERM stops it between transactions, each journaled (random_writer.StopOnTerm).
    stop = StopOnTerm()

    app = create_app(args.instance_dir)
    stats = {"locked": 0, "stale": 0}
    with app.app_context():
        # Several nodes may start at once: create_all can hit a lock too.
        commit_with_retry(lambda: db.create_all(), stats)  # all binds
        if args.init_only:
            print(f"LOCKED {stats['locked']}", file=sys.stderr)
            return 0

        rng = random.Random(args.seed * 1000 + args.node)  # per node, like random_writer
        actions = Actions(args.node, rng)
        journal = Journal(args.journal_file)
        for _ in range(args.ops):
            if stop.requested:
                break
            name = actions.random_action()
            journal.commit(commit_with_retry(getattr(actions, name), stats))
            if name != "add_event" and rng.random() < 0.5:
                journal.commit(commit_with_retry(lambda: actions.add_event(kind=name), stats))
            if args.sleep_ms:
                time.sleep(args.sleep_ms / 1000)
        db.session.remove()
        journal.close()
    print(f"LOCKED {stats['locked']}", file=sys.stderr)
    print(f"STALE {stats['stale']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
