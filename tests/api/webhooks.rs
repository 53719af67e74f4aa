//! Webhooks (CONTRACT part 5): operators register endpoints; each event of the types an
//! endpoint wants is POSTed to it, signed by Standard Webhooks 1.0 (checked here with the
//! official verifier), retried on the schedule (scaled down by `WEBHOOK_RETRY_SCALE`) honouring
//! `Retry-After`, disabled at once by 410 and after failing for 5 days, one order's events in
//! sequence order, never to a destination the guard refuses.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    auth::{customer, send},
    common::{
        self, TestApp,
        receiver::{Answer, Received, Receiver},
        spawn_app_with,
    },
};

/// A server whose webhooks may go over plain http to 127.0.0.1, every delay of the retry
/// schedule times `scale`.
async fn webhook_app(scale: f64) -> TestApp {
    spawn_app_with(|config| {
        config.webhook_allow_http = true;
        config.webhook_allowed_hosts = vec!["127.0.0.1".to_owned()];
        config.webhook_retry_scale = scale;
    })
    .await
}

/// Registers `url` for `types` (all when empty); its id and secret.
async fn register(app: &TestApp, url: &str, types: &[&str]) -> (i64, String) {
    let created = app.post_json("/api/webhooks", &json!({"url": url, "types": types, "description": "test"})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    (created.json["id"].as_i64().unwrap(), created.json["secret"].as_str().unwrap().to_owned())
}

/// Each request once, by webhook-id, in the order first received.
fn deduplicated(received: &[Received]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    received.iter().filter(|r| seen.insert(r.header("webhook-id").to_owned())).map(Received::json).collect()
}

fn verify(secret: &str, request: &Received) {
    let verifier = standardwebhooks::Webhook::new(secret).unwrap();
    verifier
        .verify(&request.body, &request.headers)
        .unwrap_or_else(|e| panic!("signature refused: {e:?}: {request:?}"));
}

/// Registering, listing, changing, deleting; the secret is in the first answer only.
#[tokio::test]
async fn endpoints_are_managed_by_operators_and_their_secret_shown_once() {
    let app = webhook_app(1.0).await;
    let receiver = Receiver::start().await;
    let (id, secret) = register(&app, &receiver.url(), &["order.created"]).await;
    assert!(secret.starts_with("whsec_") && secret.len() == 50, "{secret}");
    let listed = app.get("/api/webhooks").await;
    assert_eq!(listed.json.as_array().unwrap().len(), 1);
    assert!(!listed.text.contains(&secret[6..]) && !listed.text.contains("secret"), "{}", listed.text);
    let one = app.get(&format!("/api/webhooks/{id}")).await;
    assert_eq!((one.json["types"].clone(), one.json["enabled"].clone()), (json!(["order.created"]), json!(true)));
    assert!(one.json.get("secret").is_none());

    let changed =
        app.request_json(Method::PATCH, &format!("/api/webhooks/{id}"), &json!({"enabled": false, "types": []})).await;
    assert_eq!(changed.status, 200, "{}", changed.text);
    assert_eq!(
        (changed.json["enabled"].clone(), changed.json["disabledReason"].clone()),
        (json!(false), json!("disabled by an operator"))
    );
    let enabled = app.request_json(Method::PATCH, &format!("/api/webhooks/{id}"), &json!({"enabled": true})).await;
    assert_eq!(enabled.json["disabledReason"], Value::Null);

    let rotated = app.post_json(&format!("/api/webhooks/{id}/rotate-secret"), &json!({})).await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    assert_ne!(rotated.json["secret"], secret);
    assert!(rotated.json["previousSecretExpiresAt"].is_string());

    assert_eq!(app.request(Method::DELETE, &format!("/api/webhooks/{id}")).await.status, 204);
    app.get(&format!("/api/webhooks/{id}")).await.assert_error(404, "WEBHOOK_NOT_FOUND");
    app.request(Method::DELETE, &format!("/api/webhooks/{id}")).await.assert_error(404, "WEBHOOK_NOT_FOUND");
}

/// Bad bodies and refused destinations are 400 and register nothing; every webhook path is an
/// operator's.
#[tokio::test]
async fn bad_endpoints_are_refused_and_only_operators_manage_them() {
    let app = webhook_app(1.0).await;
    for body in [
        json!({}),
        json!({"url": "ftp://127.0.0.1/"}),
        json!({"url": "http://127.0.0.2:9/hook"}),
        json!({"url": "http://localhost:9/hook"}),
        json!({"url": "http://10.0.0.1/hook"}),
        json!({"url": "http://169.254.169.254/latest/meta-data"}),
        json!({"url": "http://[::1]:9/"}),
        json!({"url": "http://user:pw@127.0.0.1:9/"}),
        json!({"url": "http://127.0.0.1:9/", "types": ["order.paid"]}),
        json!({"url": "http://127.0.0.1:9/", "types": "order.created"}),
        json!({"url": "http://127.0.0.1:9/", "description": 5}),
    ] {
        app.post_json("/api/webhooks", &body).await.assert_error(400, "INVALID_REQUEST");
    }
    let https_only = spawn_app_with(|config| config.webhook_allowed_hosts = vec!["127.0.0.1".to_owned()]).await;
    https_only
        .post_json("/api/webhooks", &json!({"url": "http://127.0.0.1:9/"}))
        .await
        .assert_error(400, "INVALID_REQUEST");
    assert_eq!(app.count("webhook_endpoints").await, 0);

    let (id, _) = register(&app, "http://127.0.0.1:9/hook", &[]).await;
    for (method, path) in [
        (Method::GET, "/api/webhooks".to_owned()),
        (Method::POST, "/api/webhooks".to_owned()),
        (Method::GET, format!("/api/webhooks/{id}")),
        (Method::PATCH, format!("/api/webhooks/{id}")),
        (Method::DELETE, format!("/api/webhooks/{id}")),
        (Method::POST, format!("/api/webhooks/{id}/rotate-secret")),
        (Method::GET, format!("/api/webhooks/{id}/deliveries")),
        (Method::POST, format!("/api/webhooks/{id}/replay")),
    ] {
        let body = Some(json!({"url": "http://127.0.0.1:9/"}));
        assert_eq!(send(&app, method.clone(), &path, None, body.clone()).await.status, 401, "{method} {path}");
        let token = customer(1);
        let refused = send(&app, method.clone(), &path, Some(&token), body).await.status;
        assert!(matches!(refused, 401 | 403), "{method} {path}: {refused}");
    }
    let bad_change = app.request_json(Method::PATCH, &format!("/api/webhooks/{id}"), &json!({"secret": "mine"})).await;
    bad_change.assert_error(400, "INVALID_REQUEST");
    app.request_json(Method::PATCH, &format!("/api/webhooks/{id}"), &json!({"url": "http://10.1.1.1/"}))
        .await
        .assert_error(400, "INVALID_REQUEST");
    assert_eq!(app.count("webhook_endpoints").await, 1);
}

/// Each event of the endpoint's types arrives once, as the feed shows it, with its id as
/// webhook-id, signed so that the official Standard Webhooks verifier accepts it; an endpoint
/// registered now gets the events committed after it, not those before.
#[tokio::test]
async fn events_arrive_signed_as_the_feed_shows_them() {
    let app = webhook_app(1.0).await;
    let before = app.order(2, 1).await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(&app, &receiver.url(), &["order.created", "order.cancelled"]).await;
    let first = app.order(2, 1).await;
    app.cancel(first).await;
    app.restock(2, 5).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await;
    for request in &received {
        verify(&secret, request);
        assert_eq!(request.header("content-type"), "application/json");
        assert_eq!(request.header("webhook-id"), request.json()["id"]);
    }
    let events = deduplicated(&received);
    let kinds: Vec<(&str, i64)> =
        events.iter().map(|e| (e["type"].as_str().unwrap(), e["orderId"].as_i64().unwrap())).collect();
    assert_eq!(kinds, [("order.created", first), ("order.cancelled", first)], "not {before}'s");
    let feed = app.get("/api/events?types=order.created,order.cancelled").await.json["events"].clone();
    assert_eq!(&json!(events), &json!(feed.as_array().unwrap()[1..]), "the feed's events, byte for byte the same JSON");
}

/// After a rotation every delivery carries two signatures, and the verifier accepts it with
/// the new secret and with the old one (which keeps signing for 24 h).
#[tokio::test]
async fn a_rotated_secret_signs_beside_the_new_one() {
    let app = webhook_app(1.0).await;
    let receiver = Receiver::start().await;
    let (id, old) = register(&app, &receiver.url(), &[]).await;
    let new = app.post_json(&format!("/api/webhooks/{id}/rotate-secret"), &json!({})).await.json["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    app.order(2, 1).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await;
    assert_eq!(received[0].header("webhook-signature").split(' ').count(), 2);
    verify(&new, &received[0]);
    verify(&old, &received[0]);
    // Past the overlap, the old secret signs no more.
    app.db
        .execute("UPDATE webhook_endpoints SET previous_secret_until = now() - interval '1 second'", &[])
        .await
        .unwrap();
    app.order(2, 1).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await;
    assert_eq!(received[1].header("webhook-signature").split(' ').count(), 1);
    verify(&new, &received[1]);
}

/// Failed attempts are retried: the whole schedule (scaled), then given up; each attempt is
/// listed with its status and outcome, newest first.
#[tokio::test]
async fn failed_deliveries_follow_the_schedule_then_are_given_up() {
    let app = webhook_app(0.00002).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500)]);
    let (id, _) = register(&app, &receiver.url(), &["order.created"]).await;
    app.order(2, 1).await;
    let received = receiver.wait_until(Duration::from_secs(60), |r| r.len() >= 10).await;
    let attempts = wait_for_attempts(&app, id, 10).await;
    assert_eq!(attempts[0]["outcome"], "failed", "{attempts:#?}");
    assert!(attempts[1..].iter().all(|a| a["outcome"] == "retry" && a["status"] == 500), "{attempts:#?}");
    assert!(attempts[0]["error"].as_str().unwrap().contains("500"));
    let ids: std::collections::HashSet<&str> = received.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "one event, the same webhook-id on every attempt");
    // Given up: no eleventh attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 10);
    let state: String = app.db.query_one("SELECT state FROM webhook_deliveries", &[]).await.unwrap().get(0);
    assert_eq!(state, "failed");
}

