//! Order events (CONTRACT part 5): written in the change's own transaction, exactly once per
//! committed change and never for one that did not commit; numbered per order and per
//! product; read in commit order from the feed, with long-polls woken by the commit; kept for
//! `EVENT_RETENTION_DAYS`.

use std::time::Duration;

use futures::future::join_all;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    auth::{customer, jwt_app, send},
    common::{self, OPERATOR_TOKEN, TestApp, order_body, spawn_app, spawn_app_with},
};

/// Every event in the feed, read a page at a time from the start.
async fn all_events(app: &TestApp) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = String::new();
    for _ in 0..1_000 {
        let path = if after.is_empty() {
            "/api/events?limit=7".to_owned()
        } else {
            format!("/api/events?limit=7&after={after}")
        };
        let page = app.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let batch = page.json["events"].as_array().unwrap().clone();
        after = page.json["next"].as_str().unwrap().to_owned();
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
    panic!("the feed never ended");
}

/// The events of `kind` about order `order_id`.
fn of_order<'a>(events: &'a [Value], kind: &str, order_id: i64) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind && e["orderId"] == order_id).collect()
}

/// A created order has exactly one `order.created`, numbered 1, whose data is the order as
/// GET shows it; cancelling adds `order.cancelled` (2) with the cancelled order, once however
/// often it is cancelled; shipping and delivering add theirs. Each event has a unique
/// `evt_` id and its user.
#[tokio::test]
async fn each_change_writes_its_event_once_with_the_order_as_it_stands() {
    let app = spawn_app().await;
    let cancelled = app.order(2, 3).await;
    let shipped = app.order(3, 1).await;
    let created_data = app.get(&format!("/api/orders/{cancelled}")).await.json;
    for _ in 0..3 {
        assert_eq!(app.cancel(cancelled).await.status, 200);
    }
    app.set_status(shipped, "shipped").await;
    app.set_status(shipped, "shipped").await;
    app.set_status(shipped, "delivered").await;

    let events = all_events(&app).await;
    let created = of_order(&events, "order.created", cancelled);
    assert_eq!(created.len(), 1, "{events:#?}");
    assert_eq!(created[0]["sequence"], 1);
    assert_eq!(created[0]["userId"], 1);
    assert_eq!(created[0]["data"], created_data);
    let cancel = of_order(&events, "order.cancelled", cancelled);
    assert_eq!(cancel.len(), 1, "{events:#?}");
    assert_eq!(cancel[0]["sequence"], 2);
    assert_eq!(cancel[0]["data"], app.get(&format!("/api/orders/{cancelled}")).await.json);
    assert_eq!(cancel[0]["data"]["status"], "cancelled");

    let kinds: Vec<(&str, i64)> = events
        .iter()
        .filter(|e| e["orderId"] == shipped)
        .map(|e| (e["type"].as_str().unwrap(), e["sequence"].as_i64().unwrap()))
        .collect();
    assert_eq!(kinds, [("order.created", 1), ("order.shipped", 2), ("order.delivered", 3)]);
    assert_eq!(
        of_order(&events, "order.delivered", shipped)[0]["data"],
        app.get(&format!("/api/orders/{shipped}")).await.json
    );

    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert!(ids.iter().all(|id| id.len() == 36 && id.starts_with("evt_")), "{ids:?}");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
    assert_eq!(app.count("events").await as usize, events.len());
}

/// A restock writes `product.restocked` with the product as GET shows it; an order that takes
/// the last unit writes `product.sold_out` after its `order.created`; the product's events are
/// numbered 1, 2, 3 in order.
#[tokio::test]
async fn product_events_follow_restocks_and_the_last_unit() {
    let app = spawn_app().await;
    app.restock(4, 2).await;
    let last = app.order(4, 7).await;
    app.restock(4, 1).await;
    let events = all_events(&app).await;
    let product: Vec<(&str, i64, i64)> = events
        .iter()
        .filter(|e| e["productId"] == 4)
        .map(|e| (e["type"].as_str().unwrap(), e["sequence"].as_i64().unwrap(), e["data"]["stock"].as_i64().unwrap()))
        .collect();
    assert_eq!(product, [("product.restocked", 1, 7), ("product.sold_out", 2, 0), ("product.restocked", 3, 1)]);
    let restocked = events.iter().rev().find(|e| e["type"] == "product.restocked").unwrap();
    assert_eq!(restocked["data"], app.get("/api/products/4").await.json);
    assert!(restocked.get("orderId").is_none() && restocked.get("userId").is_none());
    let created = events.iter().position(|e| e["type"] == "order.created" && e["orderId"] == last).unwrap();
    let sold_out = events.iter().position(|e| e["type"] == "product.sold_out").unwrap();
    assert!(created < sold_out, "sold out after the order that emptied it");
}

