//! `GET /api/products`, `GET /api/products/{productId}`, `POST /api/products/{productId}/restock`.

use hyper::{StatusCode, body::Bytes};
use serde_json::Value;

use super::{
    AppState, Listing, next_page_link,
    reply::{Reply, json, json_text},
};
use crate::{
    db::{self, Pool, products::Product},
    domain::{Page, parse_restock},
    error::Error,
};

/// The shared reads of the whole catalogue (`db::products::CatalogueReads`) share its JSON
/// body: serialized once per batch of requests, not once per request.
pub type CatalogueReads = db::products::CatalogueReads<Bytes>;

/// Starts serving the whole catalogue in shared reads, from the standby when there is one.
pub fn share_catalogue_reads(pool: Pool, read_pool: Option<Pool>) -> CatalogueReads {
    let read = move || {
        let (pool, read_pool) = (pool.clone(), read_pool.clone());
        async move { on_catalogue_pool(read_pool.as_ref(), &pool, db::products::list_all).await }
    };
    db::products::share_catalogue_reads(read, catalogue_json)
}

/// Without `limit` or `after`: every product, ordered by id (the replaced service's shape, for
/// old clients). With either: one keyset page, and a `Link: <...>; rel="next"` header when
/// there may be more.
pub async fn list(state: &AppState, listing: Listing) -> Result<Reply, Error> {
    if listing.limit.is_none() && listing.after.is_none() {
        let body = state.catalogue.submit(()).await?;
        return Ok(json_text(StatusCode::OK, body));
    }
    let page = Page::parse(listing.limit.as_deref(), listing.after.as_deref())?;
    let products =
        on_catalogue_pool(state.read_pool.as_ref(), &state.pool, |pool| db::products::list_page(pool, page)).await?;
    let last_id = products.last().map(|product| i64::from(product.id));
    let mut reply = json(StatusCode::OK, &products);
    next_page_link(&mut reply, "/api/products", &[], page, products.len(), last_id);
    Ok(reply)
}

pub async fn get(state: &AppState, product_id: i64) -> Result<Reply, Error> {
    let product =
        on_catalogue_pool(state.read_pool.as_ref(), &state.pool, |pool| db::products::get(pool, product_id)).await?;
    Ok(json(StatusCode::OK, &product))
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

/// Adds `{"quantity": N}` units to a product's stock (an operator's action, recorded in the
/// inventory ledger); answers with the product as it is now. The route table lets only
/// operators here.
pub async fn restock(state: &AppState, product_id: i64, body: Value) -> Result<Reply, Error> {
    let quantity = parse_restock(&body)?;
    Ok(json(StatusCode::OK, &db::products::restock(&state.pool, product_id, quantity).await?))
}

fn catalogue_json(products: &[Product]) -> Result<Bytes, Error> {
    serde_json::to_vec(products)
        .map(Bytes::from)
        .map_err(|e| Error::Internal(format!("catalogue serialization failed: {e}")))
}
