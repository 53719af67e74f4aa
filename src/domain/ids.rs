//! Ids and counts as they arrive: JSON numbers in bodies, digits in paths and query strings.
//! Each becomes a positive integer of the database's type, or a 400 that names the field.

use serde_json::Value;

use crate::error::Error;

/// A JSON integer from 1 to 2147483647 (PostgreSQL `int4`). `1.0`, `"1"`, `true` and
/// anything larger are refused rather than coerced: a client sending them has a bug.
pub fn positive_int4(value: Option<&Value>, field: &str) -> Result<i32, Error> {
    let value = match value {
        None | Some(Value::Null) => return Err(Error::invalid(format!("{field} is required"))),
        Some(value) => value,
    };
    value.as_i64().and_then(positive_i32).ok_or_else(|| not_positive_int4(field))
}

/// A query-string value such as `userId=7`: plain digits spelling 1 to 2147483647, by the
/// same rule and message as `positive_int4`.
pub fn positive_int4_in_query(text: &str, field: &str) -> Result<i32, Error> {
    Some(text)
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse::<i64>().ok())
        .and_then(positive_i32)
        .ok_or_else(|| not_positive_int4(field))
}

fn positive_i32(n: i64) -> Option<i32> {
    i32::try_from(n).ok().filter(|n| *n > 0)
}

fn not_positive_int4(field: &str) -> Error {
    Error::invalid(format!("{field} must be a positive integer no larger than {}", i32::MAX))
}

/// An id from the URL path: a positive integer that fits PostgreSQL `bigint`.
pub fn parse_path_id(text: &str, name: &str) -> Result<i64, Error> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0 && text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| Error::invalid(format!("{name} must be a positive integer, got {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_ids_must_be_plain_positive_integers() {
        assert_eq!(parse_path_id("42", "orderId").unwrap(), 42);
        for bad in ["abc", "0", "-1", "+1", "99999999999999999999", "1.0", ""] {
            assert!(parse_path_id(bad, "orderId").is_err(), "{bad}");
        }
    }

    #[test]
    fn body_and_query_ids_follow_one_rule() {
        assert_eq!(positive_int4(Some(&json!(7)), "userId").unwrap(), 7);
        assert_eq!(positive_int4_in_query("7", "userId").unwrap(), 7);
        for bad in ["0", "-1", "+1", "2147483648", "1.0", "", "x"] {
            assert!(positive_int4_in_query(bad, "userId").is_err(), "{bad}");
        }
        for bad in [json!(0), json!(-1), json!(1.5), json!("1"), json!(2147483648i64), json!(true)] {
            assert!(positive_int4(Some(&bad), "userId").is_err(), "{bad}");
        }
        assert!(positive_int4(None, "userId").is_err());
    }
}
