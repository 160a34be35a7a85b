#!/usr/bin/python3
"""App-like writer for the capture-overhead benchmark, using Python's sqlite3
(the client real apps use). One commit per operation, like a web request.

Usage: capture_app.py DB_WITHOUT DB_WITH N SYNCHRONOUS BLOCK
  Inserts N rows into `items` of each database (ids chosen by SQLite), then
  updates each row once. The two databases are written in alternating blocks
  of BLOCK operations (which one goes first alternates too), so that noise from
  the rest of the machine falls on both alike. Rows are generated before the
  clock starts. Prints, per database and operation, the mean and median time
  of one operation (execute + commit) in microseconds.
"""

import json
import sqlite3
import statistics
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


INSERT = "INSERT INTO items(name, email, score, visits, avatar, created_at) VALUES (?, ?, ?, ?, ?, ?)"
UPDATE = "UPDATE items SET name = ?, score = ?, visits = visits + 1 WHERE id = ?"


def main():
    paths = {"without": sys.argv[1], "with": sys.argv[2]}
    n, sync, block = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    conns = {}
    for mode, path in paths.items():
        conns[mode] = sqlite3.connect(path, timeout=30)
        conns[mode].execute(f"PRAGMA synchronous = {sync}")
    work = {
        "insert": (INSERT, [row(i) for i in range(1, n + 1)]),
        "update": (UPDATE, [(f"renamed-{i:07d}", (i * 1.13) % 1000, i) for i in range(1, n + 1)]),
    }
    times = {m: {"insert": [], "update": []} for m in paths}
    clock = time.perf_counter
    for op, (sql, params) in work.items():
        for b, start in enumerate(range(0, n, block)):
            order = ("without", "with") if b % 2 == 0 else ("with", "without")
            for mode in order:
                conn, out = conns[mode], times[mode][op]
                for p in params[start : start + block]:
                    t = clock()
                    conn.execute(sql, p)
                    conn.commit()
                    out.append(clock() - t)
    for c in conns.values():
        c.close()
    result = {
        m: {f"{op}_{k}": v for op, xs in ops.items() for k, v in (("mean_us", statistics.fmean(xs) * 1e6), ("median_us", statistics.median(xs) * 1e6))}
        for m, ops in times.items()
    }
    result["sqlite"] = sqlite3.sqlite_version
    print(json.dumps(result))


if __name__ == "__main__":
    main()
