#!/usr/bin/python3
"""A small scouting app for an event (Flask + Flask-SQLAlchemy, Debian's 3.0.x on
SQLAlchemy 1.4), for the integrity tests: a parent table whose integer ids are
natural (the match number of the event schedule: match 5 is the same match on
every node), a child table with ON DELETE CASCADE, a key-value table, and a
second database bound with SQLALCHEMY_BINDS.

  INSTANCE_DIR/scout.db   match(id = match number 1..12, name)
                          scouting(id picked by SQLite, uid UNIQUE, match_id -> match ON DELETE CASCADE,
                                   team, score, notes)
                          kv(k PRIMARY KEY, v)
  INSTANCE_DIR/extra.db   comment(id picked by SQLite, uid UNIQUE, body)     (bind "extra")

Every connection turns PRAGMA foreign_keys on (so the database itself cascades a
match's delete to its scouting rows) and keeps Python's default 5 s busy timeout.

Usage:
  flask_scout.py INSTANCE_DIR --init                     create both databases and seed them
  flask_scout.py INSTANCE_DIR --ops N --seed S --node K [--sleep-ms X] [--journal-file F]
  flask_scout.py INSTANCE_DIR --set KEY VALUE            [--node K] [--journal-file F]
  flask_scout.py INSTANCE_DIR --delete-match ID          [--node K] [--journal-file F]
  flask_scout.py INSTANCE_DIR --add-scouting MATCH_ID    [--node K] [--journal-file F]

--ops sends N random requests to the app's own routes (through Flask's test
client; each request is one ORM transaction): get-or-create a match by number,
add a scouting row to an existing match, edit a scouting row, delete a match,
delete a scouting row, set a kv row, add a comment. Targets are picked from what
the node holds at that moment (GET /matches, GET /scouting), so a request may
find its row gone (replayed delete): 404, and the driver picks another request.
Locked (503) or clashing (409) requests are rolled back and retried the same way.

Journal: one JSON line per committed change, written after the commit succeeded
(stdout unless --journal-file is given, which is appended to):
  {"node": "1", "t": 1733.5, "op": "insert", "table": "match", "id": 5}
  {"node": "1", "t": ..., "op": "insert", "table": "scouting", "uid": "9f..", "match": 5}
  {"node": "1", "t": ..., "op": "update", "table": "scouting", "uid": "9f.."}
  {"node": "1", "t": ..., "op": "delete", "table": "match", "id": 5, "cascade": ["9f..", ...]}
  {"node": "1", "t": ..., "op": "delete", "table": "scouting", "uid": "9f.."}
  {"node": "1", "t": ..., "op": "set", "table": "kv", "k": "x", "v": "2026"}
  {"node": "1", "t": ..., "op": "insert", "table": "comment", "uid": "0c.."}
"t" is the wall-clock time (time.time()) just after the commit. A get-or-create
that found the match commits nothing and writes no line. "cascade" lists the
scouting rows the database's cascade removed: read in the same transaction as
the delete, which holds the write lock from its start, so it is exact.
The --init seed is journaled too (with "seed": true).
"""

import argparse
import json
import os
import random
import sys
import time
import uuid

from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

MATCHES = range(1, 13)  # the event schedule: qualification matches 1..12

db = SQLAlchemy()


@event.listens_for(Engine, "connect")
def _on_connect(dbapi_conn, _record):
    # SQLite leaves foreign keys off unless each connection asks; this app asks, so
    # deleting a match really cascades to its scouting rows.
    # isolation_level None: pysqlite would otherwise start transactions only at the
    # first INSERT/UPDATE/DELETE, so a read just before a write would run outside
    # the write's transaction. The "begin" hook below starts them instead (the
    # recipe in SQLAlchemy's pysqlite docs).
    dbapi_conn.isolation_level = None
    dbapi_conn.execute("PRAGMA foreign_keys = ON")


