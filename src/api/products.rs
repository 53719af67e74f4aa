//! `GET /api/products`, `GET /api/products/{productId}`, `POST /api/products/{productId}/restock`.

use hyper::{StatusCode, body::Bytes};
use serde_json::Value;

use super::{
    AppState, Listing, next_page_link,
    reply::{Reply, json, json_text},
};
use crate::{
    domain::{Page, parse_restock},
    error::Error,
};

/// Without `limit` or `after`: every product, ordered by id (the replaced service's shape, for
/// old clients), read together with the requests that ask at the same time. With either: one
/// keyset page, and a `Link: <...>; rel="next"` header when there may be more.
pub async fn list(state: &AppState, listing: Listing) -> Result<Reply, Error> {
    if listing.limit.is_none() && listing.after.is_none() {
        let catalogue = state.db.catalogue().await?;
        return Ok(json_text(StatusCode::OK, Bytes::from_owner(catalogue.json)));
    }
    let page = Page::parse(listing.limit.as_deref(), listing.after.as_deref())?;
    let products = state.db.products(page).await?;
    let last_id = products.last().map(|product| i64::from(product.id));
    let mut reply = json(StatusCode::OK, &products);
    next_page_link(&mut reply, "/api/products", &[], page, products.len(), last_id);
    Ok(reply)
}

pub async fn get(state: &AppState, product_id: i64) -> Result<Reply, Error> {
    Ok(json(StatusCode::OK, &state.db.product(product_id).await?))
}

/// Adds `{"quantity": N}` units to a product's stock (an operator's action, recorded in the
/// inventory ledger); answers with the product as it is now. The route table lets only
/// operators here.
pub async fn restock(state: &AppState, product_id: i64, body: Value) -> Result<Reply, Error> {
    let quantity = parse_restock(&body)?;
    Ok(json(StatusCode::OK, &state.db.restock(product_id, quantity).await?))
}
