//! Traces (issue 22), checked at a real collector: an OTLP/HTTP receiver on 127.0.0.1 decodes
//! the protobuf the service sends (`common::otlp`).
//!
//! The first test runs the real binary with the standard `OTEL_*` variables (the set-up of
//! `main`, the flush at exit, the trace ids in the log). The others run the server in-process
//! with the telemetry as the default subscriber of the test's own thread (`#[tokio::test]` is
//! single-threaded: the server's tasks run there too), so that tests running beside them in
//! the same process never send their spans here.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use tracing::dispatcher::DefaultGuard;

use crate::common::{
    TestApp, TestDatabase, order_body,
    otlp::{OtlpReceiver, ReceivedSpan},
    process::ServerProcess,
    raw,
    receiver::{Answer, Receiver},
    spawn_app_with,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const ORDER_PARENT: &str = "00f067aa0ba902b7";
const CANCEL_PARENT: &str = "b7ad6b7169203331";

fn traceparent(trace_id: &str, parent: &str, sampled: bool) -> String {
    format!("00-{trace_id}-{parent}-{}", if sampled { "01" } else { "00" })
}

/// OTLP's span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

/// The real binary, given an OTLP endpoint by the standard variables, exports its spans: the
/// request's span is the child of the caller's `traceparent` (same trace id, the caller's span
/// as parent, `tracestate` kept), with the route and status; a placed order's batch starts a
/// trace of its own, linked to the request, with its database round trips under it; a
/// cancel's round trips are children of the cancel's own span; a request without
/// `traceparent` starts a new trace; probes make no span. The resource names the service as
/// configured, with its version. Every request's log line carries its trace and span ids.
#[tokio::test]
async fn the_binary_exports_request_batch_and_database_spans_with_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let database = TestDatabase::create().await;
    let endpoint = receiver.endpoint();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "order-api-under-test"),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
    ];
    let mut server = ServerProcess::start_with_env(&database.url, &env).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let order = http
        .post(server.url("/api/orders"))
        .header("x-request-id", "traced-order")
        .header("traceparent", traceparent(TRACE, ORDER_PARENT, true))
        .header("tracestate", "vendor=opaque")
        .json(&order_body(1, 2, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);
    let order_id = order.json::<Value>().await.unwrap()["orderId"].as_i64().unwrap();
    let cancel = http
        .put(server.url(&format!("/api/orders/{order_id}/cancel")))
        .header("x-request-id", "traced-cancel")
        .header("traceparent", traceparent(TRACE, CANCEL_PARENT, true))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let read = http.get(server.url("/api/products/1")).header("x-request-id", "untraced-read").send().await.unwrap();
    assert_eq!(read.status(), 200);

    server.terminate();
    assert!(server.wait_for_exit(Duration::from_secs(10)).await.is_some_and(|status| status.success()));
    let logs = server.logs();
    let spans = receiver
        .wait_for("the spans of three requests", |spans| spans.iter().filter(|s| s.kind == SERVER).count() >= 3)
        .await;
    assert_eq!(receiver.requests().1, 0, "every export decoded as OTLP protobuf at /v1/traces");

    let request = |id: &str| -> &ReceivedSpan {
        spans
            .iter()
            .find(|s| s.kind == SERVER && s.attribute("request_id") == Some(id))
            .unwrap_or_else(|| panic!("no request span for {id}: {spans:#?}"))
    };
    let order_span = request("traced-order");
    assert_eq!(order_span.name, "POST /api/orders");
    assert_eq!((order_span.trace_id.as_str(), order_span.parent_span_id.as_str()), (TRACE, ORDER_PARENT));
    assert_eq!(order_span.trace_state, "vendor=opaque");
    assert_eq!(order_span.attribute("http.route"), Some("/api/orders"));
    assert_eq!(order_span.attribute("http.request.method"), Some("POST"));
    assert_eq!(order_span.attribute("http.response.status_code"), Some("201"));
    assert_ne!(order_span.status_code, 2, "a 201 is no error: {order_span:?}");
    assert_eq!(order_span.resource.get("service.name").map(String::as_str), Some("order-api-under-test"));
    assert_eq!(order_span.resource.get("service.version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(order_span.resource.get("deployment.environment").map(String::as_str), Some("test"));

    let batch = spans
        .iter()
        .find(|s| s.name == "batch" && s.links.contains(&(TRACE.to_owned(), order_span.span_id.clone())))
        .unwrap_or_else(|| panic!("no batch span linked to the order's request: {spans:#?}"));
    assert!(batch.parent_span_id.is_empty(), "a batch starts its own trace: {batch:?}");
    let batch_round_trips = children(&spans, batch);
    assert!(!batch_round_trips.is_empty(), "no database round trip under the batch: {spans:#?}");
    for round_trip in &batch_round_trips {
        assert_eq!((round_trip.kind, round_trip.attribute("db.system.name")), (CLIENT, Some("postgresql")));
    }

    let cancel_span = request("traced-cancel");
    assert_eq!((cancel_span.trace_id.as_str(), cancel_span.parent_span_id.as_str()), (TRACE, CANCEL_PARENT));
    assert_eq!(cancel_span.attribute("http.route"), Some("/api/orders/{orderId}/cancel"));
    let cancel_round_trips = children(&spans, cancel_span);
    assert!(!cancel_round_trips.is_empty(), "the cancel's round trips are its children: {spans:#?}");
    assert!(
        cancel_round_trips.iter().any(|s| s.attribute("db.query.text").is_some_and(|text| text.contains("UPDATE"))),
        "a sampled round trip has its statements: {cancel_round_trips:#?}"
    );

    let read_span = request("untraced-read");
    assert!(read_span.parent_span_id.is_empty() && read_span.trace_id != TRACE, "{read_span:?}");
    assert!(!spans.iter().any(|s| s.name.contains("/health")), "a probe made a span");

    // The log: each request's line carries its trace and the service's span of it.
    let line = |id: &str| -> Value {
        logs.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|l| l["msg"] == "request" && l["request_id"] == id)
            .unwrap_or_else(|| panic!("no log line for {id}:\n{logs}"))
    };
    for (id, span) in [("traced-order", order_span), ("traced-cancel", cancel_span), ("untraced-read", read_span)] {
        let line = line(id);
        assert_eq!(
            (line["trace_id"].as_str(), line["span_id"].as_str()),
            (Some(&*span.trace_id), Some(&*span.span_id))
        );
    }
}

/// The spans whose parent is `parent`.
fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id).collect()
}

