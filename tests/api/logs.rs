//! What the real binary writes on stdout: one JSON object per line; one line per request with
//! its request id, method, route template (never the raw path), status and duration; the
//! request id (and the trace id, when there is a trace) on every line written while serving a
//! request; and what `LOG_LEVEL` and `RUST_LOG` let through.

use std::time::Duration;

use serde_json::Value;

use crate::common::{TestDatabase, process::ServerProcess};

#[tokio::test]
async fn every_request_is_one_json_line_with_its_id_route_status_and_duration() {
    let database = TestDatabase::create().await;
    let mut server = ServerProcess::start(&database.url).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
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
    // Tracing is off (no OTLP endpoint), yet the caller's trace id is in the line.
    let traced = http
        .get(server.url("/api/products/3"))
        .header("x-request-id", "trace-caller")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 200);

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
    assert!(request(&generated_id).get("trace_id").is_none(), "no trace, no trace id");
    let traced_line = request("trace-caller");
    assert_eq!(traced_line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the caller's trace");
    assert!(traced_line.get("span_id").is_none(), "no span of the service's own with tracing off");
    assert_eq!(
        lines.iter().filter(|l| l["msg"] == "request").count(),
        4,
        "one line per request (health checks log at debug):\n{logs}"
    );
}

/// A log reader that stalls (a full pipe to a slow log collector) does not stall the service:
/// requests go on being answered while nobody reads stdout. The log buffer (`LOG_BUFFER_BYTES`,
/// here 32 KiB instead of 8 MiB) fills, and the lines past it are dropped and counted rather
/// than held in memory; once stdout is read again the count is logged, every line not dropped
/// is there, and new requests are logged as before.
///
/// Every wait is bounded: a service that blocks on its log writes fails this within seconds
/// (the first request it leaves unanswered for 5 s) instead of hanging the run.
#[tokio::test]
async fn a_stalled_stdout_does_not_stall_requests_and_lines_past_the_buffer_are_counted() {
    /// The log buffer of the server under test.
    const BUFFER: usize = 32 << 10;
    /// 16 clients of 320 requests each: about 1 MB of request lines, many times the buffer
    /// plus what a pipe holds (64 KiB).
    const CLIENTS: usize = 16;
    const REQUESTS_PER_CLIENT: usize = 320;
    const REQUESTS: usize = CLIENTS * REQUESTS_PER_CLIENT;
    const REQUEST_PATIENCE: Duration = Duration::from_secs(5);

    let database = TestDatabase::create().await;
    let (read_stdout, gate) = std::sync::mpsc::channel();
    let buffer = BUFFER.to_string();
    let mut server = ServerProcess::start_with_stdout_gate(&database.url, gate, &[("LOG_BUFFER_BYTES", &buffer)]).await;
    // The client's own timeout is a backstop; `REQUEST_PATIENCE` below is what fails the test.
    let http = reqwest::Client::builder().timeout(2 * REQUEST_PATIENCE).build().unwrap();

    let clients = (0..CLIENTS).map(|client| {
        let (http, url) = (http.clone(), server.url("/api/products/3"));
        async move {
            for i in 0..REQUESTS_PER_CLIENT {
                let answer = tokio::time::timeout(REQUEST_PATIENCE, async {
                    let reply = http.get(&url).send().await?;
                    let status = reply.status();
                    reply.bytes().await.map(|_| status)
                })
                .await;
                match answer {
                    Ok(Ok(status)) if status == 200 => {}
                    Ok(Ok(status)) => return Err(format!("client {client}, request {i}: status {status}")),
                    Ok(Err(e)) => return Err(format!("client {client}, request {i}: {e}")),
                    Err(_) => {
                        return Err(format!("client {client}, request {i}: no answer within {REQUEST_PATIENCE:?}"));
                    }
                }
            }
            Ok(())
        }
    });
    match tokio::time::timeout(Duration::from_secs(120), futures::future::try_join_all(clients)).await {
        Ok(Ok(_)) => {}
        Ok(Err(failure)) => {
            panic!("a request failed while stdout was not read (does logging block requests?): {failure}")
        }
        Err(_) => panic!("{REQUESTS} requests not answered within 120 s while stdout was not read"),
    }

    // stdout is read again: the writer finishes its blocked write, then writes the buffered
    // lines and the count of those it dropped.
    read_stdout.send(()).unwrap();
    let (logs, drained) =
        server.wait_for_logs(Duration::from_secs(10), |logs| logs.contains("log lines dropped")).await;
    assert!(drained, "no \"log lines dropped\" line within 10 s of stdout being read again:\n{}", tail(&logs));
    // A request after the stall is logged as usual.
    let after = tokio::time::timeout(
        REQUEST_PATIENCE,
        http.get(server.url("/api/products/3")).header("x-request-id", "after-the-stall").send(),
    )
    .await
    .expect("a request after the stall answered in time")
    .unwrap();
    assert_eq!(after.status(), 200);
    let (_, logged) = server.wait_for_logs(Duration::from_secs(10), |logs| logs.contains("after-the-stall")).await;
    assert!(logged, "the request after the stall was not logged within 10 s");

    server.terminate();
    let status = server.wait_for_exit(Duration::from_secs(10)).await;
    let logs = server.logs();
    assert!(status.is_some_and(|status| status.success()), "exit {status:?}:\n{}", tail(&logs));
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}")))
        .collect();
    let notes: Vec<&Value> = lines.iter().filter(|l| l["msg"] == "log lines dropped: stdout did not keep up").collect();
    assert!(notes.iter().all(|note| note["level"] == "warn"), "{notes:?}");
    let dropped: u64 = notes.iter().map(|note| note["dropped"].as_u64().expect("a dropped count")).sum();
    let stalled: Vec<&str> = logs
        .lines()
        .zip(&lines)
        .filter(|(_, l)| l["msg"] == "request" && l["request_id"] != "after-the-stall")
        .map(|(text, _)| text)
        .collect();
    assert!(dropped > 0, "no line was dropped: the buffer never filled");
    assert_eq!(
        stalled.len() as u64 + dropped,
        REQUESTS as u64,
        "each request's line is either written or counted as dropped"
    );
    // Written while stalled: what the pipe holds, the batch the writer was blocked on and a
    // full buffer; each of the last two at most BUFFER bytes.
    let written: usize = stalled.iter().map(|line| line.len() + 1).sum();
    println!("{REQUESTS} requests while stalled: {} lines written ({written} bytes), {dropped} dropped", stalled.len());
    assert!(written <= 2 * BUFFER + (256 << 10), "{written} bytes of request lines: the buffer is not bounded");
    assert_eq!(lines.iter().filter(|l| l["request_id"] == "after-the-stall").count(), 1);
}