@event.listens_for(Engine, "begin")
def _on_begin(conn):
    # IMMEDIATE: every request takes the write lock at its first statement (waiting up
    # to the busy timeout), so what it reads is what it writes over: the uids journaled
    # for a match's cascade are exactly the rows the cascade removes.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Match(db.Model):
    __tablename__ = "match"
    # A natural id: the match number, given by the app, never picked by SQLite.
    id = db.Column(db.Integer, primary_key=True, autoincrement=False)
    name = db.Column(db.Text)
    scoutings = db.relationship("Scouting", back_populates="match", cascade="all, delete-orphan", passive_deletes=True)


class Scouting(db.Model):
    __tablename__ = "scouting"
    id = db.Column(db.Integer, primary_key=True)  # SQLite picks max + 1
    uid = db.Column(db.Text, unique=True, nullable=False)
    match_id = db.Column(db.Integer, db.ForeignKey("match.id", ondelete="CASCADE"), nullable=False)
    team = db.Column(db.Text)
    score = db.Column(db.Integer)
    notes = db.Column(db.Text)
    match = db.relationship("Match", back_populates="scoutings")


class Kv(db.Model):
    __tablename__ = "kv"
    k = db.Column(db.Text, primary_key=True)
    v = db.Column(db.Text)


class Comment(db.Model):
    __bind_key__ = "extra"
    __tablename__ = "comment"
    id = db.Column(db.Integer, primary_key=True)
    uid = db.Column(db.Text, unique=True)
    body = db.Column(db.Text)


def new_uid():
    return uuid.uuid4().hex


def create_app(instance_dir):
    instance_dir = os.path.abspath(instance_dir)
    os.makedirs(instance_dir, exist_ok=True)
    app = Flask(__name__, instance_path=instance_dir)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(instance_dir, "scout.db")
    app.config["SQLALCHEMY_BINDS"] = {"extra": "sqlite:///" + os.path.join(instance_dir, "extra.db")}
    db.init_app(app)

    # ---- routes: each request is one transaction, committed before it answers 2xx

    @app.get("/matches")
    def list_matches():
        return jsonify(sorted(db.session.scalars(select(Match.id))))

    @app.put("/matches/<int:mid>")
    def get_or_create_match(mid):
        m = db.session.get(Match, mid)
        if m is not None:
            return jsonify({"created": False})
        db.session.add(Match(id=mid, name=f"Qualification {mid}"))
        db.session.commit()
        return jsonify({"created": True}), 201

    @app.delete("/matches/<int:mid>")
    def delete_match(mid):
        m = db.session.get(Match, mid)
        if m is None:
            return jsonify({"error": "no such match"}), 404
        # The scouting rows the cascade is about to remove (same transaction).
        gone = sorted(db.session.scalars(select(Scouting.uid).where(Scouting.match_id == mid)))
        db.session.delete(m)  # passive_deletes: the database's ON DELETE CASCADE removes them
        db.session.commit()
        return jsonify({"cascade": gone})

    @app.get("/scouting")
    def list_scouting():
        return jsonify(sorted(db.session.scalars(select(Scouting.uid))))

    @app.post("/matches/<int:mid>/scouting")
    def add_scouting(mid):
        m = db.session.get(Match, mid)
        if m is None:
            return jsonify({"error": "no such match"}), 404
        body = request.get_json()
        s = Scouting(uid=new_uid(), match=m, team=body["team"], score=body["score"], notes=body.get("notes"))
        db.session.add(s)
        db.session.commit()
        return jsonify({"uid": s.uid}), 201

    @app.patch("/scouting/<uid>")
    def edit_scouting(uid):
        s = db.session.scalar(select(Scouting).where(Scouting.uid == uid))
        if s is None:
            return jsonify({"error": "no such scouting row"}), 404
        body = request.get_json()
        s.score = body["score"]
        s.notes = body["notes"]
        db.session.commit()
        return jsonify({"uid": uid})

    @app.delete("/scouting/<uid>")
    def delete_scouting(uid):
        s = db.session.scalar(select(Scouting).where(Scouting.uid == uid))
        if s is None:
            return jsonify({"error": "no such scouting row"}), 404
        db.session.delete(s)
        db.session.commit()
        return jsonify({"uid": uid})

    @app.put("/kv/<k>")
    def set_kv(k):
        db.session.merge(Kv(k=k, v=request.get_json()["v"]))
        db.session.commit()
        return jsonify({"k": k})

    @app.post("/comments")
    def add_comment():
        c = Comment(uid=new_uid(), body=request.get_json()["body"])
        db.session.add(c)
        db.session.commit()
        return jsonify({"uid": c.uid}), 201

    @app.errorhandler(OperationalError)
    def locked(e):
        db.session.rollback()
        return jsonify({"error": "locked", "detail": str(e).splitlines()[0]}), 503

    @app.errorhandler(IntegrityError)
    def clash(e):
        db.session.rollback()
        return jsonify({"error": "integrity", "detail": str(e).splitlines()[0]}), 409

    return app


