//! Reading what a request carries: a JSON body (within limits) and its request id.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt, Limited};
use hyper::{Request, body::Incoming, header};
use serde_json::Value;

use crate::error::Error;

/// Largest request body accepted. An order of the maximum 100 lines is about 5 KB; the rest
/// is headroom, and the cap keeps a client from making the server buffer megabytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest `X-Request-Id` taken from a client; longer or odd ones are replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Reads the body as JSON: 415 unless it is declared `application/json`, 413 past
/// `MAX_BODY_BYTES` (checked on `Content-Length` before reading a byte, and again while
/// reading, for chunked bodies), 400 if it is not valid JSON.
pub async fn json_body(request: Request<Incoming>) -> Result<Value, Error> {
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !is_json_media_type(content_type) {
        return Err(Error::UnsupportedMediaType);
    }
    let declared_length =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(Error::PayloadTooLarge { limit: MAX_BODY_BYTES });
    }
    let bytes = match Limited::new(request.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::PayloadTooLarge { limit: MAX_BODY_BYTES });
        }
        Err(_) => return Err(Error::invalid("the request body could not be read")),
    };
    serde_json::from_slice(&bytes).map_err(|e| Error::invalid(format!("request body is not valid JSON: {e}")))
}

/// `application/json`, any case, with or without parameters such as `charset=utf-8`.
fn is_json_media_type(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    media_type.eq_ignore_ascii_case("application/json")
}

/// The client's `X-Request-Id` if it is sane (1 to 128 visible ASCII characters from a
/// conservative set), else a new one: unique within this process and, through the start
/// time and pid, very likely across replicas.
pub fn request_id(request: &Request<Incoming>) -> String {
    if let Some(id) = request.headers().get("x-request-id").and_then(|v| v.to_str().ok())
        && is_acceptable_request_id(id)
    {
        return id.to_owned();
    }
    generate_request_id()
}

fn is_acceptable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'='))
}

fn generate_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let started = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        format!("{:010x}{:06x}", started & 0xff_ffff_ffff, std::process::id() & 0xff_ffff)
    });
    format!("{prefix}-{:08x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The value of `name` in a URL query string (`a=1&b=2`), percent-decoded. `None` when the
/// parameter is absent; `Some(Err)` when it is present but not valid UTF-8 after decoding.
pub fn query_param(query: Option<&str>, name: &str) -> Option<Result<String, Error>> {
    let query = query?;
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key).ok()? == name).then(|| {
            percent_decode(value).map_err(|()| Error::invalid(format!("query parameter {name} is not valid UTF-8")))
        })
    })
}

fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(())?;
                let hex = std::str::from_utf8(hex).map_err(|_| ())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_decodes_query_parameters() {
        let query = Some("limit=10&status=shipped&name=a%20b+c&empty=");
        assert_eq!(query_param(query, "limit").unwrap().unwrap(), "10");
        assert_eq!(query_param(query, "name").unwrap().unwrap(), "a b c");
        assert_eq!(query_param(query, "empty").unwrap().unwrap(), "");
        assert!(query_param(query, "after").is_none());
        assert!(query_param(None, "limit").is_none());
        assert!(query_param(Some("x=%ff"), "x").unwrap().is_err());
        assert!(query_param(Some("x=%4"), "x").unwrap().is_err());
    }

    #[test]
    fn accepts_sane_request_ids_only() {
        assert!(is_acceptable_request_id("abc-123_DEF.4"));
        assert!(!is_acceptable_request_id(""));
        assert!(!is_acceptable_request_id("has space"));
        assert!(!is_acceptable_request_id(&"a".repeat(MAX_REQUEST_ID_LEN + 1)));
        assert_ne!(generate_request_id(), generate_request_id());
    }

    #[test]
    fn json_media_type_allows_parameters_and_case() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type("application/jsonx"));
        assert!(!is_json_media_type(""));
    }
}
