//! Products: the catalogue and its stock.

use postgres_types::Type;
use serde::Serialize;
use tokio_postgres::{Row, error::SqlState};

use std::sync::Arc;

use super::{
    Pool, Sql,
    batch::{Batches, Job},
    events::{self, NOTIFY_EVENTS},
};
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

/// The whole catalogue as JSON (`[{"id","name","price","stock"}, ...]`, by id), read once for
/// every request that asked for it at the same time.
///
/// The catalogue is the hottest read of a shop, and each read costs a round trip to PostgreSQL
/// and back through the kernel, most of its price on a small machine. So requests are served in
/// batches (`db::batch`): those that arrive while the catalogue lane's reads are under way
/// share the next one. Each read is sent after every request it serves arrived, so a client
/// that has just placed an order sees the stock it took. (A cache would answer faster but from
/// the past; this never does.) It is serialized once per read, not once per request.
#[derive(Debug, Clone)]
pub struct Catalogue {
    pub json: Arc<[u8]>,
}

/// Reads of the whole catalogue, shared.
pub(super) type CatalogueReads = Batches<(), Catalogue>;

/// The most requests one catalogue read serves.
const MAX_SHARED_READ: usize = 1024;

/// Serves reads of the whole catalogue in shared batches, `slots` at a time, each read with
/// `read` (which picks the database).
pub(super) fn share_catalogue_reads<R, Read>(read: R, slots: usize) -> CatalogueReads
where
    R: Fn() -> Read + Send + Sync + 'static,
    Read: Future<Output = Result<Vec<Product>, Error>> + Send + 'static,
{
    Batches::start(MAX_SHARED_READ, slots, move |requests: Vec<Job<()>>| {
        let catalogue = read();
        async move {
            let shared = catalogue.await.and_then(|products| {
                let json = serde_json::to_vec(&products)
                    .map_err(|e| Error::Internal(format!("catalogue serialization failed: {e}")))?;
                Ok(Catalogue { json: json.into() })
            });
            requests.iter().map(|_| shared.clone()).collect()
        }
    })
}

/// The whole catalogue, by id.
pub(super) async fn list_all(pool: &Pool) -> Result<Vec<Product>, Error> {
    let rows = pool.get().await?.query(&LIST_ALL, &[]).await?;
    Ok(rows.iter().map(Product::from_row).collect())
}

/// One keyset page of the catalogue: ids after $1, at most $2 of them.
const LIST_PAGE: Sql = Sql {
    params: &[Type::INT4, Type::INT8],
    text: "SELECT id, name, price, stock FROM products WHERE id > $1 ORDER BY id LIMIT $2",
};

pub(super) async fn list_page(pool: &Pool, page: Page) -> Result<Vec<Product>, Error> {
    // Product ids are int4; an `after` beyond them simply finds nothing.
    let after = i32::try_from(page.after).unwrap_or(i32::MAX);
    let rows = pool.get().await?.query(&LIST_PAGE, &[&after, &page.limit]).await?;
    Ok(rows.iter().map(Product::from_row).collect())
}

const GET_PRODUCT: Sql =
    Sql { params: &[Type::INT4], text: "SELECT id, name, price, stock FROM products WHERE id = $1" };

pub(super) async fn get(pool: &Pool, product_id: i64) -> Result<Product, Error> {
    let missing = Error::ProductNotFound { product_id };
    let Ok(id) = i32::try_from(product_id) else { return Err(missing) };
    let rows = pool.get().await?.query(&GET_PRODUCT, &[&id]).await?;
    rows.first().map(Product::from_row).ok_or(missing)
}

/// Locks the product row first, so that RESTOCK and PRODUCT_EVENT, statements of their own
/// after it, read the product as this transaction holds it. $1 product id.
const LOCK_PRODUCT: Sql = Sql { params: &[Type::INT4], text: "SELECT 1 FROM products WHERE id = $1 FOR UPDATE" };

/// Adds stock to a product and records the movement in the ledger, in one statement: the
/// ledger row is written only if the product exists. An overflowing stock (beyond int4) fails
/// the whole statement. $1 product id, $2 quantity to add.
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

/// The product's `product.restocked` event, numbered after its last one, with the product as
/// it stands now. $1 product id (none written if it does not exist).
const PRODUCT_RESTOCKED: Sql = Sql {
    params: &[Type::INT4],
    text: "
    INSERT INTO events (type, product_id, sequence, data)
    SELECT 'product.restocked', p.id,
           (SELECT coalesce(max(e.sequence), 0) + 1 FROM events AS e WHERE e.product_id = p.id),
           product_json(p.id, p.name, p.price, p.stock)
    FROM products AS p
    WHERE p.id = $1
    RETURNING 1",
};

/// Restocks a product: one transaction of one round trip, with its event.
pub(super) async fn restock(pool: &Pool, product_id: i64, quantity: i32) -> Result<Product, Error> {
    let missing = Error::ProductNotFound { product_id };
    let Ok(id) = i32::try_from(product_id) else { return Err(missing) };
    let restocked = pool
        .get()
        .await?
        .transaction([
            (&LOCK_PRODUCT, &[&id]),
            (&RESTOCK, &[&id, &quantity]),
            (&PRODUCT_RESTOCKED, &[&id]),
            (&NOTIFY_EVENTS, &[]),
        ])
        .await;
    let [_, rows, event, _] = restocked.map_err(|e| {
        if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
            Error::invalid(format!("restocking {quantity} would take the stock past {}", i32::MAX))
        } else {
            Error::from(e)
        }
    })?;
    events::count_written("product.restocked", event.len() as u64);
    rows.first().map(Product::from_row).ok_or(missing)
}
