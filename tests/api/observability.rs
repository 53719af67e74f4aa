//! The alerts and the dashboard use only series the service really exports: a live server gets
//! traffic, `GET /metrics` is scraped, and every metric name in every expression of
//! `deploy/prometheus/rules/*.yml` and `deploy/grafana/*.json` must be among the scraped
//! sample names (histograms' `_bucket`, `_sum` and `_count` are sample names of their own in
//! the exposition), a recording rule of the rules files, or one of the series Prometheus itself
//! writes for a target (`up`, ...). A label a matcher names must be on the scraped series too.
//! No YAML or PromQL crate: the rules files are read line by line (their form is fixed by
//! `promtool check rules` in CI) and PromQL is scanned just far enough to tell metric names from
//! functions, keywords, label lists and literals.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::Value;

use crate::common::{
    order_body,
    receiver::{Answer, Receiver},
    spawn_app_with,
};

/// Series Prometheus adds for every scrape target, which no exporter exports.
const PROMETHEUS_SERIES: [&str; 5] = [
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Labels the scrape adds to every series (target labels), absent from the exposition.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// A service with traffic on every kind of route (an order placed, one refused, reads, a
/// cancel, an unknown path, the probes, a webhook endpoint that fails): every family with labels
/// has samples once it is done.
#[tokio::test]
async fn every_series_of_the_alerts_and_the_dashboard_is_exported() {
    let app = spawn_app_with(|config| {
        config.webhook_allow_http = true;
        config.webhook_allowed_hosts = vec!["127.0.0.1".to_owned()];
    })
    .await;
    let order = app.order(1, 1).await;
    let refused = app.post_order(&order_body(1, 5, 1)).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    for path in ["/api/products", "/api/products/1", &format!("/api/orders/{order}"), "/nowhere", "/health/ready"] {
        app.get(path).await;
    }
    assert_eq!(app.cancel(order).await.status, 200);
    // A webhook endpoint that fails: attempts, and a backlog (read every few seconds).
    let receiver = Receiver::start().await;
    receiver.script(vec![Answer::status(500)]);
    let created = app.post_json("/api/webhooks", &serde_json::json!({"url": receiver.url()})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    app.order(2, 1).await;
    let mut scrape = app.get("/metrics").await;
    for _ in 0..1_000 {
        let text = &scrape.text;
        if text.contains("order_api_webhook_attempts_total{")
            && text.contains("order_api_webhook_oldest_undelivered_seconds{")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        scrape = app.get("/metrics").await;
    }
    assert_eq!(scrape.status, 200);
    let mut exported = sample_labels(&scrape.text);
    // The test cluster does not archive WAL, and the archive series exist only while it does:
    // they come from the service's own renderer given a reading with archiving on (and
    // `archiving.rs` scrapes them from a server on a cluster that archives).
    exported.extend(sample_labels(&archive_series_when_archiving()));

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut expressions: Vec<(String, String)> = Vec::new(); // (where, PromQL)
    let mut recorded = BTreeSet::new();
    for file in files(&root.join("deploy/prometheus/rules"), "yml") {
        let rules = RulesFile::read(&file);
        assert!(!rules.expressions.is_empty(), "no rule in {}", file.display());
        recorded.extend(rules.records);
        expressions.extend(rules.expressions.into_iter().map(|e| (file.display().to_string(), e)));
    }
    let dashboards = files(&root.join("deploy/grafana"), "json");
    assert!(!dashboards.is_empty(), "no dashboard in deploy/grafana");
    for file in dashboards {
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let queries = dashboard_queries(&dashboard);
        assert!(queries.len() >= 10, "only {} queries in {}", queries.len(), file.display());
        expressions.extend(queries.into_iter().map(|e| (file.display().to_string(), e)));
    }

    let mut missing = Vec::new();
    for (source, expression) in &expressions {
        let used = metric_names(expression);
        assert!(!used.is_empty(), "no metric name found in {expression:?} ({source})");
        for (name, labels) in used {
            let known = exported.contains_key(&name) || recorded.contains(&name) || PROMETHEUS_SERIES.contains(&&*name);
            if !known {
                missing.push(format!("{name} in {expression:?} ({source})"));
                continue;
            }
            if let Some(exported_labels) = exported.get(&name) {
                for label in labels {
                    if !exported_labels.contains(&label) && !TARGET_LABELS.contains(&&*label) {
                        missing.push(format!("label {label} of {name} in {expression:?} ({source})"));
                    }
                }
            }
        }
    }
    assert!(missing.is_empty(), "not exported:\n{}\n\nscrape:\n{}", missing.join("\n"), scrape.text);
}

/// The scanner finds metric names and matcher labels, and nothing else, in the shapes the
/// rules and the dashboard use.
#[test]
fn metric_names_are_told_from_functions_keywords_labels_and_literals() {
    let names = |expression: &str| -> Vec<(String, Vec<String>)> {
        metric_names(expression).into_iter().map(|(name, labels)| (name, labels.into_iter().collect())).collect()
    };
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{route=~"/api/.*", job="$job"}[$__rate_interval])))"#
        ),
        [("a_bucket".to_owned(), vec!["job".to_owned(), "route".to_owned()])]
    );
    assert_eq!(
        names("(b == bool 0) * on (job, instance) group_left (x) (sum without (le) (c offset 5m) > bool 1e3)"),
        [("b".to_owned(), vec![]), ("c".to_owned(), vec![])]
    );
    assert_eq!(names("job:d:rate5m / ignoring (status) e and f or vector(0)").len(), 3);
    assert_eq!(names(r#"time() - g{x!~"a{b}(c)"} unless h"#).len(), 2);
    assert_eq!(names("label_values(i{job=\"$job\"}, instance)"), [("i".to_owned(), vec!["job".to_owned()])]);
    assert_eq!(names("count_values(\"v\", j) + topk(3, k) + quantile(0.5, l)").len(), 3);
}

/// The `order_api_wal_archive_*` series as `/metrics` renders them while WAL is archived.
fn archive_series_when_archiving() -> String {
    let watch = order_api::archiving::ArchiveWatch::default();
    let reading = order_api::db::archiver::ArchiverStats {
        mode: "on".into(),
        archived_count: 1,
        failed_count: 0,
        last_archived_wal: Some("000000010000000000000001".into()),
        last_archived_age: Some(1.0),
        last_failed_wal: None,
        last_failed_age: None,
        current_lsn: Some(1 << 24),
        segment_size: 1 << 24,
    };
    watch.record(reading, std::time::Instant::now());
    let mut text = String::new();
    watch.render(&mut text);
    text
}

/// Sample name -> the label names it is exported with, from Prometheus text.
fn sample_labels(exposition: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = samples.entry(line[..end].to_owned()).or_default();
        // The last `}`: a label value may hold braces (`route="/api/orders/{orderId}"`).
        if let Some((inside, _)) = line[end..].strip_prefix('{').and_then(|rest| rest.rsplit_once('}')) {
            labels.extend(label_names(inside));
        }
    }
    samples
}

