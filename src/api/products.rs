//! `GET /api/products`.

use hyper::StatusCode;

use crate::{
    AppState, db,
    error::Error,
    http::response::{Reply, json},
};

/// Every product, ordered by id.
pub async fn list(state: &AppState) -> Result<Reply, Error> {
    let products = db::products::list_all(&state.pool).await?;
    Ok(json(StatusCode::OK, &products))
}
