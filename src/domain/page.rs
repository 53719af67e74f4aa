//! Keyset pages of a listing: `?limit=&after=`.

use crate::error::Error;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