/// Polls the endpoint's attempts until there are `count` (bounded: 30 s).
async fn wait_for_attempts(app: &TestApp, id: i64, count: usize) -> Vec<Value> {
    for _ in 0..3_000 {
        let attempts = app.get(&format!("/api/webhooks/{id}/deliveries?limit=100")).await.json;
        if attempts.as_array().is_some_and(|a| a.len() >= count) {
            return attempts.as_array().unwrap().clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {count} attempts were recorded");
}

/// A failure, then success: delivered on the second attempt; a 503 with `Retry-After` puts
/// the next attempt back at least that long (times the scale), however short the schedule's.
#[tokio::test]
async fn a_retry_waits_at_least_what_retry_after_asks() {
    let app = webhook_app(0.01).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(503).with_header("retry-after", "100"), Answer::status(200)]);
    let (id, _) = register(&app, &receiver.url(), &[]).await;
    app.order(2, 1).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await;
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}, Retry-After 100 s x 0.01 asks 1 s");
    let attempts = wait_for_attempts(&app, id, 2).await;
    assert_eq!((attempts[0]["outcome"].clone(), attempts[1]["outcome"].clone()), (json!("delivered"), json!("retry")));
}

/// 410 Gone disables the endpoint at once and nothing more is sent; enabled again, its
/// deliveries resume where they stopped.
#[tokio::test]
async fn gone_disables_the_endpoint_until_it_is_enabled_again() {
    let app = webhook_app(0.001).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(410)]);
    let (id, _) = register(&app, &receiver.url(), &["order.created"]).await;
    let first = app.order(2, 1).await;
    receiver.wait_until(Duration::from_secs(20), |r| !r.is_empty()).await;
    let endpoint = wait_for_endpoint(&app, id, |e| e["enabled"] == false).await;
    assert_eq!(endpoint["disabledReason"], "the endpoint answered 410 Gone");
    app.order(2, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "nothing sent to a disabled endpoint");

    receiver.script(vec![Answer::status(200)]);
    app.request_json(Method::PATCH, &format!("/api/webhooks/{id}"), &json!({"enabled": true})).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| deduplicated(r).len() >= 2).await;
    let orders: Vec<i64> = deduplicated(&received).iter().map(|e| e["orderId"].as_i64().unwrap()).collect();
    assert_eq!(orders[0], first);
}

