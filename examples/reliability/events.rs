//! The verdict on order events (CONTRACT part 5) of the `events` and `failover` scenarios:
//! what an endpoint should have received, computed from the database's committed changes,
//! against what the receiver (`receiver.rs`) got.
//!
//! - **Expected**: every event committed after the endpoint was registered (the endpoint gets
//!   those; `replay` sends earlier ones), each cross-checked with the change it reports: an
//!   `order.cancelled` with an order that is cancelled, a `product.restocked` with a restock
//!   movement of the inventory ledger, a `product.sold_out` with a stock of 0, every event's
//!   data with its own order or product. An event without its change is a phantom even before
//!   it is sent. Every order a client was told was placed (201) has its `order.created`, and
//!   every cancellation acknowledged (200) its `order.cancelled`.
//! - **Received, after dedupe** on `webhook-id` (each event once, as a receiver that keeps the
//!   ids it processed sees it): missing (expected, never answered 2xx), phantom (received, not
//!   among the expected: an event for nothing committed), altered (a type, stream or sequence
//!   other than the database's, a body that changed between attempts, a `webhook-id` other
//!   than the body's `id`).
//! - **In sequence**: per order and per product, no attempt of an event arrived before the
//!   answer that delivered the event before it (the service sends the next only after the
//!   previous was delivered or given up; nothing is given up here).
//! - **Counted, not failed**: duplicates before dedupe (attempts of an event already
//!   delivered: a replica killed after the receiver's answer, an outcome lost with
//!   PostgreSQL), and the attempts by answer.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio_postgres::Client;

use super::{
    Expectations, OPERATOR_TOKEN,
    receiver::{Attempt, Receiver, Reply},
};

/// Registers `url` for every event type through the operator API; the endpoint's id and
/// signing secret.
pub async fn register_endpoint(base: &str, url: &str) -> Result<(i64, String), String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let reply = http
        .post(format!("{base}/api/webhooks"))
        .bearer_auth(OPERATOR_TOKEN)
        .json(&json!({"url": url, "types": [], "description": "chaos receiver"}))
        .send()
        .await
        .map_err(|e| format!("registering the endpoint: {e}"))?;
    let status = reply.status();
    let body: Value = reply.json().await.unwrap_or(Value::Null);
    match (status.as_u16(), body["id"].as_i64(), body["secret"].as_str()) {
        (201, Some(id), Some(secret)) => Ok((id, secret.to_owned())),
        _ => Err(format!("registering the endpoint: {status} {body}")),
    }
}

/// Where the events an endpoint should get begin: the newest event and ledger movement
/// before it was registered. Read while nothing writes, just before registering.
#[derive(Debug, Clone, Copy)]
pub struct Baseline {
    pub event_id: i64,
    pub movement_id: i64,
}

pub async fn baseline(db: &Client) -> Baseline {
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(max(id), 0) FROM events), (SELECT coalesce(max(id), 0) FROM inventory_movements)",
            &[],
        )
        .await
        .expect("read the baseline");
    Baseline { event_id: row.get(0), movement_id: row.get(1) }
}

/// The endpoint's deliveries: (pending, delivered, failed).
async fn delivery_states(db: &Client, endpoint: i64) -> Result<(i64, i64, i64), tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'pending'), count(*) FILTER (WHERE state = 'delivered'),
                    count(*) FILTER (WHERE state = 'failed')
             FROM webhook_deliveries WHERE endpoint_id = $1",
            &[&endpoint],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Waits (at most `limit`) until every event after the baseline is delivered: recorded so by
