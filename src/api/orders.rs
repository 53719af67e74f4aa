//! `POST /api/orders`, `GET /api/orders`, `GET /api/orders/{orderId}`,
//! `PUT /api/orders/{orderId}/cancel`, `PUT /api/orders/{orderId}/status`.

use std::time::Instant;

use hyper::{StatusCode, header::HeaderValue};
use serde_json::{Value, json};

use super::{
    AppState, Listing,
    access::Credentials,
    next_page_link,
    reply::{Reply, json, json_text},
};
use crate::{
    db::{OrderFilter, OrderRequest, Placed, Replay},
    domain::{IdempotencyKey, NewOrder, OrderStatus, Page, parse_status_change, positive_int4_in_query},
    error::Error,
    rate_limit::Key,
};

/// Header on a replayed response, so a client can tell a replay from a first answer.
const REPLAYED: &str = "idempotent-replayed";

/// 201 `{"orderId","status":"processing","totalAmount"}`, or the reason the order was refused.
/// With an `Idempotency-Key`, the outcome is stored with the key in the order's transaction and
/// a retry gets it replayed byte for byte: a created order's 201 is rendered again from the
/// order, exactly as here; a refusal is kept as `reply::stored_refusal` rendered it.
///
/// In jwt mode the order is the token's user's: `userId` may be left out, and another user's
/// id is 403 (an operator's token may order for anyone).
pub async fn create(
    state: &AppState,
    credentials: Credentials<'_>,
    key: Option<IdempotencyKey>,
    body: Value,
) -> Result<Reply, Error> {
    let caller = credentials.customer().await?;
    let order = NewOrder::parse(&body, caller.user_id)?;
    if caller.owner_filter().is_some_and(|own| own != order.user_id) {
        return Err(Error::Forbidden("an order may only be placed for the authenticated user"));
    }
    if let Some(limit) = &state.order_limit {
        let keys = [Key::User(order.user_id), Key::Address(credentials.address)];
        limit
            .take(&keys, Instant::now())
            .map_err(|wait| Error::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 })?;
    }
    let placed = state.db.place(OrderRequest { order, key }).await;
    state.metrics.record_order(match &placed {
        Ok(Placed::Created(_)) => "created",
        Ok(Placed::Replayed(_)) => "replayed",
        Err(error) => error.code(),
    });
    let mut reply = match placed? {
        Placed::Created(created) => return Ok(json(StatusCode::CREATED, &created)),
        Placed::Replayed(Replay::Created(created)) => json(StatusCode::CREATED, &created),
        Placed::Replayed(Replay::Answered(stored)) => {
            let status = StatusCode::from_u16(stored.status).map_err(|e| Error::Internal(e.to_string()))?;
            json_text(status, stored.body)
        }
    };
    reply.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    Ok(reply)
}

/// The raw filters of `GET /api/orders`.
#[derive(Debug, Default)]
pub struct OrderQuery {
    pub user_id: Option<String>,
    pub status: Option<String>,
    pub listing: Listing,
}

/// `GET /api/orders?userId=&status=&limit=&after=`: one keyset page of order summaries by id,
/// with a `Link` header to the next page when the page is full.
///
/// Without `userId`, every user's orders: an operator's listing (in jwt mode a customer gets
/// their own instead).
pub async fn list(state: &AppState, credentials: Credentials<'_>, query: OrderQuery) -> Result<Reply, Error> {
    let requested = query.user_id.as_deref().map(|text| positive_int4_in_query(text, "userId")).transpose()?;
    let user_id = credentials.order_listing(requested).await?;
    let status = match &query.status {
        None => None,
        Some(text) => Some(OrderStatus::parse(text).ok_or_else(|| {
            Error::invalid(format!("status must be one of processing, shipped, delivered, cancelled; got {text:?}"))
        })?),
    };
    let page = Page::parse(query.listing.limit.as_deref(), query.listing.after.as_deref())?;
    let orders = state.db.orders(OrderFilter { user_id, status }, page).await?;

    let mut filters = Vec::new();
    if let Some(user_id) = user_id {
        filters.push(("userId", user_id.to_string()));
    }
    if let Some(status) = status {
        filters.push(("status", status.to_string()));
    }
    let mut reply = json(StatusCode::OK, &orders);
    next_page_link(&mut reply, "/api/orders", &filters, page, orders.len(), orders.last().map(|o| o.order_id));
    Ok(reply)
}

/// The order with its lines; in jwt mode another user's order is 404, as if it did not exist.
pub async fn get(state: &AppState, credentials: Credentials<'_>, order_id: i64) -> Result<Reply, Error> {
    let owner = credentials.customer().await?.owner_filter();
    let order = state.db.order(order_id, owner).await?;
    Ok(json(StatusCode::OK, &order))
}

/// 200 `{"orderId","status":"cancelled"}`, also when the order was already cancelled; in jwt
/// mode another user's order is 404.
pub async fn cancel(state: &AppState, credentials: Credentials<'_>, order_id: i64) -> Result<Reply, Error> {
    let owner = credentials.customer().await?.owner_filter();
    state.db.cancel(order_id, owner).await?;
    Ok(status_reply(order_id, OrderStatus::Cancelled))
}

/// `PUT /api/orders/{orderId}/status` with `{"status": "shipped"}`: 200 `{"orderId","status"}`,
/// or 409 when the lifecycle does not allow the move. An operator's endpoint; a customer is
/// told 404 for another user's order (its existence is not revealed) and 403 for their own.
pub async fn set_status(
    state: &AppState,
    credentials: Credentials<'_>,
    order_id: i64,
    body: Value,
) -> Result<Reply, Error> {
    if let Err(refused) = credentials.operator().await {
        if let Ok(caller) = credentials.customer().await
            && let Some(own) = caller.owner_filter()
        {
            state.db.order(order_id, Some(own)).await?;
        }
        return Err(refused);
    }
    let target = parse_status_change(&body)?;
    state.db.set_status(order_id, target).await?;
    Ok(status_reply(order_id, target))
}

fn status_reply(order_id: i64, status: OrderStatus) -> Reply {
    json(StatusCode::OK, &json!({"orderId": order_id, "status": status}))
}
