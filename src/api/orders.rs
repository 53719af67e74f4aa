//! `POST /api/orders`, `GET /api/orders/{orderId}`, `PUT /api/orders/{orderId}/cancel`.

use hyper::StatusCode;
use serde_json::{Value, json};

use crate::{
    AppState, db,
    domain::{NewOrder, OrderStatus},
    error::Error,
    http::response::{Reply, json},
};

/// 201 `{"orderId","status":"processing","totalAmount"}`, or the reason the order was refused.
pub async fn create(state: &AppState, body: Value) -> Result<Reply, Error> {
    let order = NewOrder::parse(&body)?;
    let outcome = db::orders::create(&state.pool, &order).await;
    match &outcome {
        Ok(_) => state.metrics.record_order("created"),
        Err(error) => state.metrics.record_order(error.code()),
    }
    Ok(json(StatusCode::CREATED, &outcome?))
}

pub async fn get(state: &AppState, order_id: i64) -> Result<Reply, Error> {
    let order = db::orders::get(&state.pool, order_id).await?;
    Ok(json(StatusCode::OK, &order))
}

/// 200 `{"orderId","status":"cancelled"}`, also when the order was already cancelled.
pub async fn cancel(state: &AppState, order_id: i64) -> Result<Reply, Error> {
    db::orders::cancel(&state.pool, order_id).await?;
    Ok(json(StatusCode::OK, &json!({"orderId": order_id, "status": OrderStatus::Cancelled})))
}
