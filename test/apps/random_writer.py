#!/usr/bin/python3
"""Random SQLite writer used by the multi-node integration tests.

Several copies run at once, one per node, each against its own database file
that an agent keeps in sync with the others.  Every copy inserts rows with keys
that cannot collide between nodes, and updates/deletes rows picked at random
from the table (so rows created by *other* nodes get edited concurrently).

Usage:
  random_writer.py DB_PATH --node N --seed S --ops K
                   [--migrate-at M] [--sleep-ms X] [--journal wal]
                   [--journal-file PATH]

Journal: one JSON line per committed operation, written only after COMMIT
succeeded (stdout unless --journal-file is given, which is appended to):
  {"node": 1, "txn": 7, "db": "data.db", "table": "items",
   "op": "insert", "key": {"id": 1000007}}
op is insert | update | delete | migrate ("migrate" has table "*" and key {}).
key maps key column names to values, so a checker can build a WHERE clause.

What a test can verify with the journals of all nodes: every key that some
node inserted and NO node deleted must exist in every database.  Rows that
any node deleted cannot be checked for presence or absence in general: a
concurrent update elsewhere may legitimately win or lose against the delete,
depending on the conflict policy.  Values cannot be checked either (the last
writer is decided by the sync engine), only that all databases agree.

SIGTERM stops the writer between transactions: the one in hand is committed
(or rolled back) and journaled first, so the journal lists exactly what was
committed (see StopOnTerm).

Lock errors ("database is locked"/busy) roll the transaction back and retry
it; the number of such retries is printed on stderr at the end as `LOCKED n`.

Standard library only, so it runs on any python3 with sqlite3.
"""

import argparse
import json
import math
import os
import random
import signal
import sqlite3
import sys
import time
import uuid

NODE_RANGE = 1_000_000  # node N owns integer ids [N*1e6, N*1e6 + 999_999]

# ---------------------------------------------------------------------------
# Tricky values, per storage class.  Shared with flask_app.py.

INTS = [
    0, 1, -1,
    -(2**63), 2**63 - 1,          # int64 edges
    2**53 + 1, -(2**53 + 1),      # first integers a double cannot represent
    2**31, -(2**31) - 1, 255,
]

REALS = [
    0.1 + 0.2,                    # 0.30000000000000004
    1e308, -1e308,
    -0.0, 0.0,                    # note: a REAL-affinity column stores -0.0 as 0.0
    5e-324,                       # smallest subnormal
    2.2250738585072014e-308,      # smallest normal
    math.inf, -math.inf,
    2.0**63, 1.5, -2.5, 1e-7, 3.141592653589793, 123456789.125,
]

TEXTS = [
    "",
    "plain ascii",
    "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 vs \u00e9, a\u0308\u0304",
    "line1\nline2\r\nline3",
    "quotes ' \" ` and ''doubled''",
    "back\\slash and %s %d {0} $1",
    "nul\x00inside",                # SQLite text may contain NUL; drivers must keep it
    "\ufeffBOM first",
    "line\u2028separator",
    "  42  ", "1e308", "-0", "NULL", "null",  # look like other types
    "x" * 3000,
]

BLOBS = [b"", b"\x00", bytes(range(256)), b"looks like text", b"\xff\xfe\xfd"]


def rand_text(rng):
    """Random text mixing ASCII, CJK, emoji and combining marks (no surrogates)."""
    ranges = [(0x20, 0x7E), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0x0300, 0x036F), (0xC0, 0x17F)]
    out = []
    for _ in range(rng.randint(0, 40)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def pick_int(rng):
    return rng.choice(INTS) if rng.random() < 0.6 else rng.randint(-(2**63), 2**63 - 1)


def pick_real(rng):
    return rng.choice(REALS) if rng.random() < 0.6 else rng.uniform(-1e6, 1e6)


def pick_text(rng):
    return rng.choice(TEXTS) if rng.random() < 0.5 else rand_text(rng)


def pick_blob(rng):
    if rng.random() < 0.5:
        return rng.choice(BLOBS)
    return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))


