//! The contract's rules that live in files and defaults rather than behind an endpoint
//! (CONTRACT part 1, "Configuration", "Deployment" and `submission.json`): each read from the
//! file itself, and where the rule is about what runs (a health check, the seed), tried for real.

use std::{cell::RefCell, collections::BTreeSet, path::Path, process::Command, time::Duration};

use order_api::config::Config;
use serde_json::{Value, json};

use crate::common::{TestDatabase, free_port, process::ServerProcess, spawn_app};

/// A file of the repository, as text.
fn repository_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every environment variable the configuration reads: `Config::from_lookup` looks each one up
/// whatever the others hold, so asking it with nothing set lists them all. A new setting in
/// src/config.rs is in this list without anyone updating a test.
fn settings_the_code_reads() -> BTreeSet<String> {
    let asked = RefCell::new(BTreeSet::new());
    Config::from_lookup(|name| {
        asked.borrow_mut().insert(name.to_owned());
        None
    })
    .expect("the defaults are a valid configuration");
    let asked = asked.into_inner();
    assert!(asked.len() > 20 && asked.contains("API_PORT"), "the lookup saw {asked:?}");
    asked
}

/// The variables `.env.example` gives a line, set (`NAME=value`) or shown commented out
/// (`# NAME=value`).
fn env_example_variables() -> BTreeSet<String> {
    repository_file(".env.example")
        .lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches('#').trim();
            let (name, _) = line.split_once('=')?;
            let is_name =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            is_name.then(|| name.to_owned())
        })
        .collect()
}

/// docker-compose.yml, parsed.
fn compose() -> Value {
    let yaml: serde_norway::Value = serde_norway::from_str(&repository_file("docker-compose.yml")).unwrap();
    serde_json::to_value(yaml).unwrap()
}

/// The variables docker-compose.yml substitutes (`${NAME}`, `${NAME:-default}`).
fn compose_variables() -> BTreeSet<String> {
    let text = repository_file("docker-compose.yml");
    text.split("${")
        .skip(1)
        .map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap().to_owned())
        .collect()
}

/// `.env.example` documents every setting the code reads (CONTRACT: "each has a sane default
/// and a line in `.env.example`"), and the database settings of docker-compose.
#[test]
fn env_example_has_a_line_for_every_setting() {
    let documented = env_example_variables();
    let missing: Vec<_> = settings_the_code_reads().into_iter().filter(|name| !documented.contains(name)).collect();
    assert!(missing.is_empty(), "read by src/config.rs, with no line in .env.example: {missing:?}");
    for name in ["DB_USER", "DB_PASSWORD", "DB_NAME"] {
        assert!(documented.contains(name), "{name}, used by docker-compose, has no line in .env.example");
    }
}

/// The variables the backup tool (backup/run.py, `make backup` and the others) reads: the
/// names it quotes (`env("NAME", ...)`, `env('NAME', ...)`, `os.environ.get("NAME")`).
fn backup_variables() -> BTreeSet<String> {
    let text = repository_file("backup/run.py");
    let name_byte = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_';
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    for (start, &quote) in bytes.iter().enumerate().filter(|(_, b)| **b == b'"' || **b == b'\'') {
        let length = bytes[start + 1..].iter().take_while(|b| name_byte(**b)).count();
        if length > 1 && bytes.get(start + 1 + length) == Some(&quote) {
            names.insert(text[start + 1..start + 1 + length].to_owned());
        }
    }
    names
}

/// And nothing in `.env.example` is a setting that no longer exists: each line is read by the
/// code, substituted by docker-compose.yml, or read by the backup tool.
#[test]
fn every_line_of_env_example_is_a_setting_that_exists() {
    let (code, compose, backup) = (settings_the_code_reads(), compose_variables(), backup_variables());
    let stale: Vec<_> = env_example_variables()
        .into_iter()
        .filter(|name| !code.contains(name) && !compose.contains(name) && !backup.contains(name))
        .collect();
    assert!(
        stale.is_empty(),
        "in .env.example, read by neither the code, docker-compose.yml nor backup/run.py: {stale:?}"
    );
}

/// The contract's defaults: `API_PORT` 3000, idempotency keys kept 24 hours; `.env.example`
/// shows the same values.
#[test]
fn api_port_defaults_to_3000_and_idempotency_keys_to_24_hours() {
    let config = Config::from_lookup(|_| None).unwrap();
    assert_eq!(config.port, 3000);
    assert_eq!(config.idempotency_retention, Duration::from_secs(24 * 3600));
    let example = repository_file(".env.example");
    assert!(example.lines().any(|line| line == "API_PORT=3000"), "API_PORT=3000 in .env.example");
    assert!(example.lines().any(|line| line == "IDEMPOTENCY_RETENTION_HOURS=24"), "24 h in .env.example");
    // A value set is used; a value that cannot be a port stops the start, naming it.
    assert_eq!(Config::from_lookup(|name| (name == "API_PORT").then(|| "3100".into())).unwrap().port, 3100);
    let error = Config::from_lookup(|name| (name == "API_PORT").then(|| "http".into())).unwrap_err();
    assert!(error.to_string().contains("API_PORT"), "{error}");
}

