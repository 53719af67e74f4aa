//! `RATE_LIMIT_ORDERS_PER_MINUTE`: order creation per user and per client address; past it,
//! 429 `RATE_LIMITED` with `Retry-After`, and nothing written.

use std::{net::IpAddr, time::Duration};

use serde_json::json;

use crate::common::{Reply, TestApp, spawn_app_with};

/// An order for `user` sent from the loopback address `from` (127.0.0.x).
async fn order_from(app: &TestApp, from: [u8; 4], user: i32) -> Reply {
    let client =
        reqwest::Client::builder().local_address(IpAddr::from(from)).timeout(Duration::from_secs(10)).build().unwrap();
    let body = json!({"userId": user, "items": [{"productId": 2, "quantity": 1}]});
    Reply::read(client.post(app.url("/api/orders")).json(&body).send().await.unwrap()).await
}

/// A user gets the per-minute burst, then 429 from any address; another user on another
/// address is not affected; one address is limited whatever user it names.
#[tokio::test]
async fn orders_past_the_limit_are_429_per_user_and_per_address() {
    let app = spawn_app_with(|config| config.rate_limit_orders_per_minute = 3).await;
    for _ in 0..3 {
        assert_eq!(order_from(&app, [127, 0, 0, 1], 1).await.status, 201);
    }
    let refused = order_from(&app, [127, 0, 0, 1], 1).await;
    refused.assert_error(429, "RATE_LIMITED");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    // The same user from another address: still the user's limit.
    order_from(&app, [127, 0, 0, 2], 1).await.assert_error(429, "RATE_LIMITED");
    // Another user from the first address: that address has used its minute.
    order_from(&app, [127, 0, 0, 1], 2).await.assert_error(429, "RATE_LIMITED");
    // Another user from a third address goes through.
    assert_eq!(order_from(&app, [127, 0, 0, 3], 2).await.status, 201);
    assert_eq!(app.count("orders").await, 4);
    assert_eq!(app.stock(2).await, 46);
}

/// Without the setting there is no limit.
#[tokio::test]
async fn no_limit_by_default() {
    let app = spawn_app_with(|_| {}).await;
    for _ in 0..20 {
        assert_eq!(order_from(&app, [127, 0, 0, 1], 1).await.status, 201);
    }
}
