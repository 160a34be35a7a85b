#!/usr/bin/python3
"""A Flask-SQLAlchemy app unlike the others in the tests: UUID text keys, Numeric, DateTime,
Enum, JSON, LargeBinary, a self-referencing category, an association table without any key
(SQLAlchemy's db.Table), a second database (a bind) and uploaded files in the instance folder.
Each item records the names of its categories (cat_names), so a test can check that its
association rows point at the categories it was written with.

Usage: flask_shop.py INSTANCE_DIR NODE SEED OPS
"""
import datetime
import enum
import os
import random
import sys
import uuid

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import select, func

db = SQLAlchemy(engine_options={"connect_args": {"timeout": 30}})

class Status(enum.Enum):
    draft = "draft"
    live = "live"

item_category = db.Table("item_category",
    db.Column("item_id", db.String(36), db.ForeignKey("item.id")),
    db.Column("category_id", db.Integer, db.ForeignKey("category.id")))

class Category(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(50), unique=True, nullable=False)
    parent_id = db.Column(db.Integer, db.ForeignKey("category.id"))

class Item(db.Model):
    id = db.Column(db.String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    title = db.Column(db.String(100), nullable=False)
    price = db.Column(db.Numeric(10, 2))
    created = db.Column(db.DateTime, default=datetime.datetime.utcnow)
    status = db.Column(db.Enum(Status), default=Status.draft)
    meta = db.Column(db.JSON)
    thumb = db.Column(db.LargeBinary)
    made_by = db.Column(db.String(20))
    cat_names = db.Column(db.String(200))
    categories = db.relationship("Category", secondary=item_category)

class Visit(db.Model):
    __bind_key__ = "stats"
    id = db.Column(db.Integer, primary_key=True)
    path = db.Column(db.String(200))
    at = db.Column(db.DateTime, default=datetime.datetime.utcnow)

def make_app(inst):
    app = Flask(__name__, instance_path=os.path.abspath(inst))
    os.makedirs(app.instance_path, exist_ok=True)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(app.instance_path, "shop.db")
    app.config["SQLALCHEMY_BINDS"] = {"stats": "sqlite:///" + os.path.join(app.instance_path, "stats.db")}
    db.init_app(app)
    return app

def pick(rng, model):
    n = db.session.scalar(select(func.count()).select_from(model))
    return db.session.scalars(select(model).order_by(model.id).offset(rng.randrange(n)).limit(1)).first() if n else None


def main():
    inst, node, seed, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    app = make_app(inst)
    with app.app_context():
        db.create_all()
        up = os.path.join(app.instance_path, "uploads")
        os.makedirs(up, exist_ok=True)
        for k in range(ops):
            r = rng.random()
            if r < 0.2:
                # Names from a small shared pool: two servers create "cat-3" apart (a unique clash).
                name = f"cat-{rng.randrange(8)}"
                if not db.session.scalar(select(Category).where(Category.name == name)):
                    par = pick(rng, Category)
                    db.session.add(Category(name=name, parent_id=par.id if par else None))
            elif r < 0.6:
                cats = db.session.scalars(select(Category).order_by(Category.id)).all()
                chosen = rng.sample(cats, min(len(cats), rng.randrange(3)))
                it = Item(title=f"{node} item {k}", price=rng.randrange(1, 99999) / 100, meta={"n": k, "node": node}, thumb=rng.randbytes(32), made_by=node,
                          status=Status.live if rng.random() < 0.5 else Status.draft, cat_names=",".join(sorted(c.name for c in chosen)))
                it.categories = chosen
                db.session.add(it)
                with open(os.path.join(up, f"{node}-{k}.txt"), "w") as f:
                    f.write(f"upload {k} by {node}\n" * (k % 5 + 1))
            elif r < 0.75:
                it = pick(rng, Item)
                if it:
                    it.price = rng.randrange(1, 99999) / 100
                    it.status = Status.live
            elif r < 0.8:
                it = pick(rng, Item)
                if it:
                    db.session.delete(it)
            else:
                db.session.add(Visit(path=f"/item/{k}"))
            db.session.commit()


if __name__ == "__main__":
    main()
