//! `GET /openapi.json`: the OpenAPI 3 document of the service, written by hand next to the
//! code it describes and embedded at build time. `tests/openapi.rs` keeps it true: every route
//! and method, every error code, and a schemathesis run against a live server.

use hyper::{StatusCode, header::HeaderValue};

use crate::http::response::{Reply, bytes_reply};

pub const DOCUMENT: &str = include_str!("openapi.json");

pub fn document() -> Reply {
    bytes_reply(StatusCode::OK, HeaderValue::from_static("application/json"), DOCUMENT)
}