def pick_any(rng):
    """Any storage class, for untyped columns (stored exactly as given)."""
    return rng.choice([pick_int, pick_real, pick_text, pick_blob, lambda r: None])(rng)


def maybe_null(rng, value, p=0.1):
    return None if rng.random() < p else value


# ---------------------------------------------------------------------------
# Shared helpers (also used by flask_app.py).

class StopOnTerm:
    """SIGTERM asks the writer to stop between transactions.

    Dying of the signal at any instant (Python's default) can land after a
    COMMIT and before its journal line: a committed delete that the journal
    never lists then looks to the checker like a row the sync lost. So SIGTERM
    only sets a flag; the loop finishes and journals the transaction in hand
    and exits cleanly. (kill -9 still stops it at any instant.)"""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def is_locked_error(exc):
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


class Journal:
    """Writes one JSON line per committed operation; flushes per transaction."""

    def __init__(self, path):
        self.out = open(path, "a", encoding="utf-8") if path else sys.stdout
        self.txn = 0

    def commit(self, entries):
        self.txn += 1
        for e in entries:
            e["txn"] = self.txn
            self.out.write(json.dumps(e, ensure_ascii=False) + "\n")
        self.out.flush()

    def close(self):
        if self.out is not sys.stdout:
            self.out.close()


# ---------------------------------------------------------------------------
# Schema

SCHEMA = """
-- INTEGER PRIMARY KEY: alias of the rowid.  Typed columns of each class,
-- a NUMERIC column (affinity conversions) and an untyped column `u`.
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY,
  i INTEGER,
  r REAL,
  t TEXT,
  b BLOB,
  n NUMERIC,
  u
);
-- TEXT (uuid4) key: a regular rowid table with a separate unique index.
CREATE TABLE IF NOT EXISTS docs (
  id TEXT PRIMARY KEY NOT NULL,
  title TEXT NOT NULL DEFAULT '',
  body TEXT,
  data BLOB,
  score REAL,
  extra
);
CREATE INDEX IF NOT EXISTS docs_title ON docs(title);
-- WITHOUT ROWID with a composite key of two classes.
CREATE TABLE IF NOT EXISTS edges (
  src INTEGER NOT NULL,
  dst TEXT NOT NULL,
  weight REAL,
  label,
  PRIMARY KEY (src, dst)
) WITHOUT ROWID;
-- No declared primary key: only the hidden rowid, which differs per node.
-- (node, seq) is unique by construction and used as the logical key.
CREATE TABLE IF NOT EXISTS logs (
  node INTEGER,
  seq INTEGER,
  msg TEXT,
  v
);
"""

# Tables and their logical key columns.  `tags` only exists after migration.
KEYS = {
    "items": ["id"],
    "docs": ["id"],
    "edges": ["src", "dst"],
    "logs": ["node", "seq"],
    "tags": ["id"],
}


