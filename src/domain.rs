//! The typed values the service works with, parsed at the edge: once a request body has
//! become a `NewOrder`, every id and quantity in it is known to be a positive `int4`, the
//! lines are few and name distinct products, and no later code checks any of that again.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::error::Error;

/// Most lines one order may have: an order is a basket, not a bulk import, and the bound keeps
/// the time an order holds its product locks short.
pub const MAX_ORDER_LINES: usize = 100;

/// A validated `POST /api/orders` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub user_id: i32,
    /// In the order the client sent them; product ids are distinct.
    pub lines: Vec<OrderLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderLine {
    pub product_id: i32,
    pub quantity: i32,
}

impl NewOrder {
    /// `{"userId": 1, "items": [{"productId": 1, "quantity": 1}, ...]}`. Unknown fields are
    /// ignored, as the replaced service did; every known one is checked, with an error that
    /// names the field and what it must be.
    pub fn parse(body: &Value) -> Result<NewOrder, Error> {
        let object = body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))?;
        let user_id = positive_int4(object.get("userId"), "userId")?;
        let items = match object.get("items") {
            None | Some(Value::Null) => return Err(Error::invalid("items is required")),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(Error::invalid("items must be an array")),
        };
        if items.is_empty() {
            return Err(Error::invalid("items must contain at least one line"));
        }
        if items.len() > MAX_ORDER_LINES {
            return Err(Error::invalid(format!("an order has at most {MAX_ORDER_LINES} lines")));
        }

        let mut lines: Vec<OrderLine> = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let item = item.as_object().ok_or_else(|| Error::invalid(format!("items[{index}] must be an object")))?;
            let product_id = positive_int4(item.get("productId"), &format!("items[{index}].productId"))?;
            let quantity = positive_int4(item.get("quantity"), &format!("items[{index}].quantity"))?;
            if lines.iter().any(|line| line.product_id == product_id) {
                return Err(Error::invalid(format!(
                    "items[{index}]: product {product_id} appears in more than one line; put its whole quantity in one line"
                )));
            }
            lines.push(OrderLine { product_id, quantity });
        }
        Ok(NewOrder { user_id, lines })
    }
}

/// A JSON integer from 1 to 2147483647 (PostgreSQL `int4`). `1.0`, `"1"`, `true` and
/// anything larger are refused rather than coerced: a client sending them has a bug.
pub fn positive_int4(value: Option<&Value>, field: &str) -> Result<i32, Error> {
    let value = match value {
        None | Some(Value::Null) => return Err(Error::invalid(format!("{field} is required"))),
        Some(value) => value,
    };
    value
        .as_i64()
        .and_then(|n| i32::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| Error::invalid(format!("{field} must be a positive integer no larger than {}", i32::MAX)))
}

impl NewOrder {
    /// The request in a canonical text form: same user and lines, same fingerprint, whatever
    /// the JSON's spacing, key order or ignored fields. Stored (hashed) with an idempotency key
    /// to tell a retry from a different request reusing the key.
    pub fn fingerprint(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|l| format!("{}x{}", l.product_id, l.quantity)).collect();
        format!("user={};lines={}", self.user_id, lines.join(","))
    }
}

/// Longest `Idempotency-Key` accepted: room for a UUID or a client's own scheme, bounded so a
/// key cannot be used to store arbitrary data.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// A validated `Idempotency-Key` header: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(header: &[u8]) -> Result<IdempotencyKey, Error> {
        let valid = !header.is_empty()
            && header.len() <= MAX_IDEMPOTENCY_KEY_LEN
            && header.iter().all(|b| b.is_ascii_graphic());
        match std::str::from_utf8(header) {
            Ok(key) if valid => Ok(IdempotencyKey(key.to_owned())),
            _ => Err(Error::invalid(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Most rows a listing returns per page, and how many when the client does not say.
pub const MAX_PAGE_LIMIT: i64 = 100;
pub const DEFAULT_PAGE_LIMIT: i64 = 50;

/// A keyset page: the rows with id greater than `after`, at most `limit` of them, by id.
/// Stable under concurrent inserts: new rows get larger ids, so they never shift a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub after: i64,
    pub limit: i64,
}

impl Page {
    /// From the `limit` and `after` query parameters (already percent-decoded).
    pub fn parse(limit: Option<&str>, after: Option<&str>) -> Result<Page, Error> {
        let limit = match limit {
            None => DEFAULT_PAGE_LIMIT,
            Some(text) => text.parse::<i64>().ok().filter(|n| (1..=MAX_PAGE_LIMIT).contains(n)).ok_or_else(|| {
                Error::invalid(format!("limit must be an integer from 1 to {MAX_PAGE_LIMIT}, got {text:?}"))
            })?,
        };
        let after = match after {
            None => 0,
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0 && text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| Error::invalid(format!("after must be a non-negative integer id, got {text:?}")))?,
        };
        Ok(Page { after, limit })
    }
}

/// A validated `PUT /api/orders/{id}/status` body: `{"status": "shipped"}`.
pub fn parse_status_change(body: &Value) -> Result<OrderStatus, Error> {
    let status = body
        .as_object()
        .ok_or_else(|| Error::invalid("request body must be a JSON object"))?
        .get("status")
        .ok_or_else(|| Error::invalid("status is required"))?;
    status.as_str().and_then(OrderStatus::parse).ok_or_else(|| {
        Error::invalid("status must be one of \"processing\", \"shipped\", \"delivered\", \"cancelled\"")
    })
}

/// A validated `POST /api/products/{id}/restock` body: `{"quantity": N}`, N a positive int4.
pub fn parse_restock(body: &Value) -> Result<i32, Error> {
    let object = body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))?;
    positive_int4(object.get("quantity"), "quantity")
}