/// The files of `dir` ending in `.extension`, sorted.
fn files(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .collect();
    found.sort();
    found
}

/// What a Prometheus rules file defines and evaluates.
struct RulesFile {
    /// Names of the recording rules.
    records: Vec<String>,
    /// Every `expr:` (a one-line value, or a `|` block).
    expressions: Vec<String>,
}

impl RulesFile {
    fn read(path: &Path) -> RulesFile {
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let (mut records, mut expressions, mut rules) = (Vec::new(), Vec::new(), 0);
        let indent = |line: &str| line.len() - line.trim_start().len();
        let unquote = |value: &str| value.trim().trim_matches(|c| c == '"' || c == '\'').to_owned();
        for (index, line) in lines.iter().enumerate() {
            let item = line.trim_start().trim_start_matches("- ");
            if line.trim_start().starts_with('#') {
                continue;
            }
            if let Some(name) = item.strip_prefix("record:") {
                records.push(unquote(name));
                rules += 1;
            } else if item.starts_with("alert:") {
                rules += 1;
            } else if let Some(value) = item.strip_prefix("expr:") {
                let value = value.trim();
                if value.starts_with('|') || value.starts_with('>') {
                    let block: Vec<&str> = lines[index + 1..]
                        .iter()
                        .take_while(|next| next.trim().is_empty() || indent(next) > indent(line))
                        .map(|next| next.trim())
                        .collect();
                    expressions.push(block.join("\n"));
                } else {
                    expressions.push(unquote(value));
                }
            }
        }
        assert_eq!(expressions.len(), rules, "{}: one expr per rule", path.display());
        RulesFile { records, expressions }
    }
}

