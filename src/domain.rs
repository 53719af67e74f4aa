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
    fn path_ids_must_be_plain_positive_integers() {
        assert_eq!(parse_path_id("42", "orderId").unwrap(), 42);
        for bad in ["abc", "0", "-1", "+1", "99999999999999999999", "1.0", ""] {
            assert!(parse_path_id(bad, "orderId").is_err(), "{bad}");
        }
    }
}
