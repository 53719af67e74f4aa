//! `GET /openapi.json`: the OpenAPI 3 document of the service, written by hand next to the
//! code it describes and embedded at build time. The tests below keep it true to the route
//! table and the error codes; `make fuzz` runs schemathesis against a live server with it.

use hyper::StatusCode;

use super::reply::{Reply, json_text};

pub const DOCUMENT: &str = include_str!("openapi.json");

pub fn document() -> Reply {
    json_text(StatusCode::OK, DOCUMENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::routes::Route;
    use crate::error::Error;
    use serde_json::Value;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
    }

    /// Every route is documented with exactly the methods it answers, and nothing else is.
    #[test]
    fn documents_every_route_and_method_and_no_other() {
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), Route::ALL.len());
        for route in Route::ALL {
            let item = paths.get(route.template()).unwrap_or_else(|| panic!("{} is not documented", route.template()));
            let mut documented: Vec<String> = item.as_object().unwrap().keys().map(|m| m.to_uppercase()).collect();
            documented.sort();
            // HEAD is answered wherever GET is; the document lists GET only.
            let mut served: Vec<String> =
                route.allow().split(", ").filter(|method| *method != "HEAD").map(str::to_owned).collect();
            served.sort();
            assert_eq!(documented, served, "methods of {}", route.template());
        }
    }

    /// Every error code the service can answer is in the document's `Error.code` enum.
    #[test]
    fn documents_every_error_code() {
        let doc = document();
        let codes: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        for error in Error::examples() {
            assert!(codes.contains(&error.code()), "{} is not documented", error.code());
        }
        let served: std::collections::BTreeSet<&str> = Error::examples().iter().map(Error::code).collect();
        assert_eq!(codes.len(), served.len(), "documented codes the service never answers");
    }

    /// Every `$ref` points at something that exists.
    #[test]
    fn every_reference_resolves() {
        let doc = document();
        fn walk(value: &Value, doc: &Value) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let pointer = target.strip_prefix('#').expect("local reference");
                        assert!(doc.pointer(pointer).is_some(), "dangling {target}");
                    }
                    map.values().for_each(|v| walk(v, doc));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc)),
                _ => {}
            }
        }
        walk(&doc, &doc);
    }
}