/// the service, nothing pending, and answered 2xx by the receiver. Returns how long it took,
/// or what was still outstanding.
pub async fn wait_drained(
    db: &Client,
    receiver: &Receiver,
    endpoint: i64,
    baseline: Baseline,
    limit: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let outstanding = async {
            let events: i64 =
                db.query_one("SELECT count(*) FROM events WHERE id > $1", &[&baseline.event_id]).await?.get(0);
            let (pending, delivered, failed) = delivery_states(db, endpoint).await?;
            Ok::<_, tokio_postgres::Error>((events, pending, delivered, failed))
        }
        .await;
        let received = receiver.delivered_ids() as i64;
        match outstanding {
            Ok((events, 0, delivered, failed)) if delivered + failed >= events && received >= events => {
                return Ok(started.elapsed());
            }
            Ok((events, pending, delivered, failed)) if started.elapsed() > limit => {
                return Err(format!(
                    "not drained within {limit:?}: {events} events, deliveries {pending} pending, {delivered} \
                     delivered, {failed} failed; {received} received"
                ));
            }
            Err(e) if started.elapsed() > limit => return Err(format!("not drained within {limit:?}: {e}")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A delivery leased at some moment: id, lease token, attempts made.
pub type Leased = Vec<(i64, i64, i32)>;

/// The endpoint's deliveries leased now.
pub async fn leased_now(db: &Client, endpoint: i64) -> Leased {
    db.query(
        "SELECT id, lease, attempts FROM webhook_deliveries
         WHERE endpoint_id = $1 AND state = 'pending' AND lease IS NOT NULL AND leased_until > now()",
        &[&endpoint],
    )
    .await
    .map(|rows| rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect())
    .unwrap_or_default()
}

/// How long each of `leased` took to move on (its attempt recorded, or leased again under
/// another token), polled every 100 ms for at most `limit` on a connection of its own to `url`
/// (made again when PostgreSQL restarts); None for those that never did.
pub async fn wait_resumed(url: &str, leased: &Leased, limit: Duration) -> Vec<Option<Duration>> {
    let started = Instant::now();
    let mut resumed: Vec<Option<Duration>> = vec![None; leased.len()];
    let ids: Vec<i64> = leased.iter().map(|(id, _, _)| *id).collect();
    let mut db: Option<Client> = None;
    while resumed.iter().any(Option::is_none) && started.elapsed() < limit {
        if db.as_ref().is_none_or(Client::is_closed) {
            db = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    Some(client)
                }
                Err(_) => None,
            };
        }
        let rows = match &db {
            Some(db) => {
                db.query("SELECT id, lease, attempts, state FROM webhook_deliveries WHERE id = ANY ($1)", &[&ids]).await
            }
            None => Ok(Vec::new()),
        };
        if let Ok(rows) = rows
            && !rows.is_empty()
        {
            let now: HashMap<i64, (Option<i64>, i32, String)> =
                rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3)))).collect();
            for (i, (id, lease, attempts)) in leased.iter().enumerate() {
                let moved = match now.get(id) {
                    Some((now_lease, now_attempts, state)) => {
                        now_lease.is_some_and(|l| l != *lease) || now_attempts > attempts || state != "pending"
                    }
                    None => true,
                };
                if moved && resumed[i].is_none() {
                    resumed[i] = Some(started.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resumed
}

/// An event as the database holds it, with what its change says.
struct Committed {
    kind: String,
    order_id: Option<i64>,
    product_id: Option<i64>,
    sequence: i64,
    /// Its change is in the database (see the module's comment).
    backed: bool,
}

/// Compares the database's committed events after `baseline` with what the receiver got and
/// what clients were told; the figures and the failures.
/// `acknowledged`: the orders clients were told were placed (201); `cancelled`: the
/// cancellations acknowledged (200).
pub async fn check(
    db: &Client,
    receiver: &Receiver,
    endpoint: i64,
    baseline: Baseline,
    acknowledged: &[i64],
    cancelled: &HashSet<i64>,
) -> (Value, Vec<String>) {
    // One snapshot for all of it: the events, the orders, the ledger.
    let rows = db
        .query(
            "WITH e AS (
                SELECT 'evt_' || replace(e.event_id::text, '-', '') AS public_id, e.type, e.order_id,
                       e.product_id, e.sequence, coalesce(e.data, order_created_json(e.order_id)) AS data
                FROM events AS e WHERE e.id > $1
            ), restocks AS (
                SELECT product_id, count(*) AS n FROM inventory_movements
                WHERE id > $2 AND reason = 'restock' GROUP BY product_id
            ), restock_events AS (
                SELECT product_id, count(*) AS n FROM e WHERE type = 'product.restocked' GROUP BY product_id
            )
            SELECT e.public_id, e.type, e.order_id, e.product_id::int8, e.sequence::int8,
                   CASE e.type
                       WHEN 'order.created' THEN (e.data ->> 'orderId')::int8 = e.order_id
                       WHEN 'order.cancelled' THEN o.status = 'cancelled' AND (e.data ->> 'orderId')::int8 = e.order_id
                       WHEN 'product.restocked' THEN
                           coalesce(r.n, 0) = (SELECT n FROM restock_events AS x WHERE x.product_id = e.product_id)
                           AND (e.data ->> 'id')::int8 = e.product_id
                       WHEN 'product.sold_out' THEN
                           (e.data ->> 'stock')::int8 = 0 AND (e.data ->> 'id')::int8 = e.product_id
                       ELSE o.status IS NOT NULL
                   END
            FROM e
            LEFT JOIN orders AS o ON o.id = e.order_id
            LEFT JOIN restocks AS r ON r.product_id = e.product_id",
            &[&baseline.event_id, &baseline.movement_id],
        )
        .await
        .expect("read the committed events");
    let committed: HashMap<String, Committed> = rows
        .iter()
        .map(|row| {
            let committed = Committed {
                kind: row.get(1),
                order_id: row.get(2),
                product_id: row.get(3),
                sequence: row.get(4),
                backed: row.get::<_, Option<bool>>(5).unwrap_or(false),
            };
            (row.get(0), committed)
        })
        .collect();
    let (pending, delivered_by_service, failed) = delivery_states(db, endpoint).await.unwrap_or((-1, -1, -1));
    let attempts = receiver.attempts();
    let (overlaps, changed_bodies) = receiver.overlaps_and_changed_bodies();

    // Per webhook-id: the first arrival and the first 2xx (ticks), attempts, 2xx answers.
    #[derive(Default)]
    struct Seen {
        first_arrival: u64,
        first_delivered: Option<u64>,
        attempts: u64,
        delivered_answers: u64,
    }
    let mut seen: HashMap<&str, Seen> = HashMap::new();
    let mut mismatched = Vec::new();
    let mut replies: HashMap<&str, u64> = HashMap::new();
    for attempt in &attempts {
        let entry =
            seen.entry(&attempt.webhook_id).or_insert(Seen { first_arrival: attempt.arrived_tick, ..Seen::default() });
        entry.attempts += 1;
        if let Some(tick) = attempt.delivered_tick {
            entry.delivered_answers += 1;
            entry.first_delivered = Some(entry.first_delivered.map_or(tick, |first| first.min(tick)));
        }
        let reply = match attempt.reply {
            Reply::Error => "error_500",
            Reply::Slow(_) => "slow_2xx",
            Reply::Fast => "fast_2xx",
            Reply::BadSignature => "bad_signature_401",
        };
        *replies.entry(reply).or_default() += 1;
        if attempt.webhook_id != attempt.event_id
            || committed.get(&attempt.webhook_id).is_some_and(|c| !same_event(c, attempt))
        {
            mismatched.push(attempt.webhook_id.clone());
        }
    }
    mismatched.sort_unstable();
    mismatched.dedup();

    let delivered: HashSet<&str> =
        seen.iter().filter(|(_, s)| s.first_delivered.is_some()).map(|(id, _)| *id).collect();
    let mut missing: Vec<&str> = committed.keys().map(String::as_str).filter(|id| !delivered.contains(id)).collect();
    missing.sort_unstable();
    let mut phantom: Vec<&str> = seen.keys().copied().filter(|id| !committed.contains_key(*id)).collect();
    phantom.sort_unstable();
    let mut unbacked: Vec<&str> = committed.iter().filter(|(_, c)| !c.backed).map(|(id, _)| id.as_str()).collect();
    unbacked.sort_unstable();

    // What clients were told: each acknowledged order has its order.created, each acknowledged
    // cancellation its order.cancelled, among the committed events after the baseline.
    let has = |kind: &str, order: i64| committed.values().any(|c| c.kind == kind && c.order_id == Some(order));
    let created: HashSet<i64> =
        committed.values().filter(|c| c.kind == "order.created").filter_map(|c| c.order_id).collect();
    let acknowledged_without_event = acknowledged.iter().filter(|id| !created.contains(id)).count();
    let cancelled_without_event = cancelled.iter().filter(|id| !has("order.cancelled", **id)).count();

    // Order within each stream: event n+1 never arrived before the answer that delivered n.
    let mut streams: HashMap<(bool, i64), Vec<(i64, &str)>> = HashMap::new();
    for (id, c) in &committed {
        let stream = match (c.order_id, c.product_id) {
            (Some(order), _) => (true, order),
            (None, Some(product)) => (false, product),
            (None, None) => continue,
        };
        streams.entry(stream).or_default().push((c.sequence, id.as_str()));
    }
    let (mut out_of_sequence, mut first_out_of_sequence) = (0u64, Vec::new());
    for ((is_order, stream), events) in &mut streams {
        events.sort_unstable();
        for pair in events.windows(2) {
            let (previous, next) = (seen.get(pair[0].1), seen.get(pair[1].1));
            let early = match (previous.and_then(|p| p.first_delivered), next) {
                (Some(delivered), Some(next)) => next.first_arrival < delivered,
                // The next arrived, the previous was never delivered.
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if early {
                out_of_sequence += 1;
                if first_out_of_sequence.len() < 5 {
                    let what = if *is_order { "order" } else { "product" };
                    first_out_of_sequence.push(format!("{what} {stream}: sequence {} before {}", pair[1].0, pair[0].0));
                }
            }
        }
    }
    // How fast one product's events went, one at a time: delivered per second over the span
    // from its first to its last delivered attempt.
    let mut per_product: HashMap<i64, Vec<u64>> = HashMap::new();
    for attempt in attempts.iter().filter(|a| a.delivered_tick.is_some()) {
        if let Some(product) = attempt.product_id {
            per_product.entry(product).or_default().push(attempt.at_ms);
        }
    }
    let mut product_rates: Vec<Value> = per_product
        .iter()
        .map(|(product, at)| {
            let span_s = (at.iter().max().unwrap() - at.iter().min().unwrap()) as f64 / 1000.0;
            json!({"product": product, "delivered": at.len(), "per_s": if span_s > 0.0 { (at.len() as f64 / span_s * 10.0).round() / 10.0 } else { 0.0 }})
        })
        .collect();
    product_rates.sort_by_key(|v| v["product"].as_i64());

    let duplicates: u64 = seen.values().map(|s| s.delivered_answers.saturating_sub(1)).sum();
    let redelivered_after_delivery = attempts
        .iter()
        .filter(|a| seen.get(a.webhook_id.as_str()).and_then(|s| s.first_delivered).is_some_and(|t| a.arrived_tick > t))
        .count();
    let bad_signatures = replies.get("bad_signature_401").copied().unwrap_or(0);
    let figures = json!({
        "expected": committed.len(),
        "received_after_dedupe": delivered.len(),
        "missing": missing.len(),
        "phantom": phantom.len(),
        "without_their_change": unbacked.len(),
        "out_of_sequence": out_of_sequence,
        "altered": mismatched.len() as u64 + changed_bodies,
        "attempts": attempts.len(),
        "attempts_by_answer": replies,
        "duplicates_before_dedupe": duplicates,
        "attempts_after_delivery": redelivered_after_delivery,
        "in_flight_twice_at_once": overlaps,
        "deliveries_in_database": {"pending": pending, "delivered": delivered_by_service, "failed": failed},
        "acknowledged_orders_without_order_created": acknowledged_without_event,
        "acknowledged_cancels_without_order_cancelled": cancelled_without_event,
        "by_product": product_rates,
    });
    let mut expect = Expectations::default();
    expect.check(!committed.is_empty(), || "no event was committed after the endpoint was registered".into());
    expect.check(missing.is_empty(), || {
        format!("{} events never delivered (first: {:?})", missing.len(), &missing[..missing.len().min(5)])
    });
    expect.check(phantom.is_empty(), || {
        format!(
            "{} events received that the database does not hold (first: {:?})",
            phantom.len(),
            &phantom[..phantom.len().min(5)]
        )
    });
    expect.check(unbacked.is_empty(), || {
        format!("{} events without their change (first: {:?})", unbacked.len(), &unbacked[..unbacked.len().min(5)])
    });
    expect.check(out_of_sequence == 0, || {
        format!("{out_of_sequence} events arrived before the one before them was delivered: {first_out_of_sequence:?}")
    });
    expect.check(mismatched.is_empty() && changed_bodies == 0, || {
        format!(
            "{} events received unlike the database's, {changed_bodies} bodies changed between attempts (first: {:?})",
            mismatched.len(),
            &mismatched[..mismatched.len().min(5)]
        )
    });
    expect.check(bad_signatures == 0, || format!("{bad_signatures} attempts whose signature did not verify"));
    expect.check(overlaps == 0, || format!("{overlaps} times one event was in flight twice at once"));
    expect.check(failed == 0 && pending == 0, || format!("deliveries left: {pending} pending, {failed} given up"));
    expect.check(acknowledged_without_event == 0 && cancelled_without_event == 0, || {
        format!("{acknowledged_without_event} acknowledged orders without order.created, {cancelled_without_event} acknowledged cancels without order.cancelled")
    });
    (figures, expect.0)
}

/// Whether an attempt carries the event as the database holds it.
fn same_event(committed: &Committed, attempt: &Attempt) -> bool {
    committed.kind == attempt.kind
        && committed.order_id == attempt.order_id
        && committed.product_id == attempt.product_id
        && committed.sequence == attempt.sequence
}
