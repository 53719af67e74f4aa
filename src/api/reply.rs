//! Building responses: JSON bodies, and errors rendered from `Error::answer` in one place.

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

/// Asks the client to wait `RETRY_AFTER_SECS` before trying again.
pub fn retry_after(reply: Reply) -> Reply {
    retry_after_secs(reply, RETRY_AFTER_SECS)
}

fn retry_after_secs(mut reply: Reply, seconds: u64) -> Reply {
    reply.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    reply
}

/// The response for an error: its status, `{"error","code",...}`, and the headers the answer
/// calls for (`Allow` on 405, `WWW-Authenticate` on 401, `Retry-After` when a retry may
/// succeed).
pub fn error(error: &Error) -> Reply {
    let answer = error.answer();
    let mut reply = json(answer.status, &answer.body);
    match error {
        Error::MethodNotAllowed { allow } => {
            reply.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        Error::Unauthorized { token_rejected, .. } => {
            let challenge = if *token_rejected { r#"Bearer error="invalid_token""# } else { "Bearer" };
            reply.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        _ => {}
    }
    match answer.retry_after {
        Some(seconds) => retry_after_secs(reply, seconds),
        None => reply,
    }
}
