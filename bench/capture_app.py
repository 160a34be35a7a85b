#!/usr/bin/python3
"""App-like writer for the capture-overhead benchmark, using Python's sqlite3
(the client real apps use). One commit per operation, like a web request.

Usage: capture_app.py DB_PATH N SYNCHRONOUS
  Inserts N rows into `items` (ids chosen by SQLite), then updates each once.
  Prints {"insert_s": ..., "update_s": ...} (time spent in the loops only;
  rows are generated before the clock starts).
"""

import json
import sqlite3
import sys
import time
from datetime import datetime, timezone


def avatar(i):
    x = (i * 2654435761) & 0xFFFFFFFF
    out = bytearray(24)
    for j in range(24):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[j] = x & 0xFF
    return bytes(out)


def row(i):
    created = datetime.fromtimestamp(1_700_000_000 + i, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return (
        f"user-{i:07d}",
        None if i % 10 == 0 else f"user{i}@example.com",
        (i * 0.37) % 1000,
        i % 1000,
        None if i % 7 == 0 else avatar(i),
        created,
    )


def main():
    path, n, sync = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = sqlite3.connect(path, timeout=30)
    conn.execute(f"PRAGMA synchronous = {sync}")
    inserts = [row(i) for i in range(1, n + 1)]
    updates = [(f"renamed-{i:07d}", (i * 1.13) % 1000, i) for i in range(1, n + 1)]

    t0 = time.perf_counter()
    for r in inserts:
        conn.execute("INSERT INTO items(name, email, score, visits, avatar, created_at) VALUES (?, ?, ?, ?, ?, ?)", r)
        conn.commit()
    t1 = time.perf_counter()
    for u in updates:
        conn.execute("UPDATE items SET name = ?, score = ?, visits = visits + 1 WHERE id = ?", u)
        conn.commit()
    t2 = time.perf_counter()
    conn.close()
    print(json.dumps({"insert_s": t1 - t0, "update_s": t2 - t1, "sqlite": sqlite3.sqlite_version}))


if __name__ == "__main__":
    main()
