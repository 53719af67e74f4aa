//! Webhook endpoints as requests describe them: a URL (`WebhookUrl`), the event types sent, a
//! description; a change to them; and the event types themselves.

use serde_json::{Map, Value};

use crate::error::Error;

/// Every event type (CONTRACT part 5).
pub const EVENT_TYPES: [&str; 6] =
    ["order.created", "order.cancelled", "order.shipped", "order.delivered", "product.restocked", "product.sold_out"];

/// Longest URL and description an endpoint may have: a URL is a few hundred bytes at most, a
/// description a sentence.
pub const MAX_URL_LEN: usize = 2_048;
pub const MAX_DESCRIPTION_LEN: usize = 500;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// An endpoint's URL, in the pieces a request needs. Only `https` unless plain `http` is
/// allowed (`WEBHOOK_ALLOW_HTTP`); no user or password in it (they would be sent in the clear
/// in logs and answers); no fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub text: String,
    pub scheme: Scheme,
    /// The host as written (a name or an address), without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// The path and query, `/` when the URL has none.
    pub path: String,
}

impl WebhookUrl {
    pub fn parse(text: &str, allow_http: bool) -> Result<WebhookUrl, Error> {
        let invalid = |why: &str| Error::invalid(format!("url {why}: {text:?}"));
        if text.len() > MAX_URL_LEN {
            return Err(Error::invalid(format!("url is longer than {MAX_URL_LEN} bytes")));
        }
        if text.bytes().any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii()) {
            return Err(invalid("must be plain ASCII without spaces (percent-encode the rest)"));
        }
        let (scheme, rest, default_port) = if let Some(rest) = text.strip_prefix("https://") {
            (Scheme::Https, rest, 443)
        } else if let Some(rest) = text.strip_prefix("http://") {
            if !allow_http {
                return Err(invalid("must be https (plain http is allowed only with WEBHOOK_ALLOW_HTTP=true)"));
            }
            (Scheme::Http, rest, 80)
        } else {
            return Err(invalid("must be an https:// URL"));
        };
        if rest.contains('#') {
            return Err(invalid("may not have a fragment"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        if authority.contains('@') {
            return Err(invalid("may not hold a user or password"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| invalid("has an invalid port"))?)
            }
            _ => (authority, default_port),
        };
        let host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.strip_suffix(']').ok_or_else(|| invalid("has an unclosed '['"))?,
            None => host,
        };
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b)) {
            return Err(invalid("has no valid host"));
        }
        Ok(WebhookUrl {
            text: text.to_owned(),
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            authority: authority.to_owned(),
            path,
        })
    }
}

/// A validated `POST /api/webhooks` body: `{"url", "types", "description"}`.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: WebhookUrl,
    /// Empty: every type.
    pub types: Vec<String>,
    pub description: String,
}

impl NewWebhook {
    pub fn parse(body: &Value, allow_http: bool) -> Result<NewWebhook, Error> {
        let object = object(body)?;
        let url = match object.get("url") {
            Some(Value::String(url)) => WebhookUrl::parse(url, allow_http)?,
            None | Some(Value::Null) => return Err(Error::invalid("url is required")),
            Some(_) => return Err(Error::invalid("url must be a string")),
        };
        let types = match object.get("types") {
            None | Some(Value::Null) => Vec::new(),
            Some(types) => parse_types(types)?,
        };
        let description = match object.get("description") {
            None | Some(Value::Null) => String::new(),
            Some(description) => parse_description(description)?,
        };
        Ok(NewWebhook { url, types, description })
    }
}

/// A validated `PATCH /api/webhooks/:id` body: any of `url`, `types`, `enabled`,
/// `description`; at least one.
#[derive(Debug, Clone, Default)]
pub struct WebhookChange {
    pub url: Option<WebhookUrl>,
    pub types: Option<Vec<String>>,
    pub enabled: Option<bool>,
    pub description: Option<String>,
}

