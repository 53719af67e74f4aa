//! Property tests of hostile input: whatever JSON or bytes a client sends, parsing never
//! panics, every rejection is a 4xx with a JSON error, and nothing but a valid order is
//! ever written.

use order_api::{domain::NewOrder, error::Error};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::common;

/// Any JSON value, nested a few levels, with numbers around the interesting edges.
fn any_json() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop::sample::select(vec![0i64, 1, -1, 2147483647, 2147483648, -2147483648, i64::MAX, i64::MIN])
            .prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ];
    let leaf =
        prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number, ".{0,12}".prop_map(Value::from)];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec!["userId", "items", "productId", "quantity", "x"]).prop_map(str::to_owned),
                inner,
                0..4
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Orders that are nearly right: valid shape, with each field drawn from good and bad values.
fn near_order() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        (1i64..=6).prop_map(Value::from),
        any_json(),
        prop::sample::select(vec![json!(0), json!(-1), json!("1"), json!(1.5), json!(2147483648i64), json!(null)]),
    ];
    let line = (id.clone(), id.clone())
        .prop_map(|(product_id, quantity)| json!({"productId": product_id, "quantity": quantity}));
    (id, prop::collection::vec(line, 0..5)).prop_map(|(user_id, items)| json!({"userId": user_id, "items": items}))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Parsing any JSON never panics; it either yields a valid order or an INVALID_REQUEST.
    #[test]
    fn parsing_any_json_never_panics_and_only_accepts_valid_orders(body in prop_oneof![any_json(), near_order()]) {
        match NewOrder::parse(&body, None) {
            Ok(order) => {
                prop_assert!(order.user_id > 0);
                prop_assert!(!order.lines.is_empty() && order.lines.len() <= order_api::domain::MAX_ORDER_LINES);
                for (i, line) in order.lines.iter().enumerate() {
                    prop_assert!(line.product_id > 0 && line.quantity > 0);
                    prop_assert!(order.lines[..i].iter().all(|other| other.product_id != line.product_id));
                }
            }
            Err(Error::InvalidRequest(message)) => prop_assert!(!message.is_empty()),
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}

/// Over the wire: random near-valid orders, arbitrary JSON and arbitrary bytes sent to a live
/// server get only 201 or a 4xx with a JSON error, never a 5xx; afterwards the invariants hold.
#[test]
fn hostile_bodies_over_http_get_4xx_never_5xx() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(common::spawn_app());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 300, ..ProptestConfig::default() });
    let bodies = prop_oneof![
        near_order().prop_map(|v| v.to_string().into_bytes()),
        any_json().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..256),
    ];
    runner
        .run(&bodies, |body| {
            let reply = runtime.block_on(app.post_raw("/api/orders", "application/json", body));
            prop_assert!(reply.status == 201 || (400..500).contains(&reply.status), "{} {}", reply.status, reply.text);
            if reply.status != 201 {
                prop_assert!(reply.json["code"].is_string(), "{}", reply.text);
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(app.assert_invariants());
    drop(app);
}
