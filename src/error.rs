//! The one error type of the service, and the one table that maps it to HTTP.
//!
//! Client-caused failures are variants of their own, each carrying the fields that help the
//! client fix the request; everything the client cannot fix is either `Unavailable` (try
//! again later: 503 with `Retry-After`) or `Internal` (a bug: 500, detail logged, never sent).
//! Two tables, side by side: `Error::head` gives each variant's status, code and headers, and
//! `Error::body` its sentence and extra fields; `api::reply::error` renders both.

use hyper::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub enum Error {
    /// Malformed JSON, a wrong type, a missing field, an id or quantity that is not a positive
    /// integer, duplicate or too many lines, a bad query parameter or header.
    InvalidRequest(String),
    /// One line of an order asks for more than is in stock; the whole order is rejected.
    InsufficientStock {
        product_id: i32,
        requested: i32,
        available: i32,
    },
    /// A line of an order names a product that does not exist (the request is at fault: 400).
    OrderedProductNotFound {
        product_id: i32,
    },
    /// The order's user does not exist.
    UserNotFound {
        user_id: i32,
    },
    OrderNotFound {
        order_id: i64,
    },
    /// The webhook endpoint named in the path does not exist.
    WebhookNotFound {
        webhook_id: i64,
    },
    /// The product named in the path does not exist (the resource is missing: 404).
    ProductNotFound {
        product_id: i64,
    },
    /// No route has this path.
    RouteNotFound,
    /// The route exists but not with this method; `allow` lists its methods.
    MethodNotAllowed {
        allow: &'static str,
    },
    PayloadTooLarge {
        limit: usize,
    },
    /// A body that is not `application/json`.
    UnsupportedMediaType,
    /// The order has shipped or been delivered.
    OrderNotCancellable {
        order_id: i64,
        status: String,
    },
    /// The lifecycle does not allow this move from the order's current status.
    InvalidStatusTransition {
        order_id: i64,
        status: String,
        requested: String,
    },
    /// No credentials, or credentials that were refused (`token_rejected`: a token was sent
    /// and is not valid). Answered with `WWW-Authenticate: Bearer` (RFC 6750).
    Unauthorized {
        reason: &'static str,
        token_rejected: bool,
    },
    /// The caller is known but may not do this.
    Forbidden(&'static str),
    /// Too many orders from one user or one client address (`RATE_LIMIT_ORDERS_PER_MINUTE`).
    RateLimited {
        retry_after_secs: u64,
    },
    /// A request with this key is still running and did not finish while this one waited.
    IdempotencyInProgress,
    /// The key was used before with a different request.
    IdempotencyKeyReused,
    /// A feed position older than the events kept (`EVENT_RETENTION_DAYS`): events after it
    /// were purged, so reading on from it would skip them.
    CursorExpired,
    /// The database cannot be reached, no pooled connection came free in time, or the request
    /// ran past its deadline. The text says which and is safe to show. Promises that nothing
    /// was written: a retry is free (CONTRACT part 4).
    Unavailable(&'static str),
    /// A write was sent and the service cannot tell whether it stands: the connection broke
    /// after the COMMIT went out, or PostgreSQL committed without the synchronous replica's
    /// confirmation. A retry with the same Idempotency-Key finds out (CONTRACT part 4).
    /// `reason` is the client's sentence; `cause` goes to the request's log line only.
    OutcomeUnknown {
        reason: &'static str,
        cause: String,
    },
    /// Anything else. The detail is logged with the request id; the client sees a generic
    /// sentence.
    Internal(String),
}

/// How an error is answered: the status line and headers (`Error::head`) and the JSON body
/// (`Error::body`). Split in two so that the status and code, which every refused order reads
/// for its metric, cost no formatting.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub status: StatusCode,
    pub code: &'static str,
    /// `Retry-After` in seconds, when a retry may succeed.
    pub retry_after: Option<u64>,
    /// `Allow` (405): the route's methods.
    pub allow: Option<&'static str>,
    /// `WWW-Authenticate` (401), RFC 6750.
    pub challenge: Option<&'static str>,
}

/// The JSON body of every error response, in this field order.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: &'static str,
    /// Fields that help the client (`productId`, `available`, ...), after the two above.
    #[serde(flatten)]
    pub extra: Value,
}