/// Refused orders (stock, unknown product or user, bad input), a replay of a keyed order and an
/// order whose transaction fails write no event; the other orders of a failed batch do.
#[tokio::test]
async fn nothing_that_did_not_commit_has_an_event_and_a_replay_has_no_second() {
    let app = spawn_app_with(|config| config.order_batch_max = 64).await;
    let keyed = app.post_order_with_key("k", &order_body(1, 2, 1)).await;
    assert_eq!(keyed.status, 201);
    assert_eq!(app.post_order_with_key("k", &order_body(1, 2, 1)).await.header("idempotent-replayed"), Some("true"));
    // Each refusal without a key and with one (a keyed order draws its id when its key is
    // claimed, before its stock is known: place/keys.rs), and the keyed one replayed.
    let refusals = [order_body(1, 1, 11), order_body(1, 99, 1), order_body(9, 2, 1), json!({"userId": 1, "items": []})];
    for (i, refused) in refusals.iter().enumerate() {
        let reply = app.post_order(refused).await;
        assert_eq!(reply.status, 400, "{}", reply.text);
        for _ in 0..2 {
            let reply = app.post_order_with_key(&format!("refused-{i}"), refused).await;
            assert_eq!(reply.status, 400, "{}", reply.text);
        }
    }
    app.fail_payments().await;
    let body = order_body(1, 3, 1);
    let failed = join_all((0..6).map(|i| {
        let (app, body) = (&app, &body);
        async move {
            match i % 2 {
                0 => app.post_order(body).await,
                _ => app.post_order_with_key(&format!("failed-{i}"), body).await,
            }
        }
    }))
    .await;
    assert!(failed.iter().all(|reply| reply.status == 500), "{failed:?}");
    app.allow_payments().await;
    let events = all_events(&app).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["orderId"], keyed.json["orderId"]);
}

/// Orders placed concurrently in batches: one `order.created` per acknowledged order, none
/// for any other, and none twice.
#[tokio::test]
async fn every_acknowledged_order_of_concurrent_batches_has_exactly_one_created_event() {
    every_acknowledged_order_has_exactly_one_created_event(64).await;
}

/// The same, one order per transaction (those wait for their locks: place/round.rs).
#[tokio::test]
async fn every_acknowledged_order_placed_one_by_one_has_exactly_one_created_event() {
    every_acknowledged_order_has_exactly_one_created_event(1).await;
}

async fn every_acknowledged_order_has_exactly_one_created_event(batch_max: usize) {
    let app = spawn_app_with(|config| config.order_batch_max = batch_max).await;
    // Names that JSON must escape, so that the byte-for-byte check below covers escaping.
    app.db
        .batch_execute(
            "UPDATE products SET name = E'Laptop \"Pro\" \\\\ \\t\u{fc} \u{1F600} </script>' WHERE id = 1;
             UPDATE users SET email = E'o''brien+\"x\"\\\\@example.com' WHERE id = 2",
        )
        .await
        .unwrap();
    let mut bodies: Vec<Value> = (0..120).map(|i| order_body(1 + i % 2, 1 + i % 4, 1 + i % 3)).collect();
    bodies.extend((0..8).map(
        |i| json!({"userId": 1 + i % 2, "items": [{"productId": 3, "quantity": 1}, {"productId": 1, "quantity": 2}]}),
    ));
    // A third with a key: their ids are drawn with the key's claim (place/keys.rs).
    let app = &app;
    let replies = join_all(bodies.iter().enumerate().map(|(i, body)| async move {
        match i % 3 {
            0 => app.post_order_with_key(&format!("key-{i}"), body).await,
            _ => app.post_order(body).await,
        }
    }))
    .await;
    let mut acknowledged: Vec<i64> =
        replies.iter().filter(|r| r.status == 201).map(|r| r.json["orderId"].as_i64().unwrap()).collect();
    assert!(!acknowledged.is_empty());
    let failed: Vec<_> = replies.iter().filter(|r| r.status >= 500).map(|r| (r.status, &r.json)).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let events = all_events(app).await;
    let mut created: Vec<i64> =
        events.iter().filter(|e| e["type"] == "order.created").map(|e| e["orderId"].as_i64().unwrap()).collect();
    acknowledged.sort_unstable();
    created.sort_unstable();
    assert_eq!(created, acknowledged);
    // An order.created row stores no data: the feed builds it from the order's rows
    // (sql/0010). What it serves is what order_json (sql/0006, used by every other order
    // event) makes of the order, here byte for byte, escapes included.
    let stored: i64 = app
        .db
        .query_one("SELECT count(*) FROM events WHERE type = 'order.created' AND data IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    let mut path = "/api/events?types=order.created&limit=1".to_owned();
    for _ in &created {
        let page = app.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.text);
        path = format!("/api/events?types=order.created&limit=1&after={}", page.json["next"].as_str().unwrap());
        let id = page.json["events"][0]["orderId"].as_i64().unwrap();
        let order: String = app.db.query_one("SELECT order_json($1)::text", &[&id]).await.unwrap().get(0);
        let served = page.text.split_once(",\"data\":").unwrap().1;
        assert!(served.starts_with(&format!("{order}}}]")), "order {id}: served {served}, order_json {order}");
    }
    app.assert_invariants().await;
}

