//! The one error type of the service, and the one place that maps it to HTTP.
//!
//! Client-caused failures are variants of their own, each carrying the fields that help the
//! client fix the request; everything the client cannot fix is either `Unavailable` (try
//! again later: 503 with `Retry-After`) or `Internal` (a bug: 500, detail logged, never sent).

use hyper::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Debug)]
pub enum Error {
    /// 400 `INVALID_REQUEST`: malformed JSON, a wrong type, a missing field, an id or quantity
    /// that is not a positive integer, duplicate or too many lines, a bad query parameter.
    InvalidRequest(String),
    /// 400 `INSUFFICIENT_STOCK`: one line asks for more than is in stock; the whole order is
    /// rejected.
    InsufficientStock { product_id: i32, requested: i32, available: i32 },
    /// 400 `PRODUCT_NOT_FOUND`: an order line names a product that does not exist.
    ProductNotFound { product_id: i32 },
    /// 400 `USER_NOT_FOUND`: the order's user does not exist.
    UserNotFound { user_id: i32 },
    /// 404 `ORDER_NOT_FOUND`.
    OrderNotFound { order_id: i64 },
    /// 404 `PRODUCT_NOT_FOUND`: the product named in the path does not exist.
    NoSuchProduct { product_id: i64 },
    /// 404 `NOT_FOUND`: no route has this path.
    RouteNotFound,
    /// 405 `METHOD_NOT_ALLOWED`, with the route's methods in `Allow`.
    MethodNotAllowed { allow: &'static str },
    /// 413 `PAYLOAD_TOO_LARGE`.
    PayloadTooLarge { limit: usize },
    /// 415 `UNSUPPORTED_MEDIA_TYPE`: a body that is not `application/json`.
    UnsupportedMediaType,
    /// 409 `ORDER_NOT_CANCELLABLE`: the order has shipped or been delivered.
    OrderNotCancellable { order_id: i64, status: String },
    /// 409 `INVALID_STATUS_TRANSITION`: the lifecycle does not allow this move from the
    /// order's current status.
    InvalidStatusTransition { order_id: i64, status: String, requested: String },
    /// 409 `IDEMPOTENCY_IN_PROGRESS`: a request with this key is still running and did not
    /// finish while this one waited for it.
    IdempotencyInProgress,
    /// 422 `IDEMPOTENCY_KEY_REUSED`: the key was used before with a different request.
    IdempotencyKeyReused,
    /// 503 `SERVICE_UNAVAILABLE` with `Retry-After`: the database cannot be reached, no pooled
    /// connection came free in time, or the request ran past its deadline. The text says which
    /// and is safe to show.
    Unavailable(&'static str),
    /// 500 `INTERNAL`: anything else. The detail is logged with the request id; the client
    /// sees a generic sentence.
    Internal(String),
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

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;

impl Error {
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidRequest(message.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest(_)
            | Error::InsufficientStock { .. }
            | Error::ProductNotFound { .. }
            | Error::UserNotFound { .. } => StatusCode::BAD_REQUEST,
            Error::OrderNotFound { .. } | Error::NoSuchProduct { .. } | Error::RouteNotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::OrderNotCancellable { .. }
            | Error::InvalidStatusTransition { .. }
            | Error::IdempotencyInProgress => StatusCode::CONFLICT,
            Error::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "INVALID_REQUEST",
            Error::InsufficientStock { .. } => "INSUFFICIENT_STOCK",
            Error::ProductNotFound { .. } | Error::NoSuchProduct { .. } => "PRODUCT_NOT_FOUND",
            Error::UserNotFound { .. } => "USER_NOT_FOUND",
            Error::OrderNotFound { .. } => "ORDER_NOT_FOUND",
            Error::RouteNotFound => "NOT_FOUND",
            Error::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Error::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Error::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Error::OrderNotCancellable { .. } => "ORDER_NOT_CANCELLABLE",
            Error::InvalidStatusTransition { .. } => "INVALID_STATUS_TRANSITION",
            Error::IdempotencyInProgress => "IDEMPOTENCY_IN_PROGRESS",
            Error::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Error::Unavailable(_) => "SERVICE_UNAVAILABLE",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// `{"error": <sentence>, "code": <CODE>, ...fields that help}`.
    pub fn body(&self) -> ErrorBody {
        let (message, extra) = match self {
            Error::InvalidRequest(message) => (message.clone(), json!({})),
            Error::InsufficientStock { product_id, requested, available } => (
                format!("insufficient stock for product {product_id}: requested {requested}, available {available}"),
                json!({"productId": product_id, "requested": requested, "available": available}),
            ),
            Error::ProductNotFound { product_id } => {
                (format!("product {product_id} does not exist"), json!({"productId": product_id}))
            }
            Error::UserNotFound { user_id } => (format!("user {user_id} does not exist"), json!({"userId": user_id})),
            Error::OrderNotFound { order_id } => {
                (format!("order {order_id} does not exist"), json!({"orderId": order_id}))
            }
            Error::NoSuchProduct { product_id } => {
                (format!("product {product_id} does not exist"), json!({"productId": product_id}))
            }
            Error::RouteNotFound => ("no such path".to_owned(), json!({})),
            Error::MethodNotAllowed { allow } => {
                (format!("method not allowed; this path allows {allow}"), json!({"allow": allow}))
            }
            Error::PayloadTooLarge { limit } => {
                (format!("request body is larger than {limit} bytes"), json!({"limit": limit}))
            }
            Error::UnsupportedMediaType => {
                ("request body must be JSON with Content-Type: application/json".to_owned(), json!({}))
            }
            Error::OrderNotCancellable { order_id, status } => (
                format!("order {order_id} is {status} and can no longer be cancelled"),
                json!({"orderId": order_id, "status": status}),
            ),
            Error::InvalidStatusTransition { order_id, status, requested } => (
                format!("order {order_id} is {status} and cannot move to {requested}"),
                json!({"orderId": order_id, "status": status, "requested": requested}),
            ),
            Error::IdempotencyInProgress => {
                ("a request with this Idempotency-Key is still being processed; retry shortly".to_owned(), json!({}))
            }
            Error::IdempotencyKeyReused => {
                ("this Idempotency-Key was already used with a different request".to_owned(), json!({}))
            }
            Error::Unavailable(reason) => ((*reason).to_owned(), json!({})),
            Error::Internal(_) => ("internal error".to_owned(), json!({})),
        };
        ErrorBody { error: message, code: self.code(), extra }
    }

    /// What to log beside the status: the hidden detail of a 500.
    pub fn log_detail(&self) -> Option<&str> {
        match self {
            Error::Internal(detail) => Some(detail),
            Error::Unavailable(reason) => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
impl Error {
    /// One value of every variant, for tests that must cover them all (the `match` below
    /// stops compiling when a variant is added and not listed).
    pub fn examples() -> Vec<Error> {
        let all = vec![
            Error::InvalidRequest("x".into()),
            Error::InsufficientStock { product_id: 1, requested: 2, available: 1 },
            Error::ProductNotFound { product_id: 1 },
            Error::UserNotFound { user_id: 1 },
            Error::OrderNotFound { order_id: 1 },
            Error::NoSuchProduct { product_id: 1 },
            Error::RouteNotFound,
            Error::MethodNotAllowed { allow: "GET" },
            Error::PayloadTooLarge { limit: 1 },
            Error::UnsupportedMediaType,
            Error::OrderNotCancellable { order_id: 1, status: "shipped".into() },
            Error::InvalidStatusTransition { order_id: 1, status: "shipped".into(), requested: "processing".into() },
            Error::IdempotencyInProgress,
            Error::IdempotencyKeyReused,
            Error::Unavailable("x"),
            Error::Internal("x".into()),
        ];
        for error in &all {
            match error {
                Error::InvalidRequest(_)
                | Error::InsufficientStock { .. }
                | Error::ProductNotFound { .. }
                | Error::UserNotFound { .. }
                | Error::OrderNotFound { .. }
                | Error::NoSuchProduct { .. }
                | Error::RouteNotFound
                | Error::MethodNotAllowed { .. }
                | Error::PayloadTooLarge { .. }
                | Error::UnsupportedMediaType
                | Error::OrderNotCancellable { .. }
                | Error::InvalidStatusTransition { .. }
                | Error::IdempotencyInProgress
                | Error::IdempotencyKeyReused
                | Error::Unavailable(_)
                | Error::Internal(_) => {}
            }
        }
        all
    }
}

/// A database error is the client's fault only in the cases a caller maps explicitly; here
/// the rest splits into "try again" (the database is away, busy or timed out) and bugs.
impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Error {
        use tokio_postgres::error::SqlState;
        if error.is_closed() {
            return Error::Unavailable("the database connection was lost; retry");
        }
        let Some(code) = error.code() else {
            // No SQLSTATE: an I/O or protocol failure on the connection.
            return Error::Unavailable("the database cannot be reached; retry");
        };
        if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE {
            Error::Unavailable("the database did not answer in time; retry")
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED {
            Error::Unavailable("the database was busy; retry")
        } else if code.code().starts_with("08")
            || code.code().starts_with("57P")
            || *code == SqlState::TOO_MANY_CONNECTIONS
        {
            // 08xxx connection exceptions, 57P0x shutdown / cannot connect now.
            Error::Unavailable("the database cannot be reached; retry")
        } else {
            Error::Internal(format!("database error: {}", crate::db::describe(&error)))
        }
    }
}
