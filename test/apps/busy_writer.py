"""An app that writes one row per commit for a while with a short busy timeout,
and counts the writes that failed with "database is locked": what a user of
unisync would see if the agent held the database's write lock too long.

usage: busy_writer.py DB SECONDS TIMEOUT_S   (prints one JSON line at the end)
"""
import json
import sqlite3
import sys
import time

path, seconds, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
db.execute("CREATE TABLE IF NOT EXISTS busy(id INTEGER PRIMARY KEY, at REAL, note TEXT)")
ok = locked = 0
worst = 0.0
end = time.time() + seconds
while time.time() < end:
    t0 = time.time()
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO busy(at, note) VALUES (?, ?)", (t0, "x" * 50))
        db.execute("COMMIT")
        ok += 1
    except sqlite3.OperationalError as err:
        if "locked" not in str(err) and "busy" not in str(err):
            raise
        locked += 1
        try:
            db.execute("ROLLBACK")
        except sqlite3.OperationalError:
            pass
    worst = max(worst, time.time() - t0)
    time.sleep(0.002)
print(json.dumps({"ok": ok, "locked": locked, "worst_ms": round(worst * 1000, 1)}))