/// Every PromQL query of a Grafana dashboard: panel targets (rows' panels too) and the
/// template variables' queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(target["expr"].as_str().expect("every target has an expr").to_owned());
            }
            panels(&panel["panels"], out);
        }
    }
    let mut queries = Vec::new();
    panels(&dashboard["panels"], &mut queries);
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if variable["type"] == "query" {
            let query = &variable["query"];
            queries.push(query["query"].as_str().or(query.as_str()).expect("a variable's query").to_owned());
        }
    }
    queries
}

/// Aggregation operators: they may be followed by `by`/`without` rather than `(`.
const AGGREGATIONS: [&str; 12] =
    ["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
/// Other keywords and literals.
const KEYWORDS: [&str; 7] = ["bool", "and", "or", "unless", "offset", "inf", "nan"];

/// The metric names of a PromQL expression (or a Grafana `label_values(...)` query), each with
/// the label names its own matchers use.
fn metric_names(expression: &str) -> Vec<(String, BTreeSet<String>)> {
    let chars: Vec<char> = expression.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    // `label_values(metric, label)`: the label is not a metric.
    let mut label_values_depth: Option<usize> = None;
    let mut depth = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '[' => i = skip_to(&chars, i, ']'),
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(&chars, i, '}');
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            '(' => {
                depth += 1;
                i += 1;
            }
            ')' => {
                if label_values_depth == Some(depth) {
                    label_values_depth = None;
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            ',' if label_values_depth == Some(depth) => {
                // The label argument: skip it, up to the `)` that closes the call.
                i = skip_to(&chars, i, ')') - 1;
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().position(|c| !c.is_whitespace()).map(|n| i + n);
                let next_char = next.map(|n| chars[n]);
                if LABEL_LISTS.contains(&&*word) {
                    if let Some(open) = next.filter(|_| next_char == Some('(')) {
                        i = skip_to(&chars, open, ')');
                    }
                } else if word == "label_values" && next_char == Some('(') {
                    label_values_depth = Some(depth + 1);
                } else if next_char == Some('(') || AGGREGATIONS.contains(&&*word) || KEYWORDS.contains(&&*word) {
                    // A function call or a keyword.
                } else {
                    let mut labels = BTreeSet::new();
                    if next_char == Some('{') {
                        let open = next.unwrap();
                        let close = skip_to(&chars, open, '}');
                        let inside: String = chars[open + 1..close - 1].iter().collect();
                        labels = label_names(&inside);
                        i = close;
                    }
                    found.push((word, labels));
                }
            }
            _ => i += 1,
        }
    }
    found
}

/// The label names of a matcher list or a sample's labels: `a="x", b=~"y"` -> {a, b}.
fn label_names(inside: &str) -> BTreeSet<String> {
    let chars: Vec<char> = inside.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '"' {
            i = skip_string(&chars, i);
        } else if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            names.insert(chars[start..i].iter().collect());
        } else {
            i += 1;
        }
    }
    names
}

/// The index just past the string literal that starts at `start` (its quote character).
fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// The index just past the `close` that ends the bracket opening at `start`, skipping strings
/// and nested brackets of the same kind.
fn skip_to(chars: &[char], start: usize, close: char) -> usize {
    let open = chars[start];
    let mut depth = 0;
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open && c != close => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth <= 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}
