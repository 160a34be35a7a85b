#!/usr/bin/env bash
# Three unisync nodes on this machine, each beside its own instance folder with
# two SQLite databases, sharing one local-directory store. Every node's app
# writes at the same time (inserts, updates of each other's rows, deletes, and a
# schema migration that reaches the nodes at different times); then we check
# that all three hold identical tables.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/.demo"
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
UNISYNC="node bin/unisync.js"

rm -rf "$DEMO"
mkdir -p "$DEMO/store"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== creating three nodes in $DEMO"
for n in 1 2 3; do
  mkdir -p "$DEMO/node$n"
  # The apps create their schema before unisync starts, as a real app would.
  "$PY" test/apps/random_writer.py "$DEMO/node$n/data.db" --node "$n" --ops 0 >/dev/null
  "$PY" test/apps/random_writer.py "$DEMO/node$n/shop.db" --node "$n" --ops 0 >/dev/null
  "$PY" -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table if not exists notes(id integer primary key, body text)'); c.commit()" "$DEMO/node$n/data.db"
done

echo "== starting three agents (logs in $DEMO/nodeN.log)"
for n in 1 2 3; do
  UNISYNC_POLL_MIN_MS=100 UNISYNC_POLL_MAX_MS=300 $UNISYNC run "$DEMO/node$n" "file://$DEMO/store" --node "node$n" --http-port 0 >"$DEMO/node$n.log" 2>&1 &
  pids+=($!)
done
# Agents first, then the apps (README, "Order"): a row written before a node's triggers are in
# is a row that was there before unisync, and equal ids on several nodes then count as copies.
for n in 1 2 3; do
  for _ in $(seq 300); do
    grep -q '"db":"data.db".*enrolled this database' "$DEMO/node$n.log" 2>/dev/null && break
    sleep 0.1
  done
  grep -q '"db":"data.db".*enrolled this database' "$DEMO/node$n.log" || { echo "!! node$n's agent did not get ready in 30 s:"; tail -5 "$DEMO/node$n.log"; exit 1; }
done

echo "== files: each node adds its own, all three edit shared.txt at once (a conflict)"
mkdir -p "$DEMO/node1/teams/Red Team" "$DEMO/node2/uploads" "$DEMO/node3/notes"
echo '{"members": ["Seth Herod"]}' >"$DEMO/node1/teams/Red Team/config.json"
head -c 200000 /dev/urandom >"$DEMO/node2/uploads/logo.png"
echo "héllo from node3 🎉" >"$DEMO/node3/notes/ünïcode note.txt"
echo "node1's own log line, never synced" >"$DEMO/node1/app.log"
for n in 1 2 3; do echo "shared, as edited on node$n" >"$DEMO/node$n/shared.txt"; done

echo "== all three nodes add a note at the same instant: SQLite picks id 1 on each (an id collision)"
for n in 1 2 3; do
  "$PY" -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('insert into notes(body) values (?)', ('note written on node' + sys.argv[2],)); c.commit()" "$DEMO/node$n/data.db" "$n"
done

echo "== the apps write on all three nodes at once (300 + 150 transactions each, migration mid-run)"
writers=()
for n in 1 2 3; do
  "$PY" test/apps/random_writer.py "$DEMO/node$n/data.db" --node "$n" --seed "$n" --ops 300 --migrate-at $((n * 80)) --sleep-ms 5 --journal-file "$DEMO/journal$n.jsonl" &
  writers+=($!)
  "$PY" test/apps/random_writer.py "$DEMO/node$n/shop.db" --node "$n" --seed "$((n + 10))" --ops 150 --sleep-ms 10 --journal-file "$DEMO/journal-shop$n.jsonl" &
  writers+=($!)
done
for w in "${writers[@]}"; do wait "$w"; done
echo "   writers done"

