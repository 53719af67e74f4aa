//! The operators' webhook endpoints: `POST /api/webhooks`, `GET /api/webhooks[/{webhookId}]`,
//! `PATCH` and `DELETE /api/webhooks/{webhookId}`, `POST .../rotate-secret`,
//! `GET .../deliveries`, `POST .../replay`. Every one is an operator's (the route table checks
//! the credentials first). A secret is shown once: in the answer that made it.

use hyper::StatusCode;
use serde::Serialize;
use serde_json::Value;

use super::{
    AppState,
    reply::{Reply, json, no_content},
};
use crate::{
    db::{Endpoint, Position},
    domain::{NewWebhook, WebhookChange, WebhookUrl},
    error::Error,
    events::{guard::Guard, sign},
};

/// An endpoint with the secret it signs with: the answer that makes (or rotates) it.
#[derive(Serialize)]
struct WithSecret<'a> {
    #[serde(flatten)]
    endpoint: &'a Endpoint,
    secret: &'a str,
}

/// 201 with the endpoint and its secret. The URL's host must resolve to an address webhooks
/// may go to (see `events::guard`).
pub async fn create(state: &AppState, body: Value) -> Result<Reply, Error> {
    let hook = NewWebhook::parse(&body, state.config.webhook_allow_http)?;
    allowed_destination(state, &hook.url).await?;
    let secret = sign::new_secret().map_err(Error::Internal)?;
    let endpoint = state.db.create_webhook(&hook, &secret).await?;
    Ok(json(StatusCode::CREATED, &WithSecret { endpoint: &endpoint, secret: &secret }))
}

pub async fn list(state: &AppState) -> Result<Reply, Error> {
    Ok(json(StatusCode::OK, &state.db.webhooks().await?))
}

pub async fn get(state: &AppState, id: i64) -> Result<Reply, Error> {
    Ok(json(StatusCode::OK, &state.db.webhook(id).await?))
}

/// `{"url"?, "types"?, "enabled"?, "description"?}`: the endpoint as it is now. Enabling an
/// endpoint that was disabled resumes its deliveries where they stopped.
pub async fn change(state: &AppState, id: i64, body: Value) -> Result<Reply, Error> {
    let change = WebhookChange::parse(&body, state.config.webhook_allow_http)?;
    if let Some(url) = &change.url {
        allowed_destination(state, url).await?;
    }
    Ok(json(StatusCode::OK, &state.db.change_webhook(id, &change).await?))
}

/// 204; its deliveries and their attempts go with it.
pub async fn delete(state: &AppState, id: i64) -> Result<Reply, Error> {
    state.db.delete_webhook(id).await?;
    Ok(no_content())
}

/// A new secret, shown once; the old one keeps signing beside it until `previousSecretExpiresAt`.
pub async fn rotate_secret(state: &AppState, id: i64) -> Result<Reply, Error> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Rotated<'a> {
        id: i64,
        secret: &'a str,
        previous_secret_expires_at: String,
    }
    let secret = sign::new_secret().map_err(Error::Internal)?;
    let until = state.db.rotate_webhook_secret(id, &secret).await?;
    Ok(json(StatusCode::OK, &Rotated { id, secret: &secret, previous_secret_expires_at: until }))
}

/// Most attempts one page of `deliveries` lists, and how many when the caller does not say.
const MAX_ATTEMPTS_LISTED: i64 = 100;
const DEFAULT_ATTEMPTS_LISTED: i64 = 50;

/// The endpoint's delivery attempts, newest first (`before`: an attempt id, to page back).
pub async fn deliveries(
    state: &AppState,
    id: i64,
    limit: Option<String>,
    before: Option<String>,
) -> Result<Reply, Error> {
    let limit = match limit.as_deref() {
        None => DEFAULT_ATTEMPTS_LISTED,
        Some(text) => text.parse::<i64>().ok().filter(|n| (1..=MAX_ATTEMPTS_LISTED).contains(n)).ok_or_else(|| {
            Error::invalid(format!("limit must be an integer from 1 to {MAX_ATTEMPTS_LISTED}, got {text:?}"))
        })?,
    };
    let before = before
        .as_deref()
        .map(|text| {
            text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| Error::invalid("before must be an attempt id"))
        })
        .transpose()?;
    Ok(json(StatusCode::OK, &state.db.webhook_attempts(id, before, limit).await?))
}

/// `{"after": "<position>"}` (or `{}` for every event kept): the endpoint's events after it
/// are sent again, with their ids (a receiver that dedupes on `webhook-id` sees no
/// duplicate). 202 `{"queued": n}`.
pub async fn replay(state: &AppState, id: i64, body: Value) -> Result<Reply, Error> {
    let object = body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))?;
    let after = match object.get("after") {
        None | Some(Value::Null) => Position::default(),
        Some(Value::String(text)) => text.parse()?,
        Some(_) => return Err(Error::invalid("after must be a position the feed handed out")),
    };
    let queued = state.db.replay_webhook(id, after).await?;
    Ok(json(StatusCode::ACCEPTED, &serde_json::json!({"queued": queued})))
}

/// 400 unless webhooks may go to the URL's host (it is checked again at every delivery).
async fn allowed_destination(state: &AppState, url: &WebhookUrl) -> Result<(), Error> {
    let guard = Guard::new(&state.config.webhook_allowed_hosts);
    guard.addresses(&url.host, url.port).await.map(drop).map_err(|why| Error::invalid(format!("url refused: {why}")))
}
