//! Orders as requests describe them: a new order (`NewOrder`), and an order's status.

use std::fmt;

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::positive_int4;
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
    ///
    /// `default_user` is the user an order without `userId` is for (the authenticated user in
    /// jwt mode); without one, `userId` is required.
    pub fn parse(body: &Value, default_user: Option<i32>) -> Result<NewOrder, Error> {
        let object = body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))?;
        let user_id = match (object.get("userId"), default_user) {
            (None | Some(Value::Null), Some(user_id)) => user_id,
            (given, _) => positive_int4(given, "userId")?,
        };
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

    /// The request in a canonical text form: same user and lines, same fingerprint, whatever
    /// the JSON's spacing, key order or ignored fields. Stored (hashed) with an idempotency key
    /// to tell a retry from a different request reusing the key.
    pub fn fingerprint(&self) -> String {
        let lines: Vec<String> = self.lines.iter().map(|l| format!("{}x{}", l.product_id, l.quantity)).collect();
        format!("user={};lines={}", self.user_id, lines.join(","))
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
        let order = NewOrder::parse(
            &json!({"userId": 1, "items": [
            {"productId": 3, "quantity": 2}, {"productId": 1, "quantity": 1}
        ], "note": "ignored"}),
            None,
        )
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
            let text =
                message(NewOrder::parse(&json!({"userId": 1, "items": [{"productId": 1, "quantity": bad}]}), None));
            assert!(text.contains("items[0].quantity"), "{text}");
        }
        let text = message(NewOrder::parse(&json!({"userId": "1", "items": [{"productId": 1, "quantity": 1}]}), None));
        assert!(text.contains("userId"), "{text}");
    }

    #[test]
    fn refuses_missing_empty_duplicate_and_too_many_lines() {
        assert!(message(NewOrder::parse(&json!({"userId": 1}), None)).contains("items is required"));
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": []}), None)).contains("at least one"));
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": {}}), None)).contains("array"));
        assert!(message(NewOrder::parse(&json!([1, 2]), None)).contains("JSON object"));
        let duplicate =
            json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}, {"productId": 2, "quantity": 1}]});
        assert!(message(NewOrder::parse(&duplicate, None)).contains("more than one line"));
        let many: Vec<_> = (1..=101).map(|id| json!({"productId": id, "quantity": 1})).collect();
        assert!(message(NewOrder::parse(&json!({"userId": 1, "items": many}), None)).contains("at most 100"));
    }

    #[test]
    fn fingerprints_ignore_formatting_but_not_content() {
        let a =
            NewOrder::parse(&json!({"userId": 1, "items": [{"quantity": 2, "productId": 3}], "x": 1}), None).unwrap();
        let b = NewOrder::parse(&json!({"items": [{"productId": 3, "quantity": 2}], "userId": 1}), None).unwrap();
        let c = NewOrder::parse(&json!({"userId": 1, "items": [{"productId": 3, "quantity": 1}]}), None).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn status_changes_parse_strictly() {
        assert_eq!(parse_status_change(&json!({"status": "shipped"})).unwrap(), OrderStatus::Shipped);
        for bad in [json!({"status": "SHIPPED"}), json!({"status": 1}), json!({}), json!("shipped")] {
            assert!(parse_status_change(&bad).is_err(), "{bad}");
        }
    }
}
