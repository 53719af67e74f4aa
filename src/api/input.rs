//! Reading what a request carries for a handler: a JSON body (within limits) and query
//! parameters.

use http_body_util::{BodyExt, Limited};
use hyper::{Request, body::Incoming, header};
use percent_encoding::percent_decode_str;
use serde_json::Value;

use crate::error::Error;

/// Largest request body accepted. An order of the maximum 100 lines is about 5 KB; the rest
/// is headroom, and the cap keeps a client from making the server buffer megabytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

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

/// `+` as a space, then `%XX` escapes; `Err` when the result is not UTF-8. An escape cut
/// short (`%4`) stays as it is, and fails the parse of the parameter that carries it.
fn percent_decode(text: &str) -> Result<String, ()> {
    let spaced = text.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8().map(|decoded| decoded.into_owned()).map_err(drop)
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
        // An escape cut short stays as it is; the parameter's own parse then refuses it.
        assert_eq!(query_param(Some("x=%4"), "x").unwrap().unwrap(), "%4");
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
