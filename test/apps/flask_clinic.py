#!/usr/bin/python3
"""A Flask-SQLAlchemy clinic, for test/clinic-cluster.test.ts: patients (autoincrement,
unique email), appointments (FK with cascade), tags with text keys, an association table
with a composite primary key, a bind, nested uploads that are amended and deleted, and
two SQL triggers of its own (an audit row per new patient, an edited_at stamp). Each
request is one short transaction; a failed request is rolled back and printed, as a web
app would answer 500.

Usage: flask_clinic.py INSTANCE_DIR NODE SEED OPS
"""
import datetime
import os
import random
import sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import DDL, select, func, event
from sqlalchemy.engine import Engine

db = SQLAlchemy(engine_options={"connect_args": {"timeout": 30}})


@event.listens_for(Engine, "connect")
def fk_on(dbapi_conn, _):
    dbapi_conn.execute("PRAGMA foreign_keys=ON")
    # SQLAlchemy's recipe for real transactions on pysqlite (README, "When two nodes write
    # the same thing"): the driver would run each SELECT outside the transaction, so a sync
    # could move the row a request read before the request writes.
    dbapi_conn.isolation_level = None


@event.listens_for(Engine, "begin")
def begin_immediate(conn):
    conn.exec_driver_sql("BEGIN IMMEDIATE")


appt_tag = db.Table("appt_tag",
    db.Column("appointment_id", db.Integer, db.ForeignKey("appointment.id", ondelete="CASCADE"), primary_key=True),
    db.Column("tag_slug", db.String(30), db.ForeignKey("tag.slug"), primary_key=True))


class Patient(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(100), unique=True, nullable=False)
    name = db.Column(db.String(100))
    born = db.Column(db.Date)
    active = db.Column(db.Boolean, default=True)
    appointments = db.relationship("Appointment", backref="patient", cascade="all, delete-orphan", passive_deletes=True)


class Tag(db.Model):
    slug = db.Column(db.String(30), primary_key=True)
    label = db.Column(db.String(60))


class Appointment(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    patient_id = db.Column(db.Integer, db.ForeignKey("patient.id", ondelete="CASCADE"), nullable=False)
    patient_email = db.Column(db.String(100))  # what the test checks the reference against
    at = db.Column(db.DateTime)
    note = db.Column(db.Text)
    edited_at = db.Column(db.String(30))  # set by a trigger of the app's own
    tags = db.relationship("Tag", secondary=appt_tag)


class History(db.Model):
    """Written only by a trigger of the app's own."""
    id = db.Column(db.Integer, primary_key=True)
    patient_id = db.Column(db.Integer, db.ForeignKey("patient.id", ondelete="CASCADE"))
    what = db.Column(db.String(200))


# Triggers the app keeps in its schema (what an app with audit needs does): their writes are
# synced as the app's own, so they must not fire again when a node replays them.
event.listen(History.__table__, "after_create", DDL(
    "CREATE TRIGGER patient_registered AFTER INSERT ON patient "
    "BEGIN INSERT INTO history(patient_id, what) VALUES (NEW.id, 'registered ' || NEW.email); END"))
event.listen(Appointment.__table__, "after_create", DDL(
    "CREATE TRIGGER appointment_edited AFTER UPDATE OF note ON appointment WHEN NEW.note IS NOT OLD.note "
    "BEGIN UPDATE appointment SET edited_at = strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now') WHERE id = NEW.id; END"))


class Event(db.Model):
    __bind_key__ = "logs"
    id = db.Column(db.Integer, primary_key=True)
    what = db.Column(db.String(200))


def make_app(inst):
    app = Flask(__name__, instance_path=os.path.abspath(inst))
    os.makedirs(app.instance_path, exist_ok=True)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///" + os.path.join(app.instance_path, "clinic.sqlite")
    app.config["SQLALCHEMY_BINDS"] = {"logs": "sqlite:///" + os.path.join(app.instance_path, "logs.sqlite")}
    db.init_app(app)
    return app


def pick(rng, model, key):
    n = db.session.scalar(select(func.count()).select_from(model))
    return db.session.scalars(select(model).order_by(key).offset(rng.randrange(n)).limit(1)).first() if n else None


def main():
    inst, node, seed, ops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    app = make_app(inst)
    failed = 0
    with app.app_context():
        db.create_all()
        files = os.path.join(app.instance_path, "files")
        for k in range(ops):
            try:
                r = rng.random()
                if r < 0.2:
                    email = f"p{rng.randrange(40)}@example.org"
                    if not db.session.scalar(select(Patient).where(Patient.email == email)):
                        db.session.add(Patient(email=email, name=f"{node} {k}", born=datetime.date(1950 + rng.randrange(60), 1 + rng.randrange(12), 1)))
                elif r < 0.5:
                    p = pick(rng, Patient, Patient.id)
                    if p:
                        tags = db.session.scalars(select(Tag).order_by(Tag.slug)).all()
                        a = Appointment(patient_id=p.id, patient_email=p.email, at=datetime.datetime(2026, 1, 1) + datetime.timedelta(hours=k), note=f"by {node}")
                        a.tags = rng.sample(tags, min(len(tags), rng.randrange(3)))
                        db.session.add(a)
                        d = os.path.join(files, str(p.email.split("@")[0]))
                        os.makedirs(d, exist_ok=True)
                        with open(os.path.join(d, f"{node}-{k}.txt"), "w") as f:
                            f.write(f"scan {k} by {node}\n" * (k % 7 + 1))
                elif r < 0.6:
                    slug = f"t{rng.randrange(6)}"
                    t = db.session.get(Tag, slug)
                    if t:
                        t.label = f"{slug} by {node} {k}"
                    else:
                        db.session.add(Tag(slug=slug, label=f"{slug} by {node}"))
                elif r < 0.7:
                    a = pick(rng, Appointment, Appointment.id)
                    if a:
                        a.note = f"edited by {node} at {k}"
                elif r < 0.75:
                    p = pick(rng, Patient, Patient.id)
                    if p:
                        db.session.delete(p)
                elif r < 0.8:
                    a = pick(rng, Appointment, Appointment.id)
                    if a:
                        db.session.delete(a)
                elif r < 0.85 and os.path.isdir(files):
                    # Overwrite or delete an upload.
                    all_files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(files) for f in fs)
                    if all_files:
                        f = rng.choice(all_files)
                        if rng.random() < 0.5:
                            os.remove(f)
                        else:
                            with open(f, "a") as fh:
                                fh.write(f"amended by {node}\n")
                else:
                    db.session.add(Event(what=f"{node} op {k}"))
                db.session.commit()
            except Exception as e:  # a request that failed: 500, rolled back
                db.session.rollback()
                failed += 1
                print(f"request {k} failed: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
    print(f"{node}: {failed} failed requests of {ops}")


if __name__ == "__main__":
    main()