/// A server in-process whose spans go to `receiver`, sampled as `sampler` and `ratio` say; the
/// telemetry is this thread's default subscriber while the guard lives.
async fn traced_app(
    receiver: &OtlpReceiver,
    sampler: &str,
    ratio: Option<&str>,
    customize: impl FnOnce(&mut order_api::config::Config),
) -> (TestApp, order_api::telemetry::Telemetry, DefaultGuard) {
    let endpoint = receiver.endpoint();
    let settings = order_api::config::Config::from_lookup(|name| match name {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some(endpoint.clone()),
        "OTEL_TRACES_SAMPLER" => Some(sampler.to_owned()),
        "OTEL_TRACES_SAMPLER_ARG" => ratio.map(str::to_owned),
        "LOG_LEVEL" => Some("error".to_owned()),
        _ => None,
    })
    .unwrap();
    let (dispatch, telemetry) =
        order_api::telemetry::Telemetry::build(&settings, &tokio::runtime::Handle::current()).unwrap();
    assert!(telemetry.traces_exported());
    let guard = tracing::dispatcher::set_default(&dispatch);
    let app = spawn_app_with(customize).await;
    (app, telemetry, guard)
}

/// Sends every span still queued and stops the exporter. The export is a task of this
/// thread's runtime, so the wait for it runs on a blocking thread while the runtime goes on.
async fn flushed(telemetry: order_api::telemetry::Telemetry) {
    tokio::time::timeout(Duration::from_secs(20), tokio::task::spawn_blocking(move || telemetry.shutdown()))
        .await
        .expect("spans flushed within 20 s")
        .unwrap();
}