class Writer:
    def __init__(self, conn, node, rng, db_name):
        self.conn = conn
        self.node = node
        self.rng = rng
        self.db_name = db_name
        self.counter = self._start_counter()
        self.migrated = self._has_migration()

    # -- key generation ----------------------------------------------------

    def _start_counter(self):
        """Continue after the highest id of this node already present (restarts)."""
        lo, hi = self.node * NODE_RANGE, self.node * NODE_RANGE + NODE_RANGE - 1
        best = lo
        queries = [
            "SELECT max(id) FROM items WHERE id BETWEEN ? AND ?",
            "SELECT max(src) FROM edges WHERE src BETWEEN ? AND ?",
            "SELECT max(seq) FROM logs WHERE seq BETWEEN ? AND ?",
        ]
        if self._table_exists("tags"):
            queries.append("SELECT max(id) FROM tags WHERE id BETWEEN ? AND ?")
        for q in queries:
            (m,) = self.conn.execute(q, (lo, hi)).fetchone()
            if m is not None:
                best = max(best, m)
        return best - lo

    def next_id(self):
        self.counter += 1
        if self.counter >= NODE_RANGE:
            raise RuntimeError("per-node id range exhausted")
        return self.node * NODE_RANGE + self.counter

    def _table_exists(self, name):
        row = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
        return row is not None

    def _has_migration(self):
        cols = [r[1] for r in self.conn.execute("PRAGMA table_info(items)")]
        return "note" in cols and self._table_exists("tags")

    # -- row picking -------------------------------------------------------

    def pick_existing(self, table):
        """A random existing row's key (any node's), or None if the table is empty.

        count + OFFSET keeps the choice reproducible for a given --seed
        (ORDER BY random() would not be)."""
        cols = KEYS[table]
        (count,) = self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        if count == 0:
            return None
        order = ", ".join(cols)
        row = self.conn.execute(
            f"SELECT {order} FROM {table} ORDER BY {order} LIMIT 1 OFFSET ?",
            (self.rng.randrange(count),)).fetchone()
        return dict(zip(cols, row)) if row else None

    # -- operations --------------------------------------------------------

    def _entry(self, table, op, key):
        return {"node": self.node, "db": self.db_name, "table": table, "op": op, "key": key}

    def _set(self, table, key, values):
        """UPDATE table SET values WHERE key; returns rows changed."""
        sets = ", ".join(f"{c} = ?" for c in values)
        where = " AND ".join(f"{c} = ?" for c in key)
        cur = self.conn.execute(f"UPDATE {table} SET {sets} WHERE {where}",
                                [*values.values(), *key.values()])
        return cur.rowcount

    def _values(self, table):
        rng = self.rng
        if table == "items":
            v = {"i": maybe_null(rng, pick_int(rng)), "r": maybe_null(rng, pick_real(rng)),
                 "t": maybe_null(rng, pick_text(rng)), "b": maybe_null(rng, pick_blob(rng)),
                 # NUMERIC converts numeric-looking text to INTEGER/REAL on store.
                 "n": rng.choice([pick_int, pick_real, pick_text])(rng),
                 "u": pick_any(rng)}
            if self.migrated:
                v["note"] = maybe_null(rng, pick_text(rng))
            return v
        if table == "docs":
            return {"title": pick_text(rng), "body": maybe_null(rng, pick_text(rng)),
                    "data": maybe_null(rng, pick_blob(rng)),
                    "score": maybe_null(rng, pick_real(rng)), "extra": pick_any(rng)}
        if table == "edges":
            return {"weight": maybe_null(rng, pick_real(rng)), "label": pick_any(rng)}
        if table == "logs":
            return {"msg": pick_text(rng), "v": pick_any(rng)}
        if table == "tags":
            return {"item_id": maybe_null(rng, self.rng.randint(0, 4_000_000)),
                    "tag": pick_text(rng), "weight": pick_any(rng)}
        raise ValueError(table)

    def _new_key(self, table):
        if table in ("items", "tags"):
            return {"id": self.next_id()}
        if table == "docs":
            # os.urandom-based: unique even when a node restarts with the same seed.
            return {"id": str(uuid.uuid4())}
        if table == "edges":
            return {"src": self.next_id(), "dst": str(uuid.uuid4())}
        if table == "logs":
            return {"node": self.node, "seq": self.next_id()}
        raise ValueError(table)

    def random_op(self):
        """Run one random statement inside the open transaction; returns a journal entry."""
        rng = self.rng
        tables = ["items", "docs", "edges", "logs"] + (["tags"] if self.migrated else [])
        table = rng.choice(tables)
        kind = rng.choices(["insert", "update", "delete"], weights=[5, 3, 2])[0]
        key = self.pick_existing(table) if kind != "insert" else None
        if key is None:
            kind = "insert"
        if kind == "insert":
            key = self._new_key(table)
            row = {**key, **self._values(table)}
            cols = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            self.conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))
        elif kind == "update":
            values = self._values(table)
            # Partial updates too, so concurrent edits touch different columns.
            some = dict(rng.sample(sorted(values.items()), rng.randint(1, len(values))))
            if self._set(table, key, some) != 1:
                raise RuntimeError(f"update of {table} {key} changed no row")
        else:
            where = " AND ".join(f"{c} = ?" for c in key)
            self.conn.execute(f"DELETE FROM {table} WHERE {where}", list(key.values()))
        return self._entry(table, kind, key)

    def migrate(self):
        """ADD COLUMN + CREATE TABLE; a no-op if the schema already arrived via sync."""
        cols = [r[1] for r in self.conn.execute("PRAGMA table_info(items)")]
        if "note" not in cols:
            self.conn.execute("ALTER TABLE items ADD COLUMN note TEXT DEFAULT 'n/a'")
        self.conn.execute("""CREATE TABLE IF NOT EXISTS tags (
            id INTEGER PRIMARY KEY, item_id INTEGER, tag TEXT NOT NULL, weight)""")
        return self._entry("*", "migrate", {})


