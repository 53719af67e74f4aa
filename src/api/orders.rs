//! `POST /api/orders`, `GET /api/orders`, `GET /api/orders/{orderId}`,
//! `PUT /api/orders/{orderId}/cancel`, `PUT /api/orders/{orderId}/status`.

use hyper::{StatusCode, header::HeaderValue};
use serde_json::{Value, json};

use super::{Listing, next_page_link};
use crate::{
    AppState,
    db::{
        self,
        idempotency::Claim,
        orders::{CreatedOrder, OrderFilter},
    },
    domain::{IdempotencyKey, NewOrder, OrderStatus, Page, parse_status_change, positive_int4},
    error::Error,
    http::response::{self, Reply, bytes_reply, json},
};

/// 201 `{"orderId","status":"processing","totalAmount"}`, or the reason the order was refused.
/// With an `Idempotency-Key`, the outcome is stored with the key in the order's transaction and
/// a retry gets it replayed byte for byte (see `db::idempotency`).
pub async fn create(state: &AppState, key: Option<IdempotencyKey>, body: Value) -> Result<Reply, Error> {
    let order = NewOrder::parse(&body)?;
    match key {
        None => {
            let outcome = db::orders::create(&state.pool, &order).await;
            state.metrics.record_order(outcome_label(&outcome));
            rendered(outcome)
        }
        Some(key) => create_once(state, &order, &key).await,
    }
}

/// The `orders_total` label of an outcome: "created" or the rejection's code.
fn outcome_label(outcome: &Result<CreatedOrder, Error>) -> &'static str {
    match outcome {
        Ok(_) => "created",
        Err(error) => error.code(),
    }
}

/// Header on a replayed response, so a client can tell a replay from a first answer.
const REPLAYED: &str = "idempotent-replayed";

async fn create_once(state: &AppState, order: &NewOrder, key: &IdempotencyKey) -> Result<Reply, Error> {
    let mut conn = state.pool.get().await?;
    let retention = state.config.idempotency_retention;
    match db::idempotency::claim(&mut conn, order.user_id, key, &order.fingerprint(), retention).await? {
        Claim::Replay { status, body } => {
            state.metrics.record_order("replayed");
            let status = StatusCode::from_u16(status).map_err(|e| Error::Internal(e.to_string()))?;
            let mut reply = bytes_reply(status, HeaderValue::from_static("application/json"), body);
            reply.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
            Ok(reply)
        }
        Claim::Claimed => {
            let outcome = db::orders::create_in_transaction(&mut conn, order).await;
            state.metrics.record_order(outcome_label(&outcome));
            // Outcomes a retry would get again are stored (the order, or its rejection while
            // the transaction is still open); failures worth retrying (5xx) are not: the
            // transaction rolls back, the key with it.
            let (status, body) = match &outcome {
                Ok(created) => (StatusCode::CREATED, serde_json::to_string(created)),
                Err(error) => (error.status(), serde_json::to_string(&error.body())),
            };
            let body = body.map_err(|e| Error::Internal(e.to_string()))?;
            if status.is_server_error() || !conn.in_transaction() {
                if conn.in_transaction() {
                    conn.rollback().await?;
                }
                return rendered(outcome);
            }
            db::idempotency::save(&mut conn, order.user_id, key, status.as_u16(), &body).await?;
            Ok(bytes_reply(status, HeaderValue::from_static("application/json"), body))
        }
    }
}

/// A created order as 201, a rejection as its error response.
fn rendered(outcome: Result<CreatedOrder, Error>) -> Result<Reply, Error> {
    match outcome {
        Ok(created) => Ok(json(StatusCode::CREATED, &created)),
        Err(error) if error.status().is_client_error() => Ok(response::error(&error)),
        Err(error) => Err(error),
    }
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
pub async fn list(state: &AppState, query: OrderQuery) -> Result<Reply, Error> {
    let user_id = match &query.user_id {
        None => None,
        Some(text) => Some(positive_int4(Some(&json_number(text)), "userId")?),
    };
    let status = match &query.status {
        None => None,
        Some(text) => Some(OrderStatus::parse(text).ok_or_else(|| {
            Error::invalid(format!("status must be one of processing, shipped, delivered, cancelled; got {text:?}"))
        })?),
    };
    let page = Page::parse(query.listing.limit.as_deref(), query.listing.after.as_deref())?;
    let orders = db::orders::list(&state.pool, OrderFilter { user_id, status }, page).await?;

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

/// A query-string value as the JSON number it spells, if it is a plain integer (so that
/// `positive_int4` applies the same rule to ids from queries and from bodies).
fn json_number(text: &str) -> Value {
    match text.parse::<i64>() {
        Ok(n) if text.bytes().all(|b| b.is_ascii_digit()) => Value::from(n),
        _ => Value::String(text.to_owned()),
    }
}

pub async fn get(state: &AppState, order_id: i64) -> Result<Reply, Error> {
    let order = db::orders::get(&state.pool, order_id).await?;
    Ok(json(StatusCode::OK, &order))
}

/// 200 `{"orderId","status":"cancelled"}`, also when the order was already cancelled.
pub async fn cancel(state: &AppState, order_id: i64) -> Result<Reply, Error> {
    db::orders::cancel(&state.pool, order_id).await?;
    Ok(status_reply(order_id, OrderStatus::Cancelled))
}

/// `PUT /api/orders/{orderId}/status` with `{"status": "shipped"}`: 200 `{"orderId","status"}`,
/// or 409 when the lifecycle does not allow the move.
pub async fn set_status(state: &AppState, order_id: i64, body: Value) -> Result<Reply, Error> {
    let target = parse_status_change(&body)?;
    db::orders::set_status(&state.pool, order_id, target).await?;
    Ok(status_reply(order_id, target))
}

fn status_reply(order_id: i64, status: OrderStatus) -> Reply {
    json(StatusCode::OK, &json!({"orderId": order_id, "status": status}))
}
