//! Exact money: an amount in cents, read from PostgreSQL `numeric` and written to JSON as a
//! decimal number with two places (`75000.00`).
//!
//! Floats never touch money. The alternative, reading `numeric` as text and passing the text
//! through, would also be exact, but a typed amount lets the code compare and format amounts
//! without parsing strings, and decoding the binary `numeric` costs a few dozen instructions.

use std::{error::Error, fmt};

use postgres_types::{FromSql, Type};
use serde::{Serialize, Serializer};

/// A non-fractional number of cents. `numeric(12,2)` holds at most 10^12 - 1 cents, far inside
/// `i64`; sums of many such amounts are computed by PostgreSQL and checked here on decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Money {
    cents: i64,
}

impl Money {
    pub fn from_cents(cents: i64) -> Money {
        Money { cents }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.cents < 0 { "-" } else { "" };
        let abs = self.cents.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// Written as a JSON number with exactly two decimals: serde_json would print an `f64` as
/// `75000.0`, so the decimal text goes out as a raw JSON value instead.
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(self.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Decodes PostgreSQL's binary `numeric`: a header (digit count, weight, sign, display scale)
/// followed by base-10000 digits, the first of which is worth 10000^weight.
impl<'a> FromSql<'a> for Money {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Money, Box<dyn Error + Sync + Send>> {
        const POSITIVE: u16 = 0x0000;
        const NEGATIVE: u16 = 0x4000;
        let field = |i: usize| -> Result<u16, Box<dyn Error + Sync + Send>> {
            raw.get(i * 2..i * 2 + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(|| "truncated numeric".into())
        };
        let digit_count = field(0)? as usize;
        let weight = field(1)? as i16;
        let sign = field(2)?;
        if sign != POSITIVE && sign != NEGATIVE {
            return Err("NaN or infinite numeric is not money".into());
        }

        let mut cents: i64 = 0;
        for i in 0..digit_count {
            let digit = i64::from(field(4 + i)?);
            // Exponent of this digit in base 10000; cents are 10^-2, half a base-10000 digit.
            let exponent = i32::from(weight) - i as i32;
            let value = match exponent {
                e if e >= 0 => 10_000i64
                    .checked_pow(e as u32)
                    .and_then(|scale| digit.checked_mul(scale))
                    .and_then(|v| v.checked_mul(100)),
                -1 if digit % 100 == 0 => Some(digit / 100),
                _ if digit == 0 => Some(0),
                _ => return Err("money has more than two decimal places".into()),
            };
            cents = value.and_then(|v| cents.checked_add(v)).ok_or("money amount out of range")?;
        }
        Ok(Money::from_cents(if sign == NEGATIVE { -cents } else { cents }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes like PostgreSQL's `numeric_send`, for decoding tests.
    fn numeric(weight: i16, sign: u16, scale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for field in [digits.len() as u16, weight as u16, sign, scale].iter().chain(digits) {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out
    }

    #[test]
    fn decodes_whole_and_fractional_amounts() {
        // 75000.00 = 7 * 10000^1 + 5000 * 10000^0
        let raw = numeric(1, 0, 2, &[7, 5000]);
        assert_eq!(Money::from_sql(&Type::NUMERIC, &raw).unwrap(), Money::from_cents(7_500_000));
        // 12.34 = 12 * 10000^0 + 3400 * 10000^-1
        let raw = numeric(0, 0, 2, &[12, 3400]);
        assert_eq!(Money::from_sql(&Type::NUMERIC, &raw).unwrap(), Money::from_cents(1234));
        // 0.05 = 500 * 10000^-1
        let raw = numeric(-1, 0, 2, &[500]);
        assert_eq!(Money::from_sql(&Type::NUMERIC, &raw).unwrap(), Money::from_cents(5));
        // zero has no digits at all
        let raw = numeric(0, 0, 2, &[]);
        assert_eq!(Money::from_sql(&Type::NUMERIC, &raw).unwrap(), Money::from_cents(0));
        // -1.50
        let raw = numeric(0, 0x4000, 2, &[1, 5000]);
        assert_eq!(Money::from_sql(&Type::NUMERIC, &raw).unwrap(), Money::from_cents(-150));
    }

    #[test]
    fn rejects_sub_cent_nan_and_overflow() {
        assert!(Money::from_sql(&Type::NUMERIC, &numeric(-1, 0, 3, &[1234])).is_err());
        assert!(Money::from_sql(&Type::NUMERIC, &numeric(0, 0xC000, 0, &[])).is_err());
        assert!(Money::from_sql(&Type::NUMERIC, &numeric(10, 0, 0, &[1])).is_err());
        assert!(Money::from_sql(&Type::NUMERIC, &[0, 1]).is_err());
    }

    #[test]
    fn serializes_as_a_json_number_with_two_decimals() {
        let json = serde_json::to_string(&[Money::from_cents(7_500_000), Money::from_cents(5)]).unwrap();
        assert_eq!(json, "[75000.00,0.05]");
    }
}