/// Places an order (one unit of product 3) with the request id `id` and a `traceparent`
/// (sampled or not), or none.
async fn place_order(app: &TestApp, id: &str, parent: Option<(&str, bool)>) {
    let mut request = app.http.post(app.url("/api/orders")).header("x-request-id", id).json(&order_body(1, 3, 1));
    if let Some((trace_id, sampled)) = parent {
        request = request.header("traceparent", traceparent(trace_id, ORDER_PARENT, sampled));
    }
    assert_eq!(request.send().await.unwrap().status(), 201);
}

/// `OTEL_TRACES_SAMPLER=parentbased_traceidratio` with ratio 0: a new trace is never recorded,
/// and neither is a caller's unsampled one; a caller's sampled trace is (parent-based), and so
/// is the batch its request joined (linked to it) with the batch's round trips.
#[tokio::test]
async fn ratio_zero_records_only_the_traces_a_caller_sampled() {
    let receiver = OtlpReceiver::start().await;
    let (app, telemetry, _guard) = traced_app(&receiver, "parentbased_traceidratio", Some("0"), |_| {}).await;
    let (sampled, unsampled) = ("0af7651916cd43dd8448eb211c80319c", "0af7651916cd43dd8448eb211c80319d");
    place_order(&app, "new-trace", None).await;
    place_order(&app, "caller-unsampled", Some((unsampled, false))).await;
    place_order(&app, "caller-sampled", Some((sampled, true))).await;
    flushed(telemetry).await;

    let spans = receiver.spans();
    let request = spans.iter().find(|s| s.kind == SERVER).unwrap_or_else(|| panic!("no request span: {spans:#?}"));
    assert_eq!((request.attribute("request_id"), request.trace_id.as_str()), (Some("caller-sampled"), sampled));
    assert_eq!(spans.iter().filter(|s| s.kind == SERVER).count(), 1, "{spans:#?}");
    let batch = spans.iter().find(|s| s.name == "batch").expect("the sampled request's batch");
    assert_eq!(batch.links, [(sampled.to_owned(), request.span_id.clone())]);
    assert!(!children(&spans, batch).is_empty(), "{spans:#?}");
    // Everything recorded belongs to the sampled request or to its batch (which placed the
    // order alone: the other orders came one at a time, each in its own batch).
    for span in &spans {
        assert!(span.trace_id == sampled || span.trace_id == batch.trace_id, "{span:?}");
    }
}

/// Ratio 1: every new trace is recorded; a caller's decision still wins (parent-based: an
/// unsampled `traceparent` is not recorded).
#[tokio::test]
async fn ratio_one_records_every_new_trace_and_still_follows_the_caller() {
    let receiver = OtlpReceiver::start().await;
    let (app, telemetry, _guard) = traced_app(&receiver, "parentbased_traceidratio", Some("1"), |_| {}).await;
    for i in 0..5 {
        place_order(&app, &format!("new-{i}"), None).await;
    }
    place_order(&app, "caller-unsampled", Some(("0af7651916cd43dd8448eb211c80319d", false))).await;
    flushed(telemetry).await;

    let recorded: BTreeSet<String> = receiver
        .spans()
        .iter()
        .filter(|s| s.kind == SERVER)
        .filter_map(|s| s.attribute("request_id").map(str::to_owned))
        .collect();
    assert_eq!(recorded, (0..5).map(|i| format!("new-{i}")).collect::<BTreeSet<String>>());
}

