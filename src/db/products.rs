//! Products: the catalogue and its stock.

use std::sync::Mutex;

use postgres_types::Type;
use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::{Row, error::SqlState};

use super::{Pool, Sql};
use crate::{domain::Page, error::Error, money::Money};

#[derive(Debug, Serialize)]
pub struct Product {
    pub id: i32,
    pub name: String,
    pub price: Money,
    pub stock: i32,
}

impl Product {
    fn from_row(row: &Row) -> Product {
        Product { id: row.get(0), name: row.get(1), price: row.get(2), stock: row.get(3) }
    }
}

/// The whole catalogue, by id. A plain read: no lock, one snapshot.
const LIST_ALL: Sql = Sql { params: &[], text: "SELECT id, name, price, stock FROM products ORDER BY id" };

/// Reads of the whole catalogue, shared between requests that ask for it at the same time.
///
/// The catalogue is the hottest read of a shop, and each read costs a round trip to PostgreSQL
/// and back through the kernel, most of its price on a small machine. So a request that comes
/// while another one's read is still waiting for a connection joins that read instead of making
/// its own. The batch closes when its leader has a connection, just before the query is sent:
/// every answer therefore comes from a snapshot taken after its request arrived, and a client
/// that has just placed an order sees the stock it took. (A cache would answer faster but from
/// the past; this never does.)
///
/// What is shared is `T`, the catalogue as the caller renders it (the API shares its JSON
/// body), so that the rendering too is done once per batch, not once per request.
pub struct CatalogueReads<T> {
    /// The batch still open for joining, if any: a receiver of its outcome.
    open_batch: Mutex<Option<watch::Receiver<Option<BatchOutcome<T>>>>>,
}

/// What a batch's read gave: the rendered catalogue, or why there is none (an
/// `Error::Unavailable` reason, or `None` for any other failure, which the leader's request
/// logs).
type BatchOutcome<T> = Result<T, Option<&'static str>>;

impl<T> Default for CatalogueReads<T> {
    fn default() -> Self {
        CatalogueReads { open_batch: Mutex::new(None) }
    }
}

impl<T: Clone> CatalogueReads<T> {
    /// The whole catalogue, by id, rendered by `render`.
    pub async fn read(&self, pool: &Pool, render: fn(&[Product]) -> Result<T, Error>) -> Result<T, Error> {
        let joined = {
            let mut open_batch = self.open_batch.lock().unwrap();
            match &*open_batch {
                Some(outcome) => Err(outcome.clone()),
                None => {
                    let (sender, outcome) = watch::channel(None);
                    *open_batch = Some(outcome);
                    Ok(sender)
                }
            }
        };
        match joined {
            Ok(sender) => self.lead(pool, render, sender).await,
            Err(mut outcome) => {
                let shared = outcome.wait_for(Option::is_some).await.ok().and_then(|outcome| outcome.clone());
                match shared {
                    Some(Ok(catalogue)) => Ok(catalogue),
                    Some(Err(Some(reason))) => Err(Error::Unavailable(reason)),
                    Some(Err(None)) => Err(Error::Internal("the shared catalogue read failed".into())),
                    // The leader was dropped before answering: read alone.
                    None => render(&list_all(pool.get().await?.query(&LIST_ALL, &[]).await?)),
                }
            }
        }
    }

    /// Gets a connection, closes the batch, reads, and tells everyone who joined.
    async fn lead(
        &self,
        pool: &Pool,
        render: fn(&[Product]) -> Result<T, Error>,
        sender: watch::Sender<Option<BatchOutcome<T>>>,
    ) -> Result<T, Error> {
        // Closes the batch however this ends, even if the request is dropped while waiting.
        struct CloseBatch<'a, T>(&'a CatalogueReads<T>);
        impl<T> Drop for CloseBatch<'_, T> {
            fn drop(&mut self) {
                self.0.open_batch.lock().unwrap().take();
            }
        }
        let close = CloseBatch(self);
        let conn = pool.get().await;
        drop(close);
        let result = match conn {
            Ok(mut conn) => {
                conn.query(&LIST_ALL, &[]).await.map_err(Error::from).and_then(|rows| render(&list_all(rows)))
            }
            Err(e) => Err(e),
        };
        let shared = match &result {
            Ok(catalogue) => Ok(catalogue.clone()),
            Err(Error::Unavailable(reason)) => Err(Some(*reason)),
            Err(_) => Err(None),
        };
        let _ = sender.send(Some(shared));
        result
    }
}

fn list_all(rows: Vec<Row>) -> Vec<Product> {
    rows.iter().map(Product::from_row).collect()
}

/// One keyset page of the catalogue: ids after $1, at most $2 of them.
const LIST_PAGE: Sql = Sql {
    params: &[Type::INT4, Type::INT8],
    text: "SELECT id, name, price, stock FROM products WHERE id > $1 ORDER BY id LIMIT $2",
};

pub async fn list_page(pool: &Pool, page: Page) -> Result<Vec<Product>, Error> {
    // Product ids are int4; an `after` beyond them simply finds nothing.
    let after = i32::try_from(page.after).unwrap_or(i32::MAX);
    let rows = pool.get().await?.query(&LIST_PAGE, &[&after, &page.limit]).await?;
    Ok(rows.iter().map(Product::from_row).collect())
}

const GET_PRODUCT: Sql =
    Sql { params: &[Type::INT4], text: "SELECT id, name, price, stock FROM products WHERE id = $1" };

pub async fn get(pool: &Pool, product_id: i64) -> Result<Product, Error> {
    let missing = Error::ProductNotFound { product_id };
    let Ok(id) = i32::try_from(product_id) else { return Err(missing) };
    let rows = pool.get().await?.query(&GET_PRODUCT, &[&id]).await?;
    rows.first().map(Product::from_row).ok_or(missing)
}

/// Adds stock to a product and records the movement in the ledger, in one statement (so one
/// transaction): the UPDATE locks the product row, and the ledger row is written only if the
/// product exists. An overflowing stock (beyond int4) fails the whole statement.
/// $1 product id, $2 quantity to add.
const RESTOCK: Sql = Sql {
    params: &[Type::INT4, Type::INT4],
    text: "
    WITH restocked AS (
        UPDATE products SET stock = stock + $2 WHERE id = $1
        RETURNING id, name, price, stock
    ),
    ledger AS (
        INSERT INTO inventory_movements (product_id, delta, reason)
        SELECT id, $2, 'restock' FROM restocked
    )
    SELECT id, name, price, stock FROM restocked",
};

pub async fn restock(pool: &Pool, product_id: i64, quantity: i32) -> Result<Product, Error> {
    let missing = Error::ProductNotFound { product_id };
    let Ok(id) = i32::try_from(product_id) else { return Err(missing) };
    let rows = pool.get().await?.write(&RESTOCK, &[&id, &quantity]).await.map_err(|e| {
        if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
            Error::invalid(format!("restocking {quantity} would take the stock past {}", i32::MAX))
        } else {
            Error::from(e)
        }
    })?;
    rows.first().map(Product::from_row).ok_or(missing)
}
