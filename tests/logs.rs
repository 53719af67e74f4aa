//! What the real binary writes on stdout: one JSON object per line; one line per request with
//! its request id, method, route template (never the raw path), status and duration; and the
//! request id on every line written while serving a request.

mod common;

use std::time::Duration;

use common::{DropDatabase, process::ServerProcess};
use serde_json::Value;

#[tokio::test]
async fn every_request_is_one_json_line_with_its_id_route_status_and_duration() {
    let (name, url) = common::create_test_database().await;
    let _cleanup = DropDatabase::new(&name);
    let mut server = ServerProcess::start(&url).await;
    let http = reqwest::Client::new();
    let order = http
        .post(server.url("/api/orders"))
        .header("x-request-id", "trace-order-1")
        .json(&serde_json::json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);
    let missing =
        http.get(server.url("/api/orders/987654")).header("x-request-id", "trace-missing").send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let generated = http.get(server.url("/api/products/3")).send().await.unwrap();
    let generated_id = generated.headers()["x-request-id"].to_str().unwrap().to_owned();

    server.terminate();
    assert!(server.wait_for_exit(Duration::from_secs(10)).await.is_some_and(|status| status.success()));
    let logs = server.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}")))
        .collect();
    for line in &lines {
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
        assert!(line["level"].is_string() && line["msg"].is_string(), "{line}");
    }
    let request = |id: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["msg"] == "request" && l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}:\n{logs}"))
    };
    let order_line = request("trace-order-1");
    assert_eq!(
        (order_line["method"].as_str(), order_line["route"].as_str(), order_line["status"].as_u64()),
        (Some("POST"), Some("/api/orders"), Some(201))
    );
    assert!(order_line["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{order_line}");
    let missing_line = request("trace-missing");
    assert_eq!(missing_line["route"], "/api/orders/{orderId}", "the template, not the raw path");
    assert_eq!(missing_line["status"], 404);
    assert_eq!(request(&generated_id)["route"], "/api/products/{productId}");
    assert_eq!(
        lines.iter().filter(|l| l["msg"] == "request").count(),
        3,
        "one line per request (health checks log at debug):\n{logs}"
    );
}

/// A log reader that stalls (a full pipe to a slow log collector) does not stall the service:
/// requests go on being answered while nobody reads stdout, and once it is read again every
/// line is there. Lines are written by a thread of their own from a bounded buffer.
#[tokio::test]
async fn a_stalled_stdout_does_not_stall_requests() {
    let (name, url) = common::create_test_database().await;
    let _cleanup = DropDatabase::new(&name);
    let (read_stdout, gate) = std::sync::mpsc::channel();
    let mut server = ServerProcess::start_with_stdout_gate(&url, gate).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    // About 1 MB of request lines, many times what a pipe holds (64 KiB).
    const REQUESTS: usize = 5_000;
    let answered = futures::future::join_all((0..16).map(|_| {
        let (http, url) = (http.clone(), server.url("/api/products/3"));
        async move {
            let mut ok = 0;
            for _ in 0..REQUESTS / 16 {
                if http.get(&url).send().await.is_ok_and(|reply| reply.status() == 200) {
                    ok += 1;
                }
            }
            ok
        }
    }))
    .await;
    assert_eq!(answered.iter().sum::<usize>(), REQUESTS / 16 * 16, "requests failed while stdout was not read");

    read_stdout.send(()).unwrap();
    server.terminate();
    assert!(server.wait_for_exit(Duration::from_secs(10)).await.is_some_and(|status| status.success()));
    let logs = server.logs();
    let request_lines = logs.lines().filter(|line| line.contains(r#""msg":"request""#)).count();
    assert_eq!(request_lines, REQUESTS / 16 * 16, "every line written once stdout is read again");
}
