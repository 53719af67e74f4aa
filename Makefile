# order-api: `make run` serves on :3000 against the local PostgreSQL; `make test` runs the suite.
# Settings come from the environment or .env (see .env.example).

CARGO   ?= cargo
RELEASE := target/release/order-api
# The binary the image ships (Dockerfile): the same build with glibc linked statically, under
# target/<host triple>/. `make bench` measures this one.
HOST     = $(shell rustc -vV | sed -n 's/^host: //p')
SHIPPED  = target/$(HOST)/release/order-api
# Compose v2 (`docker compose`) when the Docker CLI has it, else v1 (`docker-compose`).
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
IMAGE   ?= order-api

.PHONY: run build build-shipped migrate seed test lint fuzz bench chaos soak ha-up ha-down ha-status fmt clean docker-build up down logs help \
	up-observed rules-check prometheus-check k8s-check release-check client-check openapi-client-check \
	webhook-receiver-check backup-setup backup backups restore backup-check restore-drill up-backup

## run: build, create the database if missing, migrate, seed, and serve on $API_PORT (3000)
run: build
	$(RELEASE) create-db
	SEED_ON_START=true $(RELEASE) serve

build:
	$(CARGO) build --release --locked

# RUSTFLAGS reach only the --target build, not build scripts and proc macros (as in the Dockerfile).
build-shipped:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked --target $(HOST)

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
## code, an event not delivered); a missed performance target is printed as MISS and does not
## change the exit status. COMPARE_BINARY=path also runs the orders scenarios with another build
## (e.g. one without order events) beside this one, on a database of its own. The binary measured
## is the one the image ships (glibc linked statically: `build-shipped`).
DURATION ?= 15
bench: build-shipped
	$(CARGO) build --profile tools --locked --example webhook_sink
	python3 bench/run.py --binary $(SHIPPED) --duration $(DURATION) $(if $(COMPARE_BINARY),--compare-binary $(COMPARE_BINARY))

## chaos: faults injected under load into the release binary, each on a fresh database, then
## the data checked: pg-restart (stops the local PostgreSQL for 3 s: run it alone), api-kill,
## slow-clients, replicas, events (webhooks to a flaky receiver, on a private PostgreSQL);
## and on request events-heavy, failover (CHAOS=failover: a pg_auto_failover pair, its
## primary killed). CHAOS="api-kill replicas" picks some; verdicts in target/reliability/
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

## backup-setup: opt-in, once: pgBackRest for the PostgreSQL of `make run` (docs/backups.md):
## config and repository key, WAL archiving on (archive_mode=on RESTARTS PostgreSQL, which
## it says), stanza, a check that WAL arrives. HA=1: the `make ha-up` pair; BACKUP_* settings
BACKUP = $(if $(HA),BACKUP_HA=1 )python3 backup/run.py
backup-setup:
	$(BACKUP) setup

## backup: a backup while the shop runs (TYPE=incr by default: what changed since the last
## one; the first is full; TYPE=full or diff)
TYPE ?= incr
backup:
	$(BACKUP) backup $(TYPE)

## backups: the backups with their sizes, and the time range a restore can reach
backups:
	$(BACKUP) list

## restore: TARGET_TIME='2026-12-04 06:49:47+00' (or latest) into a NEW data directory and
## port (RESTORE_DIR, RESTORE_PORT), started, its DATABASE_URL printed; the running cluster
## is not touched
restore:
	$(BACKUP) restore "$(TARGET_TIME)"

## backup-check: WAL archiving works: the primary's latest WAL reaches the repository
backup-check:
	$(BACKUP) check

## restore-drill: keyed orders, a backup under load, the repository unplugged and full, a
## mark T, TRUNCATE orders CASCADE, a restore to T checked against every client's answers; RPO,
## RTO, sizes in target/reliability/. DRILL=short (CI, ~1 min), HA=1 (across a failover of
## the ha-up pair), DISASTER=drop-datadir (the disk lost). Private clusters only
restore-drill: build
	$(CARGO) run --profile tools --locked --example restore_drill -- $(or $(DRILL),full) \
		$(if $(HA),--ha) $(if $(DISASTER),--disaster $(DISASTER))