/// The last lines of `logs`, for a failure message.
fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// In open mode (the default) the service says at start, as a warning, that any caller can act
/// as any user; in jwt mode it does not.
#[tokio::test]
async fn open_mode_warns_at_start_that_any_caller_can_act_as_any_user() {
    const WARNING: &str = "AUTH_MODE=open: any caller can order, read and cancel as any user";
    let database = TestDatabase::create().await;
    let mut open = ServerProcess::start(&database.url).await;
    let (logs, warned) = open.wait_for_logs(Duration::from_secs(10), |logs| logs.contains(WARNING)).await;
    assert!(warned, "no start-up warning in open mode:\n{logs}");
    let line: Value = serde_json::from_str(logs.lines().find(|line| line.contains(WARNING)).unwrap()).unwrap();
    assert_eq!(line["level"], "warn", "{line}");
    open.terminate();
    assert!(open.wait_for_exit(Duration::from_secs(10)).await.is_some_and(|status| status.success()));

    let secret = "a-test-hs256-secret-of-at-least-32-bytes";
    let env = [("AUTH_MODE", "jwt"), ("AUTH_JWT_HS256_SECRET", secret)];
    let mut jwt = ServerProcess::start_with_env(&database.url, &env).await;
    jwt.terminate();
    let status = jwt.wait_for_exit(Duration::from_secs(10)).await;
    let logs = jwt.logs();
    assert!(status.is_some_and(|status| status.success()), "exit {status:?} on SIGTERM:\n{logs}");
    assert!(logs.contains("\"msg\":\"listening\""), "the start-up was logged:\n{logs}");
    assert!(!logs.contains("AUTH_MODE=open"), "jwt mode warned about open mode:\n{logs}");
}

/// `RUST_LOG` wins over `LOG_LEVEL` and filters per module: here the request lines
/// (`order_api::http`) are turned off while everything else stays at info, and the start-up
/// lines are still written.
#[tokio::test]
async fn rust_log_filters_per_module_and_wins_over_log_level() {
    let database = TestDatabase::create().await;
    let env = [("LOG_LEVEL", "debug"), ("RUST_LOG", "info,order_api::http=off")];
    let mut server = ServerProcess::start_with_env(&database.url, &env).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(http.get(server.url("/api/products/3")).send().await.unwrap().status(), 200);
    server.terminate();
    assert!(server.wait_for_exit(Duration::from_secs(10)).await.is_some_and(|status| status.success()));
    let logs = server.logs();
    assert!(logs.contains(r#""msg":"listening""#), "info lines of other modules are written:\n{logs}");
    assert!(!logs.contains(r#""msg":"request""#), "order_api::http is off:\n{logs}");
    assert!(!logs.contains(r#""level":"debug""#), "RUST_LOG, not LOG_LEVEL=debug:\n{logs}");
}