/// The feed in commit order. An order's transaction is held open after it took its locks (a
/// trigger waits on an advisory lock the test holds), so it has the smaller transaction id;
/// orders placed after it commit first. (It waits longer than the lock patience of its first
/// transaction, which gives up and runs it again in a second: the test goes on once that one
/// waits, so that it is older than the later orders.) A reader reading all along sees none of them while
/// the early one is open (handing them out would let the early one's event appear before a
/// position already given); once it commits, the reader gets it, then the later ones, and a
/// full re-read from the start gives exactly what the reader saw, in the same order.
#[tokio::test]
async fn a_late_commit_is_never_skipped_and_re_reading_gives_the_same_sequence() {
    let app = spawn_app_with(|config| {
        config.order_batch_max = 64;
        config.statement_timeout = Duration::from_secs(20);
    })
    .await;
    app.order(2, 1).await;
    let mut reader = Reader::new(&app).await;
    assert_eq!(reader.seen.len(), 1);
    let holder = common::connect(&app.database_url).await;
    holder.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();
    app.db
        .batch_execute(
            "CREATE FUNCTION hold_headphones() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN IF NEW.amount = 2500.00 THEN PERFORM pg_advisory_xact_lock(4242); END IF; RETURN NEW; END $$;
             CREATE TRIGGER hold_headphones BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION hold_headphones();",
        )
        .await
        .unwrap();
    let late = app.spawn_order(None, order_body(1, 4, 1));
    app.wait_for_a_lock_waiter_older_than(Duration::from_secs(1)).await;
    let later: Vec<i64> = {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(app.order(3, 1).await);
            reader.read().await;
        }
        ids
    };
    assert_eq!(reader.seen.len(), 1, "handed out past a transaction still open: {:#?}", reader.seen);
    holder.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    let late = late.await.unwrap();
    assert_eq!(late.status, 201, "{}", late.text);
    for _ in 0..100 {
        if reader.read().await && reader.seen.len() == 5 {
            break;
        }
    }
    let order_ids: Vec<i64> = reader.seen.iter().map(|e| e["orderId"].as_i64().unwrap()).collect();
    assert_eq!(order_ids[1], late.json["orderId"].as_i64().unwrap(), "the late event first: {order_ids:?}");
    assert_eq!(order_ids[2..], later[..]);
    assert_eq!(all_events(&app).await, reader.seen, "a re-read gives what the reader saw");
}

/// An incremental reader of the feed: reads from where it stopped, keeps what it was given.
struct Reader<'a> {
    app: &'a TestApp,
    next: Option<String>,
    seen: Vec<Value>,
}

impl<'a> Reader<'a> {
    async fn new(app: &'a TestApp) -> Reader<'a> {
        let mut reader = Reader { app, next: None, seen: Vec::new() };
        reader.read().await;
        reader
    }

    /// One read (waiting up to a second for events); whether it got any.
    async fn read(&mut self) -> bool {
        let path = match &self.next {
            Some(after) => format!("/api/events?wait=1&after={after}"),
            None => "/api/events?wait=1".to_owned(),
        };
        let page = self.app.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let next = page.json["next"].as_str().unwrap().to_owned();
        if let Some(previous) = &self.next {
            assert!(position(&next) >= position(previous), "the feed went back: {previous} -> {next}");
        }
        self.next = Some(next);
        let events = page.json["events"].as_array().unwrap();
        self.seen.extend(events.iter().cloned());
        !events.is_empty()
    }
}

fn position(text: &str) -> (i64, i64) {
    let (tx, id) = text.split_once('-').unwrap();
    (tx.parse().unwrap(), id.parse().unwrap())
}

/// A long-poll waits for an event and is woken by the commit, long before its wait is over
/// (the 100 ms target is measured by `make bench`); with nothing coming it answers an empty
/// page at the end of its wait, with a position to go on from.
#[tokio::test]
async fn a_long_poll_is_woken_by_the_commit() {
    let app = spawn_app().await;
    let woken = woken_by_an_order(&app, &app).await;

    let next = woken.json["next"].as_str().unwrap();
    let empty = app.get(&format!("/api/events?wait=1&after={next}")).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json["events"], json!([]));
    assert!(position(empty.json["next"].as_str().unwrap()) >= position(next), "{}", empty.text);
}