echo "== waiting for the nodes to converge"
start=$(date +%s)
# Folders are compared without what never syncs: databases, logs, unisync's own state.
same_files() { diff -r -q -x .unisync -x '*.db' -x '*.db-wal' -x '*.db-shm' -x '*.log' "$DEMO/node1" "$DEMO/node$1" >/dev/null; }
until $UNISYNC verify "$DEMO/node1" "$DEMO/node2" >/dev/null && $UNISYNC verify "$DEMO/node1" "$DEMO/node3" >/dev/null && same_files 2 && same_files 3; do
  if (( $(date +%s) - start > 90 )); then
    echo "!! not converged after 90 s:"; $UNISYNC verify "$DEMO/node1" "$DEMO/node2" || true; $UNISYNC verify "$DEMO/node1" "$DEMO/node3" || true
    diff -r -q -x .unisync -x '*.db' -x '*.db-wal' -x '*.db-shm' -x '*.log' "$DEMO/node1" "$DEMO/node2" || true
    exit 1
  fi
  sleep 1
done
echo "   converged in $(( $(date +%s) - start )) s after the last write"

echo "== row counts per node"
for n in 1 2 3; do
  printf "node%s: " "$n"
  "$PY" - "$DEMO/node$n" <<'PY'
import sqlite3, sys
out = []
for db in ("data.db", "shop.db"):
    c = sqlite3.connect(f"{sys.argv[1]}/{db}")
    tables = [r[0] for r in c.execute("select name from sqlite_master where type='table' and name not like '\\_unisync\\_%' escape '\\' and name not like 'sqlite_%' order by name")]
    counts = []
    for t in tables:
        n = c.execute('select count(*) from "%s"' % t.replace('"', '""')).fetchone()[0]
        counts.append("%s=%d" % (t, n))
    out.append(db + " " + " ".join(counts))
print(" | ".join(out))
PY
done
echo "== notes on node2: all three kept; a note whose id was taken moved to a new id, the same on every node"
"$PY" -c "import sqlite3,sys; [print('  ', r) for r in sqlite3.connect(sys.argv[1]).execute('select id, body from notes order by id')]" "$DEMO/node2/data.db"
notes=$("$PY" -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from notes').fetchone()[0])" "$DEMO/node2/data.db")
[ "$notes" = 3 ] || { echo "!! expected the three notes on node2, found $notes"; exit 1; }
echo "== unisync conflicts node2"
$UNISYNC conflicts "$DEMO/node2"
echo "== files on node2 (app.log stayed on node1; the losers of shared.txt are kept as conflict copies)"
(cd "$DEMO/node2" && find . -path ./.unisync -prune -o -type f ! -name '*.db*' -print | sort)
echo "== unisync status node1"
$UNISYNC status "$DEMO/node1"
echo "== unisync verify node1 node2"
$UNISYNC verify "$DEMO/node1" "$DEMO/node2"
console() { grep -o '"url":"http://[^"]*"' "$DEMO/node$1.log" | head -1 | cut -d'"' -f4; }
echo "demo OK: three nodes hold identical databases and folders. Files are in $DEMO."
if [ -t 0 ] && [ -t 1 ] && [ -z "${DEMO_EXIT:-}" ]; then
  echo "== the cluster keeps running; open a node's console in a browser:"
  for n in 1 2 3; do echo "   node$n: $(console "$n")"; done
  echo "   write to $DEMO/node1/data.db (or drop files into $DEMO/node2/) and watch the other consoles."
  echo "   Press Ctrl-C to stop the three agents."
  trap 'echo; echo "== stopping agents"; for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" || true; done; pids=(); exit 0' INT TERM
  while true; do sleep 3600 & wait $! || true; done
fi
echo "== consoles were: node1 $(console 1), node2 $(console 2), node3 $(console 3) (not on a terminal: stopping; DEMO_EXIT=1 forces this)"
echo "== stopping agents"
for p in "${pids[@]}"; do kill -TERM "$p"; done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()
