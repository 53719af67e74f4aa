//! Building responses: JSON bodies, and errors rendered from `Error` in one place.

use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use serde::Serialize;

use crate::error::{Error, RETRY_AFTER_SECS};

pub type Reply = Response<Full<Bytes>>;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
    match serde_json::to_vec(body) {
        Ok(bytes) => json_bytes(status, bytes.into()),
        Err(e) => error(&Error::Internal(format!("response serialization failed: {e}"))),
    }
}

/// A body that is JSON already.
pub fn json_bytes(status: StatusCode, body: Bytes) -> Reply {
    bytes_reply(status, JSON, body)
}

pub fn bytes_reply(status: StatusCode, content_type: HeaderValue, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, content_type);
    response
}

/// The response for an error: its status, `{"error","code",...}`, and the headers the status
/// calls for (`Allow` on 405, `Retry-After` on 503).
pub fn error(error: &Error) -> Reply {
    let mut response = json(error.status(), &error.body());
    let headers = response.headers_mut();
    match error {
        Error::MethodNotAllowed { allow } => {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        Error::Unavailable(_) | Error::IdempotencyInProgress => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        _ => {}
    }
    response
}