## soak: a mixed workload for SOAK_SECONDS (default 600), then every invariant checked
SOAK_SECONDS ?= 600
soak: build
	$(CARGO) run --profile tools --locked --example soak -- $(SOAK_SECONDS)

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean

# The image's OCI labels and `order-api --version` (the build context has no .git): the commit,
# and where the source is (the `origin` remote, when there is one).
GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE_URL ?= $(or $(shell git config --get remote.origin.url 2>/dev/null),unknown)
export GIT_COMMIT SOURCE_URL

## docker-build: build the image alone, tagged $(IMAGE) (the tag docker-compose.yml uses)
docker-build:
	docker build --build-arg REVISION=$(GIT_COMMIT) --build-arg SOURCE=$(SOURCE_URL) -t $(IMAGE) .

## up: build the image and start PostgreSQL and the API in the background, migrated and
## seeded, on localhost:$API_PORT (3000); `make logs` follows them, `make down` stops them
up:
	$(COMPOSE) up --build -d
	@echo "started in the background; the API answers on localhost:3000 (or API_PORT) once 'docker ps' shows it healthy"

## down: stop and remove the containers (those of the observed and backup profiles too); the
## volumes stay (add -v by hand to drop them)
down:
	$(COMPOSE) --profile observed --profile backup down

## up-backup: `make up` plus backups (docs/backups.md): the database with pgBackRest archiving
## WAL into an encrypted repository volume, and the pgbackrest service taking the backups
up-backup:
	$(COMPOSE) --profile backup build pgbackrest
	DB_IMAGE=order-api-postgres-pgbackrest $(COMPOSE) --profile backup up --build -d
	@echo "started with backups; 'docker compose --profile backup exec pgbackrest order-api-backup info' lists them"

## logs: follow the logs of both services
logs:
	$(COMPOSE) logs -f --tail=100

# ---- Operations: observability, Kubernetes, releases, the client path (issue 22) ----

## up-observed: `make up` plus Prometheus (Debian's package) scraping the API with the rules of
## deploy/prometheus/rules; its UI and API on localhost:9090 (PROMETHEUS_PORT)
up-observed:
	$(COMPOSE) --profile observed up --build -d
	@echo "started in the background; the API on localhost:3000, Prometheus on localhost:$${PROMETHEUS_PORT:-9090}"

## rules-check: promtool check rules/config and promtool test rules (installs Debian's prometheus if missing)
rules-check:
	deploy/prometheus/check

## prometheus-check: the real prometheus scraping a live order-api; its HTTP API asked for the series
prometheus-check:
	deploy/prometheus/live-check

## k8s-check: render every Kustomize overlay, validate it against the Kubernetes and CRD schemas
## and the deployment rules (deploy/k8s/policy.py); then the same on broken copies, which must fail
k8s-check:
	deploy/k8s/check
	deploy/k8s/check-test

## release-check: Cargo.toml, CHANGELOG.md, openapi.json, the Dockerfile and the git tags agree
## (the rule: .ci/release-check); RELEASE_CHECK_TEST=1 also runs it on made-up repositories,
## agreeing and not (.ci/release-check-test)
release-check:
	.ci/release-check
	@if [ -n "$(RELEASE_CHECK_TEST)" ]; then .ci/release-check-test; fi


## client-check: examples/place_order against a live server through an injected fault
client-check:
	examples/place-order-check

## openapi-client-check: generate a typed Python client from openapi.json and import it
openapi-client-check:
	examples/openapi-client/check

## webhook-receiver-check: the example webhook receiver (official Standard Webhooks verifier)
## against a live server, through a secret rotation
webhook-receiver-check:
	examples/webhook-receiver/check

## help: list the targets and what they do, from their ## comments in this Makefile
help:
	@awk '/^## [A-Za-z0-9_-]+:/ { name = $$2; sub(/:$$/, "", name); text = $$0; sub(/^## [^:]+: */, "", text); \
		printf "  %-13s %s\n", name, text; more = 1; next } \
		more && /^## / { text = $$0; sub(/^## */, "", text); printf "  %-13s %s\n", "", text; next } \
		{ more = 0 }' $(firstword $(MAKEFILE_LIST))