/// 50 orders that arrive together are placed in one batch, and the trace shows it: one batch
/// span linked to each of the 50 request spans (each in its own trace), with the batch's
/// database round trips under it. To make the batch form for sure, both slots of the order
/// lane are first taken (`TestApp::hold_order_lanes`); the 50 queue meanwhile, and go
/// together once the lanes are released.
#[tokio::test]
async fn fifty_orders_placed_together_make_fifty_request_spans_linked_to_one_batch_span() {
    const ORDERS: usize = 50;
    let receiver = OtlpReceiver::start().await;
    let (app, telemetry, _guard) = traced_app(&receiver, "always_on", None, |config| config.order_batch_max = 64).await;
    let lanes = app.hold_order_lanes().await;

    let requests: Vec<raw::Request> = (0..ORDERS)
        .map(|i| {
            let mut request = raw::Request::order(None, &order_body(1, 2, 1));
            request.headers.push(("X-Request-Id".into(), format!("together-{i}")));
            request
        })
        .collect();
    let in_flight = app.send_all(&requests).await;
    in_flight.read_by_the_server().await;
    lanes.release().await;
    for reply in in_flight.replies().await {
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    flushed(telemetry).await;

    let spans = receiver.spans();
    let together: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == SERVER && s.attribute("request_id").is_some_and(|id| id.starts_with("together-")))
        .collect();
    assert_eq!(together.len(), ORDERS, "one request span per order");
    let traces: BTreeSet<&str> = together.iter().map(|s| s.trace_id.as_str()).collect();
    assert_eq!(traces.len(), ORDERS, "each request its own trace");
    let expected: BTreeSet<(String, String)> =
        together.iter().map(|s| (s.trace_id.clone(), s.span_id.clone())).collect();
    let batches: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "batch").collect();
    let batch = batches
        .iter()
        .find(|b| b.links.iter().any(|link| expected.contains(link)))
        .unwrap_or_else(|| panic!("no batch linked to the orders: {batches:#?}"));
    let linked: BTreeSet<(String, String)> = batch.links.iter().cloned().collect();
    assert_eq!(linked, expected, "one batch span linked to exactly the 50 request spans");
    assert_eq!(batch.attribute("batch.size"), Some("50"));
    assert!(batch.parent_span_id.is_empty());
    assert!(!children(&spans, batch).is_empty(), "the batch's round trips are under it");
    app.assert_invariants().await;
}

/// A webhook attempt is a client span of its own trace, and its `traceparent` goes out with
/// the event (the receiver can join the trace); a failed attempt is an error span with the
/// status it got, and its retry is a new span.
#[tokio::test]
async fn each_webhook_attempt_is_a_client_span_whose_traceparent_reaches_the_receiver() {
    let otlp = OtlpReceiver::start().await;
    let (app, telemetry, _guard) = traced_app(&otlp, "always_on", None, |config| {
        config.webhook_allow_http = true;
        config.webhook_allowed_hosts = vec!["127.0.0.1".to_owned()];
        config.webhook_retry_scale = 0.0001;
    })
    .await;
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500), Answer::status(200)]);
    let created =
        app.post_json("/api/webhooks", &serde_json::json!({"url": receiver.url(), "types": ["order.created"]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let endpoint_id = created.json["id"].as_i64().unwrap().to_string();
    app.order(2, 1).await;
    let received = receiver.wait_until(Duration::from_secs(20), |r| r.len() >= 2).await;
    // An attempt's span ends once its answer is read, after the receiver has the request; its
    // outcome is recorded after that. Flushing before would lose a span that had not ended.
    for _ in 0..2_000 {
        let recorded: i64 = app.db.query_one("SELECT count(*) FROM webhook_attempts", &[]).await.unwrap().get(0);
        if recorded >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    flushed(telemetry).await;

    let spans = otlp.spans();
    let attempts: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "POST webhook").collect();
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    for (request, span) in received.iter().zip(&attempts) {
        assert_eq!(request.header("traceparent"), traceparent(&span.trace_id, &span.span_id, true));
        assert_eq!((span.kind, span.parent_span_id.as_str()), (CLIENT, ""), "{span:?}");
        assert_eq!(span.attribute("webhook.endpoint_id"), Some(endpoint_id.as_str()));
        assert_eq!(span.attribute("webhook.event_id"), Some(request.header("webhook-id")));
    }
    let (failed, delivered) = (attempts[0], attempts[1]);
    assert_eq!((failed.attribute("http.response.status_code"), failed.status_code), (Some("500"), 2));
    assert_eq!(failed.attribute("webhook.attempt"), Some("1"));
    assert_eq!(delivered.attribute("http.response.status_code"), Some("200"));
    assert_ne!(delivered.status_code, 2);
    assert_eq!(delivered.attribute("webhook.attempt"), Some("2"));
    assert_ne!(failed.trace_id, delivered.trace_id, "each attempt its own trace");
}