/// Another replica's long-poll is woken too: an order batch's commit is announced to the
/// others by a NOTIFY sent after it (db/events.rs, `Announcer`), not from its transaction.
#[tokio::test]
async fn a_long_poll_on_another_replica_is_woken_by_the_commit() {
    let app = spawn_app().await;
    let mut config = order_api::config::Config {
        database_url: app.database_url.clone(),
        port: 0,
        ..order_api::config::Config::default()
    };
    config.migrate_on_start = false;
    let other = common::spawn_app_at(config).await;
    woken_by_an_order(&other, &app).await;
}

/// A long-poll (25 s) on `reader` from the end of the feed, and an order placed on `writer`
/// once it waits: the poll's answer, checked to hold the order's event and to have come long
/// before its wait was over.
async fn woken_by_an_order(reader: &TestApp, writer: &TestApp) -> common::Reply {
    let start = reader.get("/api/events").await.json["next"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let waiting = {
        let (http, url) = (reader.http.clone(), reader.url(&format!("/api/events?wait=25&after={start}")));
        tokio::spawn(async move { common::Reply::read(http.get(url).send().await.unwrap()).await })
    };
    wait_for_metric(reader, "order_api_event_feed_reads_open", 1.0).await;
    let order = writer.order(2, 1).await;
    let woken = waiting.await.unwrap();
    assert_eq!(woken.status, 200, "{}", woken.text);
    assert!(started.elapsed() < Duration::from_secs(20), "not woken by the commit: {:?}", started.elapsed());
    assert_eq!(woken.json["events"][0]["orderId"], order);
    woken
}

/// Polls `/metrics` until `name` has `value` (bounded: 10 s).
async fn wait_for_metric(app: &TestApp, name: &str, value: f64) {
    for _ in 0..1_000 {
        let text = app.get("/metrics").await.text;
        let current =
            text.lines().find_map(|line| line.strip_prefix(&format!("{name} "))).and_then(|v| v.parse::<f64>().ok());
        if current == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never reached {value}");
}

/// `types` filters; `limit` pages; a page's `next` goes on where it stopped.
#[tokio::test]
async fn the_feed_filters_by_type_and_pages() {
    let app = spawn_app().await;
    let first = app.order(2, 1).await;
    app.cancel(first).await;
    app.order(2, 1).await;
    app.restock(1, 1).await;
    let cancels = app.get("/api/events?types=order.cancelled").await;
    assert_eq!(cancels.json["events"].as_array().unwrap().len(), 1, "{}", cancels.text);
    let two = app.get("/api/events?types=order.created,product.restocked&limit=2").await;
    let kinds: Vec<&str> = two.json["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["order.created", "order.created"]);
    let rest = app
        .get(&format!("/api/events?types=order.created,product.restocked&after={}", two.json["next"].as_str().unwrap()))
        .await;
    let kinds: Vec<&str> =
        rest.json["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["product.restocked"]);
}

/// Bad parameters are 400 with a sentence saying which; nothing else happens.
#[tokio::test]
async fn bad_feed_parameters_are_invalid_requests() {
    let app = spawn_app().await;
    for query in [
        "after=",
        "after=12",
        "after=a-1",
        "after=1-2-3",
        "after=-1-2",
        "limit=0",
        "limit=1001",
        "limit=x",
        "types=order.paid",
        "types=",
        "types=order.created,",
        "wait=31",
        "wait=-1",
        "wait=1.5",
    ] {
        let reply = app.get(&format!("/api/events?{query}")).await;
        reply.assert_error(400, "INVALID_REQUEST");
    }
}

/// Events older than `EVENT_RETENTION_DAYS` are purged, oldest first; a position before the
/// purge is 410 CURSOR_EXPIRED, and reading without one starts at the oldest event kept.
#[tokio::test]
async fn purged_events_expire_their_positions() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.order(2, 1).await;
    }
    let events = all_events(&app).await;
    let kept_from = events[2]["position"].as_str().unwrap();
    app.db
        .execute(
            "UPDATE events SET occurred_at = now() - interval '31 days' WHERE order_id <= $1",
            &[&events[1]["orderId"].as_i64().unwrap()],
        )
        .await
        .unwrap();
    let pool = order_api::db::Pool::new(app.database_url.parse().unwrap(), pool_settings());
    let purged = order_api::db::events::purge(&pool, Duration::from_secs(30 * 24 * 3600)).await.unwrap();
    assert_eq!(purged, 2);
    let expired = app.get(&format!("/api/events?after={}", events[0]["position"].as_str().unwrap())).await;
    expired.assert_error(410, "CURSOR_EXPIRED");
    let from_start = app.get("/api/events").await;
    assert_eq!(from_start.json["events"][0]["position"], kept_from);
    let last_purged = events[1]["position"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/api/events?after={last_purged}")).await.status,
        200,
        "the purge point itself is still good"
    );
}

fn pool_settings() -> order_api::db::PoolSettings {
    order_api::db::PoolSettings {
        max_size: 1,
        acquire_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
        unnamed_statements: false,
        max_lifetime: Duration::from_secs(60),
    }
}

/// The feed is an operator's: without the token 401, with a customer's 403. In jwt mode a
/// customer reads the events of their own order, and another's order is 404.
#[tokio::test]
async fn the_feed_is_for_operators_and_an_orders_events_for_its_customer() {
    let app = spawn_app().await;
    assert_eq!(send(&app, Method::GET, "/api/events", None, None).await.status, 401);
    assert_eq!(
        send(&app, Method::GET, "/api/events", Some("wrong-token-wrong-token-wrong-token"), None).await.status,
        401
    );
    assert_eq!(send(&app, Method::GET, "/api/events", Some(OPERATOR_TOKEN), None).await.status, 200);

    let app = jwt_app().await;
    let created = send(
        &app,
        Method::POST,
        "/api/orders",
        Some(&customer(1)),
        Some(json!({"items": [{"productId": 2, "quantity": 1}]})),
    )
    .await;
    let order = created.json["orderId"].as_i64().unwrap();
    let own = send(&app, Method::GET, &format!("/api/orders/{order}/events"), Some(&customer(1)), None).await;
    assert_eq!(own.status, 200, "{}", own.text);
    assert_eq!(own.json["events"][0]["type"], "order.created");
    let other = send(&app, Method::GET, &format!("/api/orders/{order}/events"), Some(&customer(2)), None).await;
    other.assert_error(404, "ORDER_NOT_FOUND");
    send(&app, Method::GET, "/api/events", Some(&customer(1)), None).await.assert_error(403, "FORBIDDEN");
    assert_eq!(send(&app, Method::GET, &format!("/api/orders/{order}/events"), None, None).await.status, 401);
    send(&app, Method::GET, "/api/orders/999/events", Some(&customer(1)), None)
        .await
        .assert_error(404, "ORDER_NOT_FOUND");
}

/// `order-api audit` checks the events against the orders: an order whose `order.created` is
/// gone, or whose events skip a number, is reported.
#[tokio::test]
async fn the_audit_finds_missing_events_gaps_and_events_of_nothing() {
    let app = spawn_app().await;
    let created = app.order(2, 1).await;
    let shipped = app.order(3, 1).await;
    app.set_status(shipped, "shipped").await;
    app.set_status(shipped, "delivered").await;
    app.assert_invariants().await;
    app.db.execute("DELETE FROM events WHERE order_id = $1", &[&created]).await.unwrap();
    app.db.execute("DELETE FROM events WHERE order_id = $1 AND sequence = 2", &[&shipped]).await.unwrap();
    // An event of an order that does not exist (no foreign key refuses it since migration 0009).
    let nothing = shipped + 1_000;
    app.db
        .execute(
            "INSERT INTO events (type, order_id, user_id, sequence, data) VALUES ('order.created', $1, 1, 1, '{}')",
            &[&nothing],
        )
        .await
        .unwrap();
    let mut client = common::connect(&app.database_url).await;
    let audit = order_api::db::audit::audit(&mut client).await.unwrap();
    assert_eq!(audit.orders_with_wrong_events.first_order_ids, [created, shipped], "{audit:#?}");
    assert_eq!(audit.sequence_gaps.first_order_ids, [shipped], "{audit:#?}");
    assert_eq!(audit.events_of_nothing.first_order_ids, [nothing], "{audit:#?}");
    assert_eq!(audit.violations().len(), 3, "{:?}", audit.violations());
}
