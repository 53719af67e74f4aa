//! What a request says about a product: a restock.

use serde_json::Value;

use super::positive_int4;
use crate::error::Error;

/// A validated `POST /api/products/{id}/restock` body: `{"quantity": N}`, N a positive int4.
pub fn parse_restock(body: &Value) -> Result<i32, Error> {
    let object = body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))?;
    positive_int4(object.get("quantity"), "quantity")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn restocks_parse_strictly() {
        assert_eq!(parse_restock(&json!({"quantity": 5})).unwrap(), 5);
        for bad in [json!({"quantity": 0}), json!({"quantity": "5"}), json!({}), json!(5)] {
            assert!(parse_restock(&bad).is_err(), "{bad}");
        }
    }
}
