//! Building responses: JSON bodies, and errors rendered from `Error::head` and `Error::body`
//! in one place.

use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use serde::Serialize;

use crate::{
    db::StoredAnswer,
    error::{Error, RETRY_AFTER_SECS},
};

pub type Reply = Response<Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// `body` serialized as the JSON body of a `status` response.
pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
    match serde_json::to_vec(body) {
        Ok(bytes) => json_text(status, bytes),
        Err(e) => error(&Error::Internal(format!("response serialization failed: {e}"))),
    }
}

/// A body that is JSON already.
pub fn json_text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    with_content_type(status, JSON, body)
}

pub fn with_content_type(status: StatusCode, content_type: HeaderValue, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

/// 204, no body.
pub fn no_content() -> Reply {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

/// Asks the client to wait `RETRY_AFTER_SECS` before trying again.
pub fn retry_after(reply: Reply) -> Reply {
    retry_after_secs(reply, RETRY_AFTER_SECS)
}

fn retry_after_secs(mut reply: Reply, seconds: u64) -> Reply {
    reply.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    reply
}

/// The response for an error: its status and headers from `Error::head`, its body from
/// `Error::body`.
pub fn error(error: &Error) -> Reply {
    let head = error.head();
    let mut reply = json(head.status, &error.body());
    if let Some(allow) = head.allow {
        reply.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(challenge) = head.challenge {
        reply.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    match head.retry_after {
        Some(seconds) => retry_after_secs(reply, seconds),
        None => reply,
    }
}

/// A refused order's answer as an idempotency key keeps it: the status and the very bytes
/// `error` renders, so that a replay is byte for byte the first answer.
pub fn stored_refusal(refusal: &Error) -> StoredAnswer {
    let body = serde_json::to_string(&refusal.body())
        .unwrap_or_else(|_| String::from(r#"{"error":"internal error","code":"INTERNAL"}"#));
    StoredAnswer { status: refusal.status().as_u16(), body }
}