/// Polls the endpoint until `done` holds of it (bounded: 30 s).
async fn wait_for_endpoint(app: &TestApp, id: i64, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..3_000 {
        let endpoint = app.get(&format!("/api/webhooks/{id}")).await.json;
        if done(&endpoint) {
            return endpoint;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the endpoint never reached the state expected");
}

/// An endpoint failing every attempt for 5 days in a row (scaled to 4.3 s) is disabled.
#[tokio::test]
async fn an_endpoint_failing_for_five_days_is_disabled() {
    let app = webhook_app(0.00001).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500)]);
    let (id, _) = register(&app, &receiver.url(), &[]).await;
    app.restock(2, 1_000).await;
    for _ in 0..200 {
        app.order(2, 1).await;
        let endpoint = app.get(&format!("/api/webhooks/{id}")).await.json;
        if endpoint["enabled"] == false {
            assert!(
                endpoint["disabledReason"].as_str().unwrap().starts_with("every attempt failed since"),
                "{endpoint}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never disabled");
}

/// One order's events reach the endpoint in sequence order (the next only after the previous
/// was delivered), while different orders travel in parallel; an endpoint that fails half the
/// time still gets everything, and never the same event twice at once.
#[tokio::test]
async fn one_orders_events_arrive_in_sequence_order() {
    let app = webhook_app(0.0001).await;
    let receiver = Receiver::start().await;
    receiver.script(
        (0..400)
            .map(|i| if i % 2 == 0 { Answer::status(500) } else { Answer::status(200).after(Duration::from_millis(5)) })
            .collect(),
    );
    register(&app, &receiver.url(), &[]).await;
    let mut orders = Vec::new();
    for _ in 0..6 {
        let order = app.order(3, 1).await;
        app.set_status(order, "shipped").await;
        app.set_status(order, "delivered").await;
        orders.push(order);
    }
    let expected = app.count("events").await as usize;
    let received = receiver.wait_until(Duration::from_secs(60), |r| deduplicated(r).len() >= expected).await;
    let events = deduplicated(&received);
    for order in orders {
        let sequence: Vec<i64> =
            events.iter().filter(|e| e["orderId"] == order).map(|e| e["sequence"].as_i64().unwrap()).collect();
        assert_eq!(sequence, [1, 2, 3], "order {order}");
    }
    assert_eq!(receiver.overlaps(), 0);
}

/// A destination refused by the guard at delivery time (the endpoint row written around the
/// API, as if DNS had changed): the attempt fails with the reason, and the listener there
/// never receives a byte.
#[tokio::test]
async fn a_refused_destination_receives_nothing() {
    let app = webhook_app(0.001).await;
    let elsewhere = Receiver::start_on("127.0.0.2").await;
    app.db
        .execute(
            "INSERT INTO webhook_endpoints (url, secret) VALUES ($1, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')",
            &[&elsewhere.url()],
        )
        .await
        .unwrap();
    app.order(2, 1).await;
    let attempts = wait_for_attempts(&app, 1, 2).await;
    assert!(attempts[0]["error"].as_str().unwrap().contains("destination refused"), "{attempts:#?}");
    assert!(attempts.iter().all(|a| a["status"].is_null()));
    assert!(elsewhere.received().is_empty());
}

/// Redirects are not followed (a failed attempt), and an answer of any size is read at most
/// 64 KiB.
#[tokio::test]
async fn redirects_are_not_followed_and_big_answers_are_cut() {
    let app = webhook_app(0.0001).await;
    let target = Receiver::start().await;
    let receiver = Receiver::start().await;
    receiver.script(vec![
        Answer::status(302).with_header("location", &target.url()),
        Answer::status(200).with_body(vec![b'x'; 1 << 20]),
    ]);
    let (id, _) = register(&app, &receiver.url(), &["order.created"]).await;
    app.order(2, 1).await;
    let attempts = wait_for_attempts(&app, id, 2).await;
    assert_eq!((attempts[1]["status"].clone(), attempts[1]["outcome"].clone()), (json!(302), json!("retry")));
    assert_eq!(attempts[0]["outcome"], "delivered");
    assert!(target.received().is_empty(), "the redirect was followed");
}

/// A replay sends the endpoint's events after a position again, with the same webhook-ids.
#[tokio::test]
async fn a_replay_sends_the_events_again_with_their_ids() {
    let app = webhook_app(1.0).await;
    let receiver = Receiver::start().await;
    let (id, _) = register(&app, &receiver.url(), &[]).await;
    app.order(2, 1).await;
    app.order(2, 1).await;
    let first = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await;
    let replayed = app.post_json(&format!("/api/webhooks/{id}/replay"), &json!({"after": null})).await;
    assert_eq!((replayed.status, replayed.json["queued"].clone()), (202, json!(2)), "{}", replayed.text);
    let all = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 4).await;
    let ids = |requests: &[Received]| requests.iter().map(|r| r.header("webhook-id").to_owned()).collect::<Vec<_>>();
    assert_eq!(ids(&all[2..]), ids(&first));
    let position = first[0].json()["position"].as_str().unwrap().to_owned();
    let from = app.post_json(&format!("/api/webhooks/{id}/replay"), &json!({"after": position})).await;
    assert_eq!(from.json["queued"], 1);
    app.post_json(&format!("/api/webhooks/{id}/replay"), &json!({"after": "x"}))
        .await
        .assert_error(400, "INVALID_REQUEST");
    app.post_json("/api/webhooks/99/replay", &json!({})).await.assert_error(404, "WEBHOOK_NOT_FOUND");
}

