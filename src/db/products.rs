//! Products: the catalogue and its stock.

use serde::Serialize;
use tokio_postgres::{Row, error::SqlState};

use super::{Pool, pool::Sql};
use crate::{domain::Page, error::Error, money::Money};
use postgres_types::Type;

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

pub async fn list_all(pool: &Pool) -> Result<Vec<Product>, Error> {
    let rows = pool.get().await?.query(&LIST_ALL, &[]).await?;
    Ok(rows.iter().map(Product::from_row).collect())
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
    let missing = Error::NoSuchProduct { product_id };
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
    let missing = Error::NoSuchProduct { product_id };
    let Ok(id) = i32::try_from(product_id) else { return Err(missing) };
    let rows = pool.get().await?.query(&RESTOCK, &[&id, &quantity]).await.map_err(|e| {
        if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
            Error::invalid(format!("restocking {quantity} would take the stock past {}", i32::MAX))
        } else {
            Error::from(e)
        }
    })?;
    rows.first().map(Product::from_row).ok_or(missing)
}