/// An id from the URL path: a positive integer that fits PostgreSQL `bigint`.
pub fn parse_path_id(text: &str, name: &str) -> Result<i64, Error> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| Error::invalid(format!("{name} must be a positive integer, got {text:?}")))
}

/// Where an order is in its life. Legal moves: processing -> shipped -> delivered, and
/// processing -> cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Processing,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 4] =
        [OrderStatus::Processing, OrderStatus::Shipped, OrderStatus::Delivered, OrderStatus::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Processing => "processing",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// The status an order must have to move to this one, if it can be moved to at all
    /// (cancellation has its own path: it also restores stock).
    pub fn reached_from(self) -> Option<OrderStatus> {
        match self {
            OrderStatus::Shipped => Some(OrderStatus::Processing),
            OrderStatus::Delivered => Some(OrderStatus::Shipped),
            OrderStatus::Cancelled => Some(OrderStatus::Processing),
            OrderStatus::Processing => None,
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for OrderStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(result: Result<NewOrder, Error>) -> String {
        match result {
            Err(Error::InvalidRequest(message)) => message,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_valid_order_keeping_line_order() {
        let order = NewOrder::parse(&json!({"userId": 1, "items": [
            {"productId": 3, "quantity": 2}, {"productId": 1, "quantity": 1}
        ], "note": "ignored"}))
        .unwrap();
        assert_eq!(order.user_id, 1);
        assert_eq!(
            order.lines,
            vec![OrderLine { product_id: 3, quantity: 2 }, OrderLine { product_id: 1, quantity: 1 }]
        );
    }

    #[test]
    fn refuses_each_kind_of_bad_number_naming_the_field() {
        for bad in [json!(0), json!(-1), json!(1.5), json!(1.0), json!("2"), json!(2147483648i64), json!(true)] {
            let text = message(NewOrder::parse(&json!({"userId": 1, "items": [{"productId": 1, "quantity": bad}]})));
            assert!(text.contains("items[0].quantity"), "{text}");
        }
        let text = message(NewOrder::parse(&json!({"userId": "1", "items": [{"productId": 1, "quantity": 1}]})));
        assert!(text.contains("userId"), "{text}");
    }

    #[test]
    fn refuses_missing_empty_duplicate_and_too_many_lines() {
        assert!(message(NewOrder::parse(&json!({"userId": 1}))).contains("items is required"));
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": []}))).contains("at least one"));
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": {}}))).contains("array"));
        assert!(message(NewOrder::parse(&json!([1, 2]))).contains("JSON object"));
        let duplicate =
            json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}, {"productId": 2, "quantity": 1}]});
        assert!(message(NewOrder::parse(&duplicate)).contains("more than one line"));
        let many: Vec<_> = (1..=101).map(|id| json!({"productId": id, "quantity": 1})).collect();
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": many}))).contains("at most 100"));
    }

    #[test]
    fn fingerprints_ignore_formatting_but_not_content() {
        let a = NewOrder::parse(&json!({"userId": 1, "items": [{"quantity": 2, "productId": 3}], "x": 1})).unwrap();
        let b = NewOrder::parse(&json!({"items": [{"productId": 3, "quantity": 2}], "userId": 1})).unwrap();
        let c = NewOrder::parse(&json!({"userId": 1, "items": [{"productId": 3, "quantity": 1}]})).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn pages_default_and_bound_their_limit() {
        assert_eq!(Page::parse(None, None).unwrap(), Page { after: 0, limit: DEFAULT_PAGE_LIMIT });
        assert_eq!(Page::parse(Some("5"), Some("42")).unwrap(), Page { after: 42, limit: 5 });
        for (limit, after) in
            [(Some("0"), None), (Some("101"), None), (Some("x"), None), (None, Some("-1")), (None, Some("1e3"))]
        {
            assert!(Page::parse(limit, after).is_err(), "{limit:?} {after:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_bounded_visible_ascii() {
        assert!(IdempotencyKey::parse(b"a1b2-c3d4").is_ok());
        assert!(IdempotencyKey::parse(b"").is_err());
        assert!(IdempotencyKey::parse(b"has space").is_err());
        assert!(IdempotencyKey::parse("é".as_bytes()).is_err());
        assert!(IdempotencyKey::parse(&[b'k'; 256]).is_err());
    }

    #[test]
    fn status_changes_and_restocks_parse_strictly() {
        assert_eq!(parse_status_change(&json!({"status": "shipped"})).unwrap(), OrderStatus::Shipped);
        for bad in [json!({"status": "SHIPPED"}), json!({"status": 1}), json!({}), json!("shipped")] {
            assert!(parse_status_change(&bad).is_err(), "{bad}");
        }
        assert_eq!(parse_restock(&json!({"quantity": 5})).unwrap(), 5);
        assert!(parse_restock(&json!({"quantity": 0})).is_err());
    }

    #[test]
    fn path_ids_must_be_plain_positive_integers() {
        assert_eq!(parse_path_id("42", "orderId").unwrap(), 42);
        for bad in ["abc", "0", "-1", "+1", "99999999999999999999", "1.0", ""] {
            assert!(parse_path_id(bad, "orderId").is_err(), "{bad}");
        }
    }
}
