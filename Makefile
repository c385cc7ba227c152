# Thin targets; CI runs the same commands (.ci/run). `make run` and `make test` need nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
NODE_STAMP := tests/idp/node_modules/.installed
SYSTEM_STAMP := $(VENV)/.installed-system
TOOLS  := .tools

.PHONY: install run test unit lint fmt typecheck precommit proto proto-check buf check bench helm-lint clean

install: $(STAMP) $(NODE_STAMP) $(SYSTEM_STAMP)

# Debian packages the tests start themselves: PgBouncer (transaction pooling in front of the test PostgreSQL).
$(SYSTEM_STAMP): $(STAMP)
	command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null)
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(NODE_STAMP): tests/idp/package.json tests/idp/package-lock.json
	npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
	touch $@

run: $(STAMP)
	$(VENV)/bin/token-broker dev

test: $(STAMP) $(NODE_STAMP) $(SYSTEM_STAMP)
	$(PY) -m pytest

# The fast map: the unit tests alone, no PostgreSQL, no Node, no sockets (seconds).
unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

precommit: $(STAMP)
	$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/broker/v1/token_broker.proto

proto-check: proto
	git diff --exit-code -- broker/v1 || (echo "broker/v1 is out of date with protos/: run make proto" >&2; exit 1)

# On a branch: breaking changes against main. On main itself: against the previous commit that had buf.yaml.
buf: $(STAMP)
	$(VENV)/bin/buf lint
	@if [ "$$(git rev-parse --abbrev-ref HEAD)" != main ]; then against=".git#branch=main"; \
	elif git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then against=".git#ref=HEAD~1"; \
	else echo "buf breaking: no earlier contract to compare with"; exit 0; fi; \
	echo "buf breaking --against $$against"; $(VENV)/bin/buf breaking --against "$$against"

helm-lint: $(STAMP)
	$(PY) -m tests.support.helm lint

bench: $(STAMP) $(NODE_STAMP) $(SYSTEM_STAMP)
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) -m bench.run

# Everything CI runs (.ci/run is `make check`): the README's test command first, then the static checks.
check: test lint typecheck precommit proto-check buf helm-lint

clean:
	rm -rf $(VENV) $(TOOLS) .data tests/idp/node_modules
