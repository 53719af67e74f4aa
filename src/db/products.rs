//! Products: the catalogue and its stock.

use serde::Serialize;

use super::Pool;
use crate::{error::Error, money::Money};

#[derive(Debug, Serialize)]
pub struct Product {
    pub id: i32,
    pub name: String,
    pub price: Money,
    pub stock: i32,
}

/// The whole catalogue, by id. A plain read: no lock, one snapshot.
const LIST_ALL: &str = "SELECT id, name, price, stock FROM products ORDER BY id";

pub async fn list_all(pool: &Pool) -> Result<Vec<Product>, Error> {
    let rows = pool.get().await?.query(LIST_ALL, &[]).await?;
    Ok(rows
        .iter()
        .map(|row| Product { id: row.get(0), name: row.get(1), price: row.get(2), stock: row.get(3) })
        .collect())
}
