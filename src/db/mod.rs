//! Everything that talks to PostgreSQL, behind one door: `Db`, which owns the pools (the
//! primary, and the standby of `DATABASE_READ_URL`), the batch queues and their share of the
//! pool, and has one function per operation of the service. A whole operation (an order with
//! its idempotency key) is one call. Nothing here knows about HTTP.
//!
//! Inside: `pool.rs` checks connections out, `pipeline.rs` runs statements on them, `tx.rs`
//! holds a transaction open across round trips, `failure.rs` says what a failed round trip
//! means for the client, `batch.rs` gathers concurrent requests into one transaction or
//! query; `migrate.rs` is the migration runner, `audit.rs` the invariants; and one file (or
//! folder) per resource holds its SQL.

pub mod archiver;
pub mod audit;
mod batch;
#[macro_use]
pub mod events;
mod failure;
pub mod idempotency;
pub mod migrate;
mod orders;
mod pipeline;
pub mod pool;
mod products;
pub mod target;
mod tx;
mod webhooks;

use std::{sync::Arc, time::Duration};

use tokio_postgres::{Client, error::SqlState};

pub use events::{Event, EventSignal, FeedPage, FeedQuery, Position};
pub use failure::{Failure, describe};
pub use orders::{
    CreatedOrder, MAX_BATCH, OrderDetails, OrderFilter, OrderItem, OrderRequest, OrderSummary, OrderUser,
    PlaceSettings, Placed, Replay, StoredAnswer,
};
pub use pipeline::Sql;
pub use pool::{Pool, PoolSettings, PoolStatus, PooledConn};
pub use products::{Catalogue, Product};
pub use target::Target;
pub use tx::Tx;
pub use webhooks::{Attempt, AttemptRecord, Backlog, Claimed, Endpoint, Outcome, Routed, SECRET_OVERLAP};

use crate::{
    domain::{NewWebhook, OrderStatus, Page, WebhookChange},
    error::Error,
};

/// How long what is kept for a while is kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `IDEMPOTENCY_RETENTION_HOURS`.
    pub idempotency_keys: Duration,
    /// `EVENT_RETENTION_DAYS`.
    pub events: Duration,
}

/// What `Db::start` needs.
#[derive(Clone)]
pub struct DbSettings {
    pub primary: Target,
    /// `DATABASE_READ_URL`: a standby for the catalogue reads.
    pub standby: Option<Target>,
    /// The same for both pools; `max_size` (`DB_POOL_SIZE`) also sizes the lanes.
    pub pool: PoolSettings,
    pub place: PlaceSettings,
}

/// How many batches of each kind run at once: each kind of work gets its share of the pool,
/// so that a burst of one (a flash sale, a storm of order reads) leaves connections for the
/// others. Order batches, order reads and catalogue reads take a quarter, a half and a quarter
/// of `DB_POOL_SIZE` (2, 4 and 2 of the default 8: a batch holds its connection for one or two
/// round trips, and more in flight only queue inside PostgreSQL on 2 cores). The contended
/// lane (orders waiting for a product lock another transaction holds) takes another quarter,
/// used only while products are contended; the pool stays the hard bound, so then the lanes
/// wait for connections rather than for each other. At least one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    pub orders: usize,
    pub contended_orders: usize,
    pub order_reads: usize,
    pub catalogue_reads: usize,
}

impl Lanes {
    pub fn for_pool(size: usize) -> Lanes {
        let share = |fraction: usize| (size / fraction).max(1);
        Lanes { orders: share(4), contended_orders: share(4), order_reads: share(2), catalogue_reads: share(4) }
    }
}

/// The database, as the rest of the service sees it: one handle, cheap to clone, with one
/// function per operation.
#[derive(Clone)]
pub struct Db {
    primary: Pool,
    standby: Option<Pool>,
    placing: orders::Placing,
    order_reads: orders::ReadBatches,
    catalogue: products::CatalogueReads,
    /// Wakes the waiters for events; fed by the LISTEN connection.
    events: EventSignal,
    /// The LISTEN connection's task, aborted by `close`.
    listener: Arc<tokio::task::JoinHandle<()>>,
}

impl Db {
    /// Builds the pools and starts the batch queues; no connection is opened until a request
    /// needs one.
    pub fn start(settings: DbSettings) -> Db {
        let primary = Pool::new(settings.primary, settings.pool.clone());
        let standby = settings.standby.map(|standby| Pool::new(standby, settings.pool.clone()));
        let lanes = Lanes::for_pool(settings.pool.max_size);
        let (events, announcer, listener) = events::listen(primary.clone(), !settings.pool.unnamed_statements);
        let placing =
            orders::Placing::start(primary.clone(), settings.place, announcer, lanes.orders, lanes.contended_orders);
        let order_reads = orders::read_in_batches(primary.clone(), lanes.order_reads);
        let (for_catalogue, standby_for_catalogue) = (primary.clone(), standby.clone());
        let catalogue = products::share_catalogue_reads(
            move || {
                let (primary, standby) = (for_catalogue.clone(), standby_for_catalogue.clone());
                async move { on_catalogue_pool(standby.as_ref(), &primary, products::list_all).await }
            },
            lanes.catalogue_reads,
        );
        Db { primary, standby, placing, order_reads, catalogue, events, listener: Arc::new(listener) }
    }