/// Seconds a client should wait before retrying a 503 or a 409 in progress.
pub const RETRY_AFTER_SECS: u64 = 1;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidRequest(message.into())
    }

    /// The answer to a write that may or may not have committed (CONTRACT part 4): `reason` is
    /// what the client is told, `cause` what the log line says.
    pub fn outcome_unknown(reason: &'static str, cause: impl Into<String>) -> Error {
        Error::OutcomeUnknown { reason, cause: cause.into() }
    }

    /// A request abandoned past its deadline, its handler cut off half way (the database did
    /// not even answer a cancel): a read wrote nothing, but a write may have been sent, and
    /// committed, before the database went silent.
    pub fn cut_off(may_have_written: bool) -> Error {
        match may_have_written {
            false => Error::Unavailable("the request took too long; retry"),
            true => Error::outcome_unknown(
                "the database did not answer in time, so the write may or may not have been committed; \
                 retry with the same Idempotency-Key to find out",
                "the request was cut off at its deadline after its handler could have sent a write",
            ),
        }
    }

    /// The first table: status, code and headers of every variant, one line each.
    #[rustfmt::skip]
    pub fn head(&self) -> Head {
        use StatusCode as S;
        let (status, code) = match self {
            Error::InvalidRequest(_) => (S::BAD_REQUEST, "INVALID_REQUEST"),
            Error::InsufficientStock { .. } => (S::BAD_REQUEST, "INSUFFICIENT_STOCK"),
            Error::OrderedProductNotFound { .. } => (S::BAD_REQUEST, "PRODUCT_NOT_FOUND"),
            Error::UserNotFound { .. } => (S::BAD_REQUEST, "USER_NOT_FOUND"),
            Error::Unauthorized { .. } => (S::UNAUTHORIZED, "UNAUTHORIZED"),
            Error::Forbidden(_) => (S::FORBIDDEN, "FORBIDDEN"),
            Error::OrderNotFound { .. } => (S::NOT_FOUND, "ORDER_NOT_FOUND"),
            Error::ProductNotFound { .. } => (S::NOT_FOUND, "PRODUCT_NOT_FOUND"),
            Error::WebhookNotFound { .. } => (S::NOT_FOUND, "WEBHOOK_NOT_FOUND"),
            Error::RouteNotFound => (S::NOT_FOUND, "NOT_FOUND"),
            Error::MethodNotAllowed { .. } => (S::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            Error::PayloadTooLarge { .. } => (S::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            Error::UnsupportedMediaType => (S::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
            Error::OrderNotCancellable { .. } => (S::CONFLICT, "ORDER_NOT_CANCELLABLE"),
            Error::InvalidStatusTransition { .. } => (S::CONFLICT, "INVALID_STATUS_TRANSITION"),
            Error::IdempotencyInProgress => (S::CONFLICT, "IDEMPOTENCY_IN_PROGRESS"),
            Error::IdempotencyKeyReused => (S::UNPROCESSABLE_ENTITY, "IDEMPOTENCY_KEY_REUSED"),
            Error::CursorExpired => (S::GONE, "CURSOR_EXPIRED"),
            Error::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            Error::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE"),
            Error::Internal(_) => (S::INTERNAL_SERVER_ERROR, "INTERNAL"),
            Error::OutcomeUnknown { .. } => (S::GATEWAY_TIMEOUT, "OUTCOME_UNKNOWN"),
        };
        let retry_after = match self {
            Error::Unavailable(_) | Error::IdempotencyInProgress | Error::OutcomeUnknown { .. } => Some(RETRY_AFTER_SECS),
            Error::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        };
        let allow = match self {
            Error::MethodNotAllowed { allow } => Some(*allow),
            _ => None,
        };
        let challenge = match self {
            Error::Unauthorized { token_rejected: true, .. } => Some(r#"Bearer error="invalid_token""#),
            Error::Unauthorized { token_rejected: false, .. } => Some("Bearer"),
            _ => None,
        };
        Head { status, code, retry_after, allow, challenge }
    }

    /// The second table: the sentence and the helpful fields of every variant.
    #[rustfmt::skip]
    pub fn body(&self) -> ErrorBody {
        let (error, extra) = match self {
            Error::InvalidRequest(message) => (message.clone(), json!({})),
            Error::InsufficientStock { product_id, requested, available } => (
                format!("insufficient stock for product {product_id}: requested {requested}, available {available}"),
                json!({"productId": product_id, "requested": requested, "available": available})),
            Error::OrderedProductNotFound { product_id } =>
                (format!("product {product_id} does not exist"), json!({"productId": product_id})),
            Error::UserNotFound { user_id } => (format!("user {user_id} does not exist"), json!({"userId": user_id})),
            Error::Unauthorized { reason, .. } => ((*reason).to_owned(), json!({})),
            Error::Forbidden(reason) => ((*reason).to_owned(), json!({})),
            Error::OrderNotFound { order_id } =>
                (format!("order {order_id} does not exist"), json!({"orderId": order_id})),
            Error::ProductNotFound { product_id } =>
                (format!("product {product_id} does not exist"), json!({"productId": product_id})),
            Error::WebhookNotFound { webhook_id } =>
                (format!("webhook endpoint {webhook_id} does not exist"), json!({"webhookId": webhook_id})),
            Error::RouteNotFound => ("no such path".to_owned(), json!({})),
            Error::MethodNotAllowed { allow } =>
                (format!("method not allowed; this path allows {allow}"), json!({"allow": allow})),
            Error::PayloadTooLarge { limit } =>
                (format!("request body is larger than {limit} bytes"), json!({"limit": limit})),
            Error::UnsupportedMediaType =>
                ("request body must be JSON with Content-Type: application/json".to_owned(), json!({})),
            Error::OrderNotCancellable { order_id, status } => (
                format!("order {order_id} is {status} and can no longer be cancelled"),
                json!({"orderId": order_id, "status": status})),
            Error::InvalidStatusTransition { order_id, status, requested } => (
                format!("order {order_id} is {status} and cannot move to {requested}"),
                json!({"orderId": order_id, "status": status, "requested": requested})),
            Error::IdempotencyInProgress =>
                ("a request with this Idempotency-Key is still being processed; retry shortly".to_owned(), json!({})),
            Error::IdempotencyKeyReused =>
                ("this Idempotency-Key was already used with a different request".to_owned(), json!({})),
            Error::CursorExpired => ("this position is older than the events kept (EVENT_RETENTION_DAYS); \
                read from the start of the feed again".to_owned(), json!({})),
            Error::RateLimited { retry_after_secs } =>
                (format!("too many orders; retry in {retry_after_secs} s"), json!({"retryAfter": retry_after_secs})),
            Error::Unavailable(reason) => ((*reason).to_owned(), json!({})),
            Error::Internal(_) => ("internal error".to_owned(), json!({})),
            Error::OutcomeUnknown { reason, .. } => ((*reason).to_owned(), json!({})),
        };
        ErrorBody { error, code: self.head().code, extra }
    }

    pub fn status(&self) -> StatusCode {
        self.head().status
    }

    pub fn code(&self) -> &'static str {
        self.head().code
    }

    /// What to log beside the status: the hidden detail of a 500, the reason of a 503, and
    /// why the outcome of a write is unknown.
    pub fn log_detail(&self) -> Option<String> {
        match self {
            Error::Internal(detail) => Some(detail.clone()),
            Error::Unavailable(reason) => Some((*reason).to_owned()),
            Error::OutcomeUnknown { cause, .. } => Some(format!("outcome unknown: {cause}")),
            _ => None,
        }
    }
}

#[cfg(test)]
impl Error {
    /// One value of every variant, for tests that must cover every code.
    pub fn examples() -> Vec<Error> {
        vec![
            Error::InvalidRequest("x".into()),
            Error::InsufficientStock { product_id: 1, requested: 2, available: 1 },
            Error::OrderedProductNotFound { product_id: 1 },
            Error::UserNotFound { user_id: 1 },
            Error::OrderNotFound { order_id: 1 },
            Error::ProductNotFound { product_id: 1 },
            Error::WebhookNotFound { webhook_id: 1 },
            Error::RouteNotFound,
            Error::MethodNotAllowed { allow: "GET" },
            Error::PayloadTooLarge { limit: 1 },
            Error::UnsupportedMediaType,
            Error::OrderNotCancellable { order_id: 1, status: "shipped".into() },
            Error::InvalidStatusTransition { order_id: 1, status: "shipped".into(), requested: "processing".into() },
            Error::Unauthorized { reason: "x", token_rejected: true },
            Error::Forbidden("x"),
            Error::RateLimited { retry_after_secs: 3 },
            Error::IdempotencyInProgress,
            Error::IdempotencyKeyReused,
            Error::CursorExpired,
            Error::Unavailable("x"),
            Error::outcome_unknown("x", "cause"),
            Error::Internal("x".into()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the failures a client can do something about say more than "internal error".
    #[test]
    fn internal_details_never_reach_the_body() {
        let error = Error::Internal("SELECT secret FROM table".into());
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(serde_json::to_string(&error.body()).unwrap(), r#"{"error":"internal error","code":"INTERNAL"}"#);
    }

    /// Every variant answers a 4xx or 5xx whose body names its code, and only the retryable
    /// ones ask for a retry.
    #[test]
    fn every_variant_answers_an_error_status_with_its_code() {
        for error in Error::examples() {
            let head = error.head();
            assert!(head.status.is_client_error() || head.status.is_server_error(), "{error:?}");
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["code"], error.code(), "{error:?}");
            assert!(body["error"].as_str().is_some_and(|text| !text.is_empty()), "{error:?}");
            let may_retry = matches!(
                head.status,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
            ) || matches!(error, Error::IdempotencyInProgress);
            assert_eq!(head.retry_after.is_some(), may_retry, "{error:?}");
            assert_eq!(head.allow.is_some(), head.status == StatusCode::METHOD_NOT_ALLOWED, "{error:?}");
            assert_eq!(head.challenge.is_some(), head.status == StatusCode::UNAUTHORIZED, "{error:?}");
        }
    }
}