impl WebhookChange {
    pub fn parse(body: &Value, allow_http: bool) -> Result<WebhookChange, Error> {
        let object = object(body)?;
        let mut change = WebhookChange::default();
        for (name, value) in object {
            match (name.as_str(), value) {
                ("url", Value::String(url)) => change.url = Some(WebhookUrl::parse(url, allow_http)?),
                ("url", _) => return Err(Error::invalid("url must be a string")),
                ("types", types) => change.types = Some(parse_types(types)?),
                ("enabled", Value::Bool(enabled)) => change.enabled = Some(*enabled),
                ("enabled", _) => return Err(Error::invalid("enabled must be true or false")),
                ("description", description) => change.description = Some(parse_description(description)?),
                (other, _) => {
                    return Err(Error::invalid(format!(
                        "{other:?} cannot be changed; a change holds url, types, enabled or description"
                    )));
                }
            }
        }
        if change.url.is_none() && change.types.is_none() && change.enabled.is_none() && change.description.is_none() {
            return Err(Error::invalid("a change holds at least one of url, types, enabled, description"));
        }
        Ok(change)
    }
}

fn object(body: &Value) -> Result<&Map<String, Value>, Error> {
    body.as_object().ok_or_else(|| Error::invalid("request body must be a JSON object"))
}

/// `["order.created", ...]`: known types, each once; empty means every type.
fn parse_types(value: &Value) -> Result<Vec<String>, Error> {
    let items = value.as_array().ok_or_else(|| Error::invalid("types must be an array of event types"))?;
    let mut types: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let name = item.as_str().ok_or_else(|| Error::invalid("types must be an array of event types"))?;
        if !EVENT_TYPES.contains(&name) {
            return Err(Error::invalid(format!("types holds {name:?}; known types: {}", EVENT_TYPES.join(", "))));
        }
        if !types.iter().any(|known| known == name) {
            types.push(name.to_owned());
        }
    }
    Ok(types)
}

fn parse_description(value: &Value) -> Result<String, Error> {
    let text = value.as_str().ok_or_else(|| Error::invalid("description must be a string"))?;
    if text.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(Error::invalid(format!("description is longer than {MAX_DESCRIPTION_LEN} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(Error::invalid("description may not hold control characters"));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_are_read_into_their_parts() {
        let url = WebhookUrl::parse("https://hooks.shop.example/in?x=1", false).unwrap();
        assert_eq!(
            (url.scheme, url.host.as_str(), url.port, url.path.as_str()),
            (Scheme::Https, "hooks.shop.example", 443, "/in?x=1")
        );
        let url = WebhookUrl::parse("http://127.0.0.1:8080", true).unwrap();
        assert_eq!(
            (url.scheme, url.port, url.authority.as_str(), url.path.as_str()),
            (Scheme::Http, 8080, "127.0.0.1:8080", "/")
        );
        let url = WebhookUrl::parse("https://[::1]:9/x", false).unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 9));
    }

    #[test]
    fn anything_but_a_plain_url_of_an_allowed_scheme_is_refused() {
        for url in [
            "http://h/",
            "ftp://h/",
            "https://",
            "https://user:pw@h/",
            "https://h:0/",
            "https://h:99999/",
            "https://h/#frag",
            "https://h /",
            "https://[::1/",
            "https://h\u{e9}/",
            "//h/",
        ] {
            assert!(WebhookUrl::parse(url, false).is_err(), "{url}");
        }
        assert!(WebhookUrl::parse("http://h/", true).is_ok());
    }

    #[test]
    fn bodies_are_checked_field_by_field() {
        let hook = NewWebhook::parse(&json!({"url": "https://h/", "types": ["order.created", "order.created"]}), false)
            .unwrap();
        assert_eq!(hook.types, ["order.created"]);
        for bad in [
            json!({}),
            json!({"url": 1}),
            json!({"url": "https://h/", "types": "order.created"}),
            json!({"url": "https://h/", "types": ["order.paid"]}),
            json!({"url": "https://h/", "description": "x".repeat(501)}),
            json!([1]),
        ] {
            assert!(NewWebhook::parse(&bad, false).is_err(), "{bad}");
        }
        assert!(WebhookChange::parse(&json!({}), false).is_err());
        assert!(WebhookChange::parse(&json!({"secret": "x"}), false).is_err());
        assert!(WebhookChange::parse(&json!({"enabled": "yes"}), false).is_err());
        assert_eq!(WebhookChange::parse(&json!({"enabled": false}), false).unwrap().enabled, Some(false));
    }
}