def create_schema(conn):
    # Statements contain no ';' inside literals, so a plain split is safe.
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def retry_locked(fn, stats, max_tries=1000):
    """Call fn() until it does not fail with a lock error."""
    for attempt in range(max_tries):
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not is_locked_error(exc):
                raise
            stats["locked"] += 1
            time.sleep(min(0.5, 0.01 * (attempt + 1)))
    raise RuntimeError(f"gave up after {max_tries} lock errors")


def run_txn(conn, body, stats):
    """Run body() in BEGIN IMMEDIATE ... COMMIT, retrying the whole transaction
    on lock errors.  IMMEDIATE takes the write lock up front, so the busy
    timeout applies instead of failing on a read->write lock upgrade."""
    def attempt():
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return retry_locked(attempt, stats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("db_path")
    ap.add_argument("--node", type=int, required=True, help="node number (1..999), picks the id range")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, required=True, help="number of operations")
    ap.add_argument("--migrate-at", type=int, default=None, help="run the migration before op M")
    ap.add_argument("--sleep-ms", type=float, default=0, help="pause after each transaction")
    ap.add_argument("--journal", choices=["wal", "delete"], default=None, help="SQLite journal_mode")
    ap.add_argument("--journal-file", default=None, help="append the op journal here instead of stdout")
    args = ap.parse_args(argv)
    if not 1 <= args.node < 1000:
        ap.error("--node must be in 1..999")

    stop = StopOnTerm()
    # Seeded per node so nodes sharing --seed still make different choices.
    rng = random.Random(args.seed * 1000 + args.node)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(args.db_path, timeout=30, isolation_level=None)
    stats = {"locked": 0}
    if args.journal:
        # journal_mode cannot change inside a transaction; it persists in the file.
        retry_locked(lambda: conn.execute(f"PRAGMA journal_mode={args.journal}").fetchone(), stats)
    run_txn(conn, lambda: create_schema(conn), stats)

    writer = Writer(conn, args.node, rng, os.path.basename(args.db_path))
    journal = Journal(args.journal_file)
    done = 0
    while done < args.ops and not stop.requested:
        if args.migrate_at is not None and done >= args.migrate_at and not writer.migrated:
            entry = run_txn(conn, writer.migrate, stats)
            writer.migrated = True
            journal.commit([entry])
        n = min(rng.randint(1, 4), args.ops - done)  # a few ops per transaction
        entries = run_txn(conn, lambda: [writer.random_op() for _ in range(n)], stats)
        journal.commit(entries)
        done += n
        if args.sleep_ms:
            time.sleep(args.sleep_ms / 1000)
    # Migration requested at/after the last op still happens, so the test can rely on it.
    if args.migrate_at is not None and not writer.migrated and not stop.requested:
        journal.commit([run_txn(conn, writer.migrate, stats)])

    conn.close()
    journal.close()
    print(f"LOCKED {stats['locked']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
