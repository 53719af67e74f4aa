//! The integration tests, in one binary: the crate and the test dependencies are linked once
//! instead of once per file. One module per area; `common` is the harness (a fresh database
//! and server per test).

mod common;

mod archiving;
mod auth;
mod batch_faults;
mod batching;
mod jwks;

mod concurrency;
mod contract;
mod endpoints;
mod errors;
mod events;
mod faults;
mod hostile_input;
mod http_edge;
mod idempotency;
mod ledger;
mod lifecycle;
mod limits;
mod lingering_close;
mod listing;
mod logs;
mod migrations;
mod observability;
mod operations;
mod outcomes;
mod pooler;
mod rate_limit;
mod read_replica;
mod release;
mod shutdown;
mod tls;
mod traces;
mod webhooks;
