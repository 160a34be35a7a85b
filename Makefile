# Two commands do everything on a fresh clone: `make demo` and `make test`.
.PHONY: all install build demo test bench deps clean

all: build

# npm ci installs exactly package-lock.json; better-sqlite3 and zstd-napi are
# native (allowed to build in package.json's allowScripts).
node_modules/.package-lock.json: package.json package-lock.json
	npm ci
	@touch $@

install: node_modules/.package-lock.json

build: install
	npm run build

# Debian packages the tests use: Python's Flask-SQLAlchemy (the real app client),
# rsync (benchmark baseline) and Chromium (the console's browser test), installed
# when missing and we are root; and
# moto's S3 server (the second S3 implementation the tests use), from PyPI when missing.
deps:
	@command -v moto_server >/dev/null || python3 -c 'import moto.server' 2>/dev/null || \
	  python3 -m pip install --quiet 'moto[server]>=5,<6' 2>/dev/null || \
	  python3 -m pip install --quiet --break-system-packages 'moto[server]>=5,<6' || \
	  { echo "please install moto's S3 server: python3 -m pip install 'moto[server]>=5'"; exit 1; }
	@if ! /usr/bin/python3 -c 'import flask_sqlalchemy' 2>/dev/null || ! command -v rsync >/dev/null || [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-flask-sqlalchemy rsync chromium >/dev/null; \
	  else \
	    echo "please install the Debian packages python3-flask-sqlalchemy, rsync and chromium (sudo apt-get install ...)"; exit 1; \
	  fi; \
	fi

demo: build
	bash scripts/demo.sh

# The layer check (scripts/check-layers.mjs) fails on an import against the flow.
test: deps build
	node scripts/check-layers.mjs
	npm test

bench: deps build
	npm run bench

clean:
	rm -rf dist .demo
