# order-api: `make run` serves on :3000 against the local PostgreSQL; `make test` runs the suite.
# Settings come from the environment or .env (see .env.example).

CARGO   ?= cargo
RELEASE := target/release/order-api
# Compose v2 (`docker compose`) when the Docker CLI has it, else v1 (`docker-compose`).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
IMAGE   ?= order-api

.PHONY: run build migrate seed test lint fuzz bench chaos soak ha-up ha-down ha-status fmt clean docker-build up down logs help

## run: build, create the database if missing, migrate, seed, and serve on $API_PORT (3000)
run: build
	$(RELEASE) create-db
	SEED_ON_START=true $(RELEASE) serve

build:
	$(CARGO) build --release --locked

## migrate: create the database if missing and apply pending migrations
migrate: build
	$(RELEASE) create-db
	$(RELEASE) migrate

## seed: migrate, then load the seed data (idempotent)
seed: build
	$(RELEASE) create-db
	$(RELEASE) seed

## test: the whole suite against the PostgreSQL of TEST_DATABASE_URL (default: local, user postgres;
## what it needs of PostgreSQL: README, Prerequisites). Under cargo-nextest a hanging test is
## killed after 3 minutes (.config/nextest.toml; profile `ci` when CI=true). Without nextest it
## runs cargo test, which has no such timeout, except with CI=true: then it fails.
test:
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --locked --no-fail-fast --profile $(if $(filter true,$(CI)),ci,default); \
	elif [ "$(CI)" = true ]; then \
		echo "make test: CI=true needs cargo-nextest (per-test timeouts, the ci profile): cargo install cargo-nextest --locked" >&2; \
		exit 1; \
	else \
		echo "make test: cargo-nextest not found; running cargo test, which has no per-test timeout" >&2; \
		$(CARGO) test --locked; \
	fi

## lint: formatting check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## fuzz: schemathesis against /openapi.json of a live server on a fresh database (FUZZ_SECONDS, default 60)
fuzz:
	fuzz/run $(or $(FUZZ_SECONDS),60)

## bench: the API under wrk next to pgbench doing the same work in SQL; table + target/bench/*.json
## (needs wrk and pgbench; DURATION=seconds per run, default 15; see bench/run.py --help).
## Exits 1 on a failed correctness check (audit, request errors, flash sale, ledger, exit
## code); a missed performance target is printed as MISS and does not change the exit status.
DURATION ?= 15
bench: build
	python3 bench/run.py --duration $(DURATION)

## chaos: faults injected under load into the release binary, each on a fresh database, then
## the data checked: pg-restart (stops the local PostgreSQL for 3 s: run it alone), api-kill,
## slow-clients, replicas; and failover on request (CHAOS=failover: a pg_auto_failover pair,
## its primary killed). CHAOS="api-kill replicas" picks some; verdicts in target/reliability/
chaos: build
	$(CARGO) run --profile tools --locked --example chaos -- $(CHAOS)

## ha-up: a local pg_auto_failover pair (monitor :6000, nodes :6001 and :6002, synchronous
## replication; needs postgresql-15-auto-failover, run as root). Serve on it with
## DATABASE_URL=$(.ci/ha url); `make chaos CHAOS=failover` makes its own.
ha-up:
	.ci/ha up

## ha-down: stop the pair (its data stays; `.ci/ha destroy` removes it)
ha-down:
	.ci/ha down

## ha-status: the pair's nodes as the monitor sees them
ha-status:
	.ci/ha status

## soak: a mixed workload for SOAK_SECONDS (default 600), then every invariant checked
SOAK_SECONDS ?= 600
soak: build
	$(CARGO) run --profile tools --locked --example soak -- $(SOAK_SECONDS)

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

## docker-build: build the image alone, tagged $(IMAGE) (the tag docker-compose.yml uses)
docker-build:
	docker build -t $(IMAGE) .

## up: build the image and start PostgreSQL and the API in the background, migrated and
## seeded, on localhost:$API_PORT (3000); `make logs` follows them, `make down` stops them
up:
	$(COMPOSE) up --build -d
	@echo "started in the background; the API answers on localhost:3000 (or API_PORT) once 'docker ps' shows it healthy"

## down: stop and remove the containers; the database volume stays (add -v by hand to drop it)
down:
	$(COMPOSE) down

## logs: follow the logs of both services
logs:
	$(COMPOSE) logs -f --tail=100

## help: list the targets and what they do, from their ## comments in this Makefile
help:
	@awk '/^## [A-Za-z_-]+:/ { name = $$2; sub(/:$$/, "", name); text = $$0; sub(/^## [^:]+: */, "", text); \
		printf "  %-13s %s\n", name, text; more = 1; next } \
		more && /^## / { text = $$0; sub(/^## */, "", text); printf "  %-13s %s\n", "", text; next } \
		{ more = 0 }' $(firstword $(MAKEFILE_LIST))