    /// Places an order (see `orders::place`).
    pub async fn place(&self, request: OrderRequest) -> Result<Placed, Error> {
        self.placing.place(request).await
    }

    /// The order `order_id` if it exists and (with `owner`) is that user's.
    pub async fn order(&self, order_id: i64, owner: Option<i32>) -> Result<OrderDetails, Error> {
        self.order_reads.submit(orders::OrderLookup { order_id, owner }).await
    }

    /// One keyset page of orders.
    pub async fn orders(&self, filter: OrderFilter, page: Page) -> Result<Vec<OrderSummary>, Error> {
        orders::list(&self.primary, filter, page).await
    }

    /// Cancels an order (with `owner`, only that user's: another's is `OrderNotFound`).
    pub async fn cancel(&self, order_id: i64, owner: Option<i32>) -> Result<(), Error> {
        orders::cancel(&self.primary, order_id, owner).await
    }

    /// Moves an order along its lifecycle.
    pub async fn set_status(&self, order_id: i64, target: OrderStatus) -> Result<(), Error> {
        orders::set_status(&self.primary, order_id, target).await
    }

    /// The whole catalogue, read with the requests that ask at the same time.
    pub async fn catalogue(&self) -> Result<Catalogue, Error> {
        self.catalogue.submit(()).await
    }

    /// One keyset page of the catalogue.
    pub async fn products(&self, page: Page) -> Result<Vec<Product>, Error> {
        on_catalogue_pool(self.standby.as_ref(), &self.primary, |pool| products::list_page(pool, page)).await
    }

    pub async fn product(&self, product_id: i64) -> Result<Product, Error> {
        on_catalogue_pool(self.standby.as_ref(), &self.primary, |pool| products::get(pool, product_id)).await
    }

    /// Adds `quantity` to a product's stock (recorded in the inventory ledger).
    pub async fn restock(&self, product_id: i64, quantity: i32) -> Result<Product, Error> {
        products::restock(&self.primary, product_id, quantity).await
    }

    /// One page of the event feed, in commit order.
    pub async fn events(&self, query: &FeedQuery) -> Result<FeedPage, Error> {
        events::read_feed(&self.primary, query).await
    }

    /// One order's events (with `owner`, only if it is that user's order).
    pub async fn order_events(&self, order_id: i64, owner: Option<i32>) -> Result<Vec<Event>, Error> {
        events::order_events(&self.primary, order_id, owner).await
    }

    /// A signal that wakes when events may have committed.
    pub fn event_signal(&self) -> EventSignal {
        self.events.clone()
    }

    /// Registers a webhook endpoint signing with `secret`.
    pub async fn create_webhook(&self, hook: &NewWebhook, secret: &str) -> Result<Endpoint, Error> {
        webhooks::create(&self.primary, hook, secret).await
    }

    pub async fn webhooks(&self) -> Result<Vec<Endpoint>, Error> {
        webhooks::list(&self.primary).await
    }

    pub async fn webhook(&self, id: i64) -> Result<Endpoint, Error> {
        webhooks::get(&self.primary, id).await
    }

    pub async fn change_webhook(&self, id: i64, change: &WebhookChange) -> Result<Endpoint, Error> {
        webhooks::change(&self.primary, id, change).await
    }

    pub async fn delete_webhook(&self, id: i64) -> Result<(), Error> {
        webhooks::delete(&self.primary, id).await
    }

    /// Gives the endpoint `secret`; returns when its old secret stops signing.
    pub async fn rotate_webhook_secret(&self, id: i64, secret: &str) -> Result<String, Error> {
        webhooks::rotate(&self.primary, id, secret).await
    }

    /// Queues the endpoint's events after `after` again; how many.
    pub async fn replay_webhook(&self, id: i64, after: Position) -> Result<u64, Error> {
        webhooks::replay(&self.primary, id, after).await
    }

    /// The endpoint's delivery attempts before `before`, newest first.
    pub async fn webhook_attempts(&self, id: i64, before: Option<i64>, limit: i64) -> Result<Vec<Attempt>, Error> {
        webhooks::attempts(&self.primary, id, before, limit).await
    }

    /// Routes the events committed since the last pass to the endpoints' deliveries.
    pub async fn route_events(&self) -> Result<webhooks::Routed, Error> {
        webhooks::route(&self.primary).await
    }

    /// Claims the deliveries due, up to `per_endpoint` per endpoint less what `held` says this
    /// replica holds of it, leased for `lease_for` under the token `lease`.
    pub async fn claim_deliveries(
        &self,
        per_endpoint: i64,
        held: &[(i64, i64)],
        lease_for: Duration,
        lease: i64,
    ) -> Result<Vec<Claimed>, Error> {
        webhooks::claim(&self.primary, per_endpoint, held, lease_for, lease).await
    }