# ---------------------------------------------------------------------------
# Seed and the request driver


def init(app, journal):
    with app.app_context():
        db.create_all()
        for mid in MATCHES:
            db.session.add(Match(id=mid, name=f"Qualification {mid}"))
        db.session.commit()
        journal.write({"seed": True, "op": "insert", "table": "match", "ids": list(MATCHES)})
        # A few scouting rows, two of them on match 3 (the match the late-join test deletes).
        for mid, team, score in [(1, "frc254", 88), (2, "frc1678", 71), (3, "frc118", 64), (3, "frc971", 90), (4, "frc2056", 77), (5, "frc33", 59)]:
            s = Scouting(uid=new_uid(), match_id=mid, team=team, score=score, notes="seed")
            db.session.add(s)
            db.session.commit()
            journal.write({"seed": True, "op": "insert", "table": "scouting", "uid": s.uid, "match": mid})
        db.session.add_all([Kv(k="x", v="2025"), Kv(k="y", v="keep")])
        db.session.commit()
        c = Comment(uid=new_uid(), body="seed comment")
        db.session.add(c)
        db.session.commit()
        journal.write({"seed": True, "op": "insert", "table": "comment", "uid": c.uid})


class Journal:
    def __init__(self, path, node):
        self.out = open(path, "a") if path else sys.stdout
        self.node = node

    def write(self, entry):
        self.out.write(json.dumps({"node": self.node, "t": time.time(), **entry}) + "\n")
        self.out.flush()


class Driver:
    """Sends one request; returns the journal entry (or None when nothing changed) and
    raises Retry when the request did not commit (404/409/503)."""

    class Retry(Exception):
        pass

    def __init__(self, client, rng):
        self.client, self.rng = client, rng

    def call(self, method, url, body=None):
        r = self.client.open(url, method=method, json=body)
        if r.status_code >= 400:
            raise Driver.Retry(f"{method} {url}: {r.status_code} {r.get_data(as_text=True).strip()[:200]}")
        return r.get_json()

    def pick_match(self):
        ids = self.call("GET", "/matches")
        return self.rng.choice(ids) if ids else None

    def pick_scouting(self):
        uids = self.call("GET", "/scouting")
        return self.rng.choice(uids) if uids else None

    def get_or_create_match(self):
        mid = self.rng.choice(MATCHES)
        if self.call("PUT", f"/matches/{mid}")["created"]:
            return {"op": "insert", "table": "match", "id": mid}
        return None

    def add_scouting(self, mid=None):
        mid = mid if mid is not None else self.pick_match()
        if mid is None:
            return self.get_or_create_match()
        body = {"team": f"frc{self.rng.randrange(1, 9999)}", "score": self.rng.randrange(0, 120), "notes": "added"}
        uid = self.call("POST", f"/matches/{mid}/scouting", body)["uid"]
        return {"op": "insert", "table": "scouting", "uid": uid, "match": mid}

    def edit_scouting(self):
        uid = self.pick_scouting()
        if uid is None:
            return self.add_scouting()
        self.call("PATCH", f"/scouting/{uid}", {"score": self.rng.randrange(0, 120), "notes": f"edited {self.rng.random():.6f}"})
        return {"op": "update", "table": "scouting", "uid": uid}

    def delete_match(self, mid=None):
        mid = mid if mid is not None else self.pick_match()
        if mid is None:
            return self.get_or_create_match()
        gone = self.call("DELETE", f"/matches/{mid}")["cascade"]
        return {"op": "delete", "table": "match", "id": mid, "cascade": gone}

    def delete_scouting(self):
        uid = self.pick_scouting()
        if uid is None:
            return self.add_scouting()
        self.call("DELETE", f"/scouting/{uid}")
        return {"op": "delete", "table": "scouting", "uid": uid}

    def set_kv(self, k=None, v=None):
        k = k if k is not None else self.rng.choice(["x", "y", "z"])
        v = v if v is not None else f"v{self.rng.randrange(1_000_000)}"
        self.call("PUT", f"/kv/{k}", {"v": v})
        return {"op": "set", "table": "kv", "k": k, "v": v}

    def add_comment(self):
        uid = self.call("POST", "/comments", {"body": f"comment {self.rng.randrange(1_000_000)}"})["uid"]
        return {"op": "insert", "table": "comment", "uid": uid}