/// The containers keep the replaced system's names (`postgres_db`, `ecommerce_app`), both have
/// health checks, the API starts once the database is healthy, reaches it as `db` with the
/// `DB_*` settings, and listens on container port 3000 published on `API_PORT`.
#[test]
fn compose_keeps_the_container_names_and_has_health_checks_on_both() {
    let compose = compose();
    let (db, api) = (&compose["services"]["db"], &compose["services"]["api"]);
    assert_eq!(db["container_name"], "postgres_db");
    assert_eq!(api["container_name"], "ecommerce_app");
    // postgres:15, or a variable whose default it is (the backup profile's image replaces it).
    let image = db["image"].as_str().unwrap_or("");
    assert!(image.starts_with("postgres:15") || image.ends_with(":-postgres:15}"), "{image}");
    for (name, service) in [("db", db), ("api", api)] {
        let test = service["healthcheck"]["test"].as_array().unwrap_or_else(|| panic!("{name} has no health check"));
        assert!(test.len() >= 2, "{name}'s health check: {test:?}");
    }
    assert_eq!(api["depends_on"]["db"]["condition"], "service_healthy");
    assert_eq!(
        api["environment"]["DATABASE_URL"],
        "postgresql://${DB_USER:-postgres}:${DB_PASSWORD:-postgres}@db:5432/${DB_NAME:-ecommerce}"
    );
    assert_eq!(api["ports"], json!(["${API_PORT:-3000}:3000"]));
    // What compose passes to the API are settings the code reads (a misspelt one would be
    // passed and silently ignored).
    let read = settings_the_code_reads();
    let passed: Vec<&String> = api["environment"].as_object().unwrap().keys().collect();
    let unknown: Vec<_> = passed.iter().filter(|name| !read.contains(name.as_str())).collect();
    assert!(unknown.is_empty(), "docker-compose.yml passes settings the code does not read: {unknown:?}");
}

/// The API's health check (`order-api healthcheck`, the binary at the path the image puts it)
/// answers 0 against a healthy server and 1 where nothing listens.
#[tokio::test]
async fn the_api_health_check_of_compose_passes_on_a_healthy_server_only() {
    let compose = compose();
    let test: Vec<&str> = compose["services"]["api"]["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|part| part.as_str().unwrap())
        .collect();
    assert_eq!(test, ["CMD", "/usr/local/bin/order-api", "healthcheck"]);
    assert!(repository_file("Dockerfile").contains("/usr/local/bin/order-api"), "the image's binary path");

    let database = TestDatabase::create().await;
    let server = ServerProcess::start(&database.url).await;
    let check = |port: u16| {
        Command::new(env!("CARGO_BIN_EXE_order-api"))
            .args(&test[2..])
            .current_dir(std::env::temp_dir())
            .env("API_PORT", port.to_string())
            .output()
            .expect("run order-api healthcheck")
    };
    let healthy = check(server.port);
    assert!(healthy.status.success(), "{}", String::from_utf8_lossy(&healthy.stderr));
    assert_eq!(check(free_port()).status.code(), Some(1), "nothing listens there");
}

/// The database's health check (`pg_isready` over TCP with the image's user and database)
/// passes against a running PostgreSQL and fails where none listens. Run here with the test
/// server's port, as the image's shell would run it.
#[test]
fn the_database_health_check_of_compose_passes_on_a_running_postgresql_only() {
    let compose = compose();
    let test = compose["services"]["db"]["healthcheck"]["test"].as_array().unwrap().clone();
    assert_eq!(test[0], "CMD-SHELL");
    // Compose turns `$$` into `$`, for the container's shell to expand.
    let script = test[1].as_str().unwrap().replace("$$", "$");
    let url: tokio_postgres::Config = crate::common::server_url().parse().unwrap();
    let port = url.get_ports().first().copied().unwrap_or(5432);
    let check = |port: u16| {
        Command::new("sh")
            .args(["-c", &script])
            .env("POSTGRES_USER", url.get_user().unwrap_or("postgres"))
            .env("POSTGRES_DB", "postgres")
            .env("PGPORT", port.to_string())
            .output()
            .expect("run the health check with sh")
    };
    let up = check(port);
    assert!(
        up.status.success(),
        "{script}: {}{} (pg_isready comes with the PostgreSQL client)",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(!check(free_port()).status.success(), "nothing listens there");
}

/// `submission.json` is the contract's, and maps the seed: its user exists with its email, its
/// in-stock product can be ordered by that user, its out-of-stock product cannot.
#[tokio::test]
async fn submission_json_maps_the_seed() {
    let submission: Value = serde_json::from_str(&repository_file("submission.json")).unwrap();
    assert_eq!(
        submission,
        json!({"testUser": {"id": 1, "email": "testuser@example.com"},
               "testProducts": {"inStockProductId": 1, "outOfStockProductId": 5}})
    );
    let app = spawn_app().await;
    let user = submission["testUser"]["id"].as_i64().unwrap() as i32;
    let (in_stock, out_of_stock) = (
        submission["testProducts"]["inStockProductId"].as_i64().unwrap() as i32,
        submission["testProducts"]["outOfStockProductId"].as_i64().unwrap() as i32,
    );
    assert!(app.get(&format!("/api/products/{in_stock}")).await.json["stock"].as_i64().unwrap() > 0);
    assert_eq!(app.get(&format!("/api/products/{out_of_stock}")).await.json["stock"], 0);

    let refused = app.post_order(&crate::common::order_body(user, out_of_stock, 1)).await;
    refused.assert_error(400, "INSUFFICIENT_STOCK");
    let created = app.post_order(&crate::common::order_body(user, in_stock, 1)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order = app.get(&format!("/api/orders/{}", created.json["orderId"])).await;
    assert_eq!(order.json["user"], submission["testUser"]);
}