/// Two replicas on one database deliver every event, none of them twice at once; the
/// deliveries of each are leased to one replica at a time.
#[tokio::test]
async fn two_replicas_share_the_deliveries() {
    let app = webhook_app(0.001).await;
    let mut config = order_api::config::Config {
        database_url: app.database_url.clone(),
        port: 0,
        webhook_allow_http: true,
        webhook_allowed_hosts: vec!["127.0.0.1".to_owned()],
        webhook_retry_scale: 0.001,
        ..order_api::config::Config::default()
    };
    config.migrate_on_start = false;
    let _other = common::spawn_app_at(config).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(200).after(Duration::from_millis(20))]);
    register(&app, &receiver.url(), &[]).await;
    for i in 0..30 {
        app.order(2 + i % 2, 1).await;
    }
    let expected = app.count("events").await as usize;
    let received = receiver.wait_until(Duration::from_secs(30), |r| deduplicated(r).len() >= expected).await;
    assert_eq!(deduplicated(&received).len(), expected);
    assert_eq!(receiver.overlaps(), 0);
}

/// A backlog that grows from nothing gets new statistics from the dispatcher (not only from
/// autovacuum, a minute later): claims planned with the statistics of an empty table read the
/// endpoint's whole pending index per candidate (db/webhooks.rs, `analyze_deliveries`).
#[tokio::test]
async fn a_growing_backlog_gets_new_statistics() {
    let app = webhook_app(1.0).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500)]);
    register(&app, &receiver.url(), &[]).await;
    // 1,500 events of one product (a stream, one attempt at a time), failing: they stay pending.
    app.db
        .execute(
            "INSERT INTO events (type, product_id, sequence, data)
             SELECT 'product.restocked', 1, (SELECT coalesce(max(sequence), 0) FROM events WHERE product_id = 1) + g,
                    '{}'
             FROM generate_series(1, 1500) AS g",
            &[],
        )
        .await
        .unwrap();
    let analyzed = "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'webhook_deliveries'";
    let started = std::time::Instant::now();
    loop {
        let count: i64 = app.db.query_one(analyzed, &[]).await.unwrap().get(0);
        if count > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "webhook_deliveries never analyzed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pending = app.count("webhook_deliveries").await;
    assert!(pending >= 1_000, "{pending} deliveries");
}

/// Delivery does not touch the health of the service: /health/ready stays 200 with an endpoint
/// that fails every attempt.
#[tokio::test]
async fn a_failing_endpoint_leaves_readiness_alone() {
    let app = webhook_app(0.001).await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500)]);
    let (id, _) = register(&app, &receiver.url(), &[]).await;
    app.order(2, 1).await;
    wait_for_attempts(&app, id, 3).await;
    assert_eq!(app.get("/health/ready").await.status, 200);
    let metrics = app.get("/metrics").await.text;
    assert!(metrics.contains("order_api_webhook_attempts_total{outcome=\"retry\"}"), "{metrics}");
}