WEIGHTS = [
    ("get_or_create_match", 3),
    ("add_scouting", 8),
    ("edit_scouting", 4),
    ("delete_match", 1),  # rarely, so some of what raced a delete lives to the end of a test
    ("delete_scouting", 1),
    ("set_kv", 1),
    ("add_comment", 2),
]


def run_one(driver, journal, fn, attempts=50):
    """A single request of the one-shot modes, retried while locked."""
    for _ in range(attempts):
        try:
            entry = fn()
        except Driver.Retry as e:
            if " 503 " not in str(e):
                sys.exit(f"failed: {e}")
            time.sleep(0.1)
            continue
        if entry is not None:
            journal.write(entry)
        return
    sys.exit("failed: still locked")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("instance_dir")
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--ops", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--node", default="0")
    ap.add_argument("--sleep-ms", type=float, default=0)
    ap.add_argument("--journal-file")
    ap.add_argument("--set", nargs=2, metavar=("KEY", "VALUE"))
    ap.add_argument("--delete-match", type=int, metavar="ID")
    ap.add_argument("--add-scouting", type=int, metavar="MATCH_ID")
    a = ap.parse_args()
    app = create_app(a.instance_dir)
    journal = Journal(a.journal_file, a.node)
    if a.init:
        return init(app, journal)
    rng = random.Random(a.seed)
    # No app context held here: each test-client request pushes its own, and its
    # teardown ends the request's session (rolls back what did not commit).
    driver = Driver(app.test_client(), rng)
    if a.set:
        return run_one(driver, journal, lambda: driver.set_kv(a.set[0], a.set[1]))
    if a.delete_match is not None:
        return run_one(driver, journal, lambda: driver.delete_match(a.delete_match))
    if a.add_scouting is not None:
        return run_one(driver, journal, lambda: driver.add_scouting(a.add_scouting))
    if a.ops is None:
        ap.error("give --init, --ops, --set, --delete-match or --add-scouting")
    names, weights = zip(*WEIGHTS)
    done = retries = 0
    while done < a.ops:
        action = rng.choices(names, weights)[0]
        try:
            entry = getattr(driver, action)()
        except Driver.Retry as e:
            # Not committed (row gone, locked, clash): nothing to journal; another request.
            retries += 1
            print(f"RETRY {e}", file=sys.stderr)
            if retries > 20 * a.ops + 100:
                sys.exit("failed: too many retries")
            continue
        if entry is not None:
            journal.write(entry)
        done += 1
        if a.sleep_ms:
            time.sleep(a.sleep_ms / 1000)
    print(f"DONE {done} requests, {retries} retried", file=sys.stderr)


if __name__ == "__main__":
    main()