    /// Records delivery attempts; the endpoints they disabled, with the reason.
    pub async fn record_attempts(
        &self,
        attempts: &[AttemptRecord],
        disable_after: Duration,
    ) -> Result<Vec<(i64, String)>, Error> {
        webhooks::record(&self.primary, attempts, disable_after).await
    }

    /// Each enabled endpoint's undelivered events.
    pub async fn webhook_backlog(&self) -> Result<Vec<Backlog>, Error> {
        webhooks::backlog(&self.primary).await
    }

    /// New statistics of the webhook deliveries (see `webhooks::analyze_deliveries`).
    pub async fn analyze_webhook_deliveries(&self) -> Result<(), Error> {
        webhooks::analyze_deliveries(&self.primary).await
    }

    /// `SELECT 1` on a pooled connection of the primary: whether the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.primary.get().await?.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    /// PostgreSQL's WAL archiver as it reports itself (`pg_stat_archiver`).
    pub async fn archiver_stats(&self) -> Result<archiver::ArchiverStats, Error> {
        archiver::read(&self.primary).await
    }

    /// Whether every migration of this build is applied.
    pub async fn migrations_applied(&self) -> Result<bool, Error> {
        migrate::all_applied(&self.primary).await
    }

    /// The primary pool's figures, for `/metrics`.
    pub fn pool_status(&self) -> PoolStatus {
        self.primary.status()
    }

    /// Deletes expired idempotency keys and events every `interval`, forever (abort the task
    /// to stop).
    pub async fn purge_periodically(self, retention: Retention, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            match idempotency::purge_expired(&self.primary, retention.idempotency_keys).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "expired idempotency keys purged"),
                Err(e) => tracing::warn!(error = ?e, "purging idempotency keys failed"),
            }
            match events::purge(&self.primary, retention.events).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "expired events purged"),
                Err(e) => tracing::warn!(error = ?e, "purging events failed"),
            }
        }
    }

    /// Closes idle connections and stops keeping returned ones.
    pub fn close(&self) {
        self.listener.abort();
        self.primary.close();
        if let Some(standby) = &self.standby {
            standby.close();
        }
    }
}

/// Runs a catalogue read on the standby of `DATABASE_READ_URL` when there is one, and on the
/// primary when there is none or it cannot serve (a 503 of its own: down, unreachable).
/// A standby may be a moment behind (replay lag): the stock it shows can be that old, which
/// is safe, since an order checks stock on the primary under the product's row lock.
async fn on_catalogue_pool<'a, T, F>(
    standby: Option<&'a Pool>,
    primary: &'a Pool,
    read: impl Fn(&'a Pool) -> F,
) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>>,
{
    if let Some(standby) = standby {
        match read(standby).await {
            Err(Error::Unavailable(_)) => {}
            answered => return answered,
        }
    }
    read(primary).await
}

/// Failures of the one-off start-up steps (create database, migrate, seed): shown to the
/// operator and ending the process, so a message is all they need to carry.
pub type StartupError = Box<dyn std::error::Error + Send + Sync>;

/// The contract's seed data, kept apart from the migrations: it is data, not schema, and a
/// production database is migrated but not seeded.
const SEED_SQL: &str = include_str!("../../sql/seed.sql");

/// Opens a single connection outside the pool, for the start-up steps.
pub async fn connect(target: &Target) -> Result<Client, StartupError> {
    let (client, connection) = target.config.connect(target.tls.clone()).await.map_err(|e| describe(&e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %describe(&e), "database connection closed");
        }
    });
    Ok(client)
}

/// Creates the database named in `config` if it does not exist, connecting to the server's
/// `postgres` database to do so. For `make run` and the tests; a production database is
/// created by its operator (or by the postgres image in docker-compose).
pub async fn create_database_if_missing(target: &Target) -> Result<(), StartupError> {
    let name = target.config.get_dbname().ok_or("DATABASE_URL names no database")?.to_owned();
    let mut admin = target.clone();
    admin.config.dbname("postgres");
    let admin = connect(&admin).await?;
    let exists = admin
        .query_typed_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[(&name, postgres_types::Type::TEXT)])
        .await?
        .is_some();
    if !exists {
        match admin.batch_execute(&format!("CREATE DATABASE {}", quote_identifier(&name))).await {
            Ok(()) => tracing::info!(database = %name, "database created"),
            // Another process created it between our check and our CREATE: just as good.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(describe(&e).into()),
        }
    }
    Ok(())
}

/// Loads the seed data; idempotent (see `sql/seed.sql`).
pub async fn seed(client: &mut Client) -> Result<(), StartupError> {
    let tx = client.transaction().await?;
    tx.batch_execute(SEED_SQL).await.map_err(|e| format!("seeding failed: {}", describe(&e)))?;
    tx.commit().await?;
    Ok(())
}

/// `"name"` with inner quotes doubled: a safe SQL identifier for any database name.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
