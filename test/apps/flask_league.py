#!/usr/bin/python3
"""A Flask-SQLAlchemy app the way such apps are usually written, for the merge tests
(issue 4): plain integer ids that SQLite picks (max + 1, no AUTOINCREMENT), UNIQUE
constraints, an association table with a composite key and no id, a nullable
foreign key, ON DELETE CASCADE plus the ORM's delete-orphan cascade, and a table
without any key (team_fan: a row per player that joined a team, named by its uid).

  INSTANCE_DIR/league.db   team, player, tag, team_tag, team_fan

Usage:
  flask_league.py INSTANCE_DIR --node N --seed S --ops K [--journal-file PATH]

Every row carries `uid` (node-counter), which the test uses to name rows across
nodes, since ids may move. Deletes also journal the ids the app deleted by (ids may move under the app).
Journal (one JSON line per committed change):
  {"op": "insert", "table": "player", "uid": "n1-7", "team": "n1-3"}
  {"op": "delete", "table": "team", "uid": "n1-3", "cascade": ["n2-9", ...]}
"""

import argparse
import json
import os
import random
import sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

db = SQLAlchemy(engine_options={"connect_args": {"timeout": 30}})

team_tag = db.Table(
    "team_tag",
    db.Column("team_id", db.Integer, db.ForeignKey("team.id", ondelete="CASCADE"), primary_key=True),
    db.Column("tag_id", db.Integer, db.ForeignKey("tag.id", ondelete="CASCADE"), primary_key=True),
)

# No key at all, as db.Table allows: one row per player that joined the team (a bag of rows).
team_fan = db.Table(
    "team_fan",
    db.Column("team_id", db.Integer, db.ForeignKey("team.id", ondelete="CASCADE")),
    db.Column("fan", db.String(40)),
)


class Team(db.Model):
    __tablename__ = "team"
    id = db.Column(db.Integer, primary_key=True)
    uid = db.Column(db.String(40), nullable=False)
    name = db.Column(db.String(80), unique=True, nullable=False)
    players = db.relationship("Player", back_populates="team", cascade="all, delete-orphan", passive_deletes=True)
    tags = db.relationship("Tag", secondary=team_tag)


class Player(db.Model):
    __tablename__ = "player"
    id = db.Column(db.Integer, primary_key=True)
    uid = db.Column(db.String(40), nullable=False)
    team_id = db.Column(db.Integer, db.ForeignKey("team.id", ondelete="CASCADE"), nullable=False)
    # Nullable foreign key: the player's mentor, another player.
    mentor_id = db.Column(db.Integer, db.ForeignKey("player.id"), nullable=True)
    name = db.Column(db.String(80), nullable=False)
    score = db.Column(db.Float, default=0.0)
    team = db.relationship("Team", back_populates="players")


class Tag(db.Model):
    __tablename__ = "tag"
    id = db.Column(db.Integer, primary_key=True)
    label = db.Column(db.String(40), unique=True, nullable=False)


def create_app(instance_dir):
    instance_dir = os.path.abspath(instance_dir)
    os.makedirs(instance_dir, exist_ok=True)
    app = Flask(__name__, instance_path=instance_dir)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(instance_dir, "league.db")
    db.init_app(app)
    return app


class Actions:
    def __init__(self, node, rng):
        self.node, self.rng, self.counter = node, rng, 0

    def uid(self):
        self.counter += 1
        return f"n{self.node}-{self.counter}"

    def pick(self, model):
        count = db.session.scalar(select(func.count()).select_from(model))
        if not count:
            return None
        return db.session.scalars(select(model).order_by(model.id).offset(self.rng.randrange(count)).limit(1)).first()

    def add_team(self):
        # Names from a small shared pool: two nodes apart both create "team-3".
        name = f"team-{self.rng.randrange(12)}"
        if db.session.scalar(select(Team).where(Team.name == name)) is not None:
            return self.add_player()
        t = Team(uid=self.uid(), name=name)
        db.session.add(t)
        return [{"op": "insert", "table": "team", "uid": t.uid}]

    def add_player(self):
        t = self.pick(Team)
        if t is None:
            return self.add_team()
        mentor = self.pick(Player) if self.rng.random() < 0.4 else None
        p = Player(uid=self.uid(), team=t, name=f"p{self.counter}", mentor_id=mentor.id if mentor else None)
        db.session.add(p)
        db.session.execute(team_fan.insert().values(team_id=t.id, fan=p.uid))
        return [{"op": "insert", "table": "player", "uid": p.uid, "team": t.uid, "mentor": mentor.uid if mentor else None}]

    def tag_team(self):
        t = self.pick(Team)
        if t is None:
            return self.add_team()
        label = f"tag-{self.rng.randrange(6)}"
        tag = db.session.scalar(select(Tag).where(Tag.label == label))
        if tag is None:
            tag = Tag(label=label)
            db.session.add(tag)
        if tag not in t.tags:
            t.tags.append(tag)
        return [{"op": "tag", "table": "team_tag", "team": t.uid, "label": label}]

    def update_player(self):
        p = self.pick(Player)
        if p is None:
            return self.add_player()
        p.score = round(self.rng.random() * 100, 3)
        return [{"op": "update", "table": "player", "uid": p.uid}]

    def delete_team(self):
        t = self.pick(Team)
        if t is None:
            return self.add_team()
        gone = [p.uid for p in t.players]
        gone_ids = [p.id for p in t.players]
        db.session.delete(t)
        return [{"op": "delete", "table": "team", "uid": t.uid, "cascade": gone, "cascade_ids": gone_ids}]

    def delete_player(self):
        p = self.pick(Player)
        if p is None:
            return self.add_player()
        # Players this one mentors lose their mentor (the app's own rule).
        for m in db.session.scalars(select(Player).where(Player.mentor_id == p.id)).all():
            m.mentor_id = None
        db.session.delete(p)
        return [{"op": "delete", "table": "player", "uid": p.uid, "id": p.id}]


WEIGHTS = [("add_team", 3), ("add_player", 8), ("tag_team", 3), ("update_player", 4), ("delete_team", 1), ("delete_player", 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("instance_dir")
    ap.add_argument("--node", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ops", type=int, default=100)
    ap.add_argument("--journal-file")
    ap.add_argument("--init-only", action="store_true")
    a = ap.parse_args()
    app = create_app(a.instance_dir)
    with app.app_context():
        db.create_all()
        if a.init_only:
            return
        # SQLite leaves foreign keys off unless asked; this app asks (for ON DELETE CASCADE).
        from sqlalchemy import event
        @event.listens_for(db.engine, "connect")
        def _fk_on(conn, _):
            conn.execute("PRAGMA foreign_keys = ON")
        db.engine.dispose()
        rng = random.Random(a.seed)
        acts = Actions(a.node, rng)
        # Continue this node's uid counter after a restart.
        for model in (Team, Player):
            for (u,) in db.session.execute(select(model.uid).where(model.uid.like(f"n{a.node}-%"))):
                acts.counter = max(acts.counter, int(u.split("-")[1]))
        out = open(a.journal_file, "a") if a.journal_file else sys.stdout
        names, weights = zip(*WEIGHTS)
        done = 0
        while done < a.ops:
            action = rng.choices(names, weights)[0]
            try:
                entries = getattr(acts, action)()
                db.session.commit()
            except (OperationalError, IntegrityError) as e:
                # Locked, or a row that moved or vanished under us: try another op.
                db.session.rollback()
                print(f"RETRY {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            for e in entries:
                out.write(json.dumps(e) + "\n")
            out.flush()
            done += 1


if __name__ == "__main__":
    main()
