//! Who may do what: the operator endpoints in both modes, and in `AUTH_MODE=jwt` the
//! ownership rules and every kind of bad token. Each refusal is checked twice: the answer
//! (status, code, `WWW-Authenticate`) and the database, which must not have changed.

use std::{
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, jwk::Jwk, jwk::JwkSet};
use order_api::{
    auth::{AuthMode, Secret},
    config::Config,
};
use serde_json::{Value, json};

use crate::common::{
    Reply, TestApp, client, private_pg::PrivatePostgres, raw, spawn_app, spawn_app_at, spawn_app_with, wait,
};

const SECRET: &str = "a-test-hs256-secret-of-at-least-32-bytes";
pub(crate) const ISSUER: &str = "https://identity.shop.test";
pub(crate) const AUDIENCE: &str = "order-api";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims of a valid customer token for `user`, to be changed by the test.
pub(crate) fn claims(user: i32) -> Value {
    json!({"sub": user.to_string(), "exp": now() + 300, "iss": ISSUER, "aud": AUDIENCE})
}

fn hs256(claims: &Value) -> String {
    encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes()).unwrap()).unwrap()
}

pub(crate) fn customer(user: i32) -> String {
    hs256(&claims(user))
}

/// jwt mode with the test's HS256 secret, issuer and audience.
fn jwt_settings(config: &mut Config) {
    config.auth_mode = AuthMode::Jwt;
    config.jwt.hs256_secret = Some(Secret::new(SECRET));
    config.jwt.issuer = Some(ISSUER.into());
    config.jwt.audience = Some(AUDIENCE.into());
}

pub(crate) async fn jwt_app() -> TestApp {
    spawn_app_with(jwt_settings).await
}

/// A request with `Authorization: Bearer <token>` (or none).
pub(crate) async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let client = client(token);
    let mut request = client.request(method, app.url(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    Reply::read(request.send().await.expect("request")).await
}

/// An order of `quantity` units of product 2 placed with `user`'s token; its id.
async fn order_as(app: &TestApp, user: i32, quantity: i32) -> i64 {
    let body = json!({"items": [{"productId": 2, "quantity": quantity}]});
    let created = send(app, reqwest::Method::POST, "/api/orders", Some(&customer(user)), Some(body)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    created.json["orderId"].as_i64().unwrap()
}

#[track_caller]
pub(crate) fn assert_unauthorized(reply: &Reply, token_sent: bool) {
    reply.assert_error(401, "UNAUTHORIZED");
    let challenge = if token_sent { r#"Bearer error="invalid_token""# } else { "Bearer" };
    assert_eq!(reply.header("www-authenticate"), Some(challenge), "{}", reply.text);
}

/// In open mode the operator endpoints take the operator token and nothing else: no
/// credentials 401, a wrong token 401 invalid_token; a refused request changes nothing.
#[tokio::test]
async fn operator_endpoints_take_only_the_operator_token_in_open_mode() {
    let app = spawn_app().await;
    let order_id = app.order(2, 1).await;
    let before = app.snapshot().await;
    for token in [None, Some("not-the-operator-token"), Some(&customer(1) as &str)] {
        let restock =
            send(&app, reqwest::Method::POST, "/api/products/2/restock", token, Some(json!({"quantity": 5}))).await;
        assert_unauthorized(&restock, token.is_some());
        let status = format!("/api/orders/{order_id}/status");
        let ship = send(&app, reqwest::Method::PUT, &status, token, Some(json!({"status": "shipped"}))).await;
        assert_unauthorized(&ship, token.is_some());
        assert_unauthorized(&send(&app, reqwest::Method::GET, "/api/orders", token, None).await, token.is_some());
    }
    assert_eq!(app.snapshot().await, before);

    // The customer paths of open mode stay open, and the operator token works.
    assert_eq!(send(&app, reqwest::Method::GET, "/api/orders?userId=1", None, None).await.status, 200);
    let operator = Some(crate::common::OPERATOR_TOKEN);
    let restock =
        send(&app, reqwest::Method::POST, "/api/products/2/restock", operator, Some(json!({"quantity": 5}))).await;
    assert_eq!(restock.json["stock"], 54);
    let all = send(&app, reqwest::Method::GET, "/api/orders", operator, None).await;
    assert_eq!(all.json.as_array().map(Vec::len), Some(1), "{}", all.text);
}

/// Without `OPERATOR_TOKEN` the operator endpoints are disabled, with a 403 that says how to
/// enable them.
#[tokio::test]
async fn without_an_operator_token_operator_endpoints_are_disabled() {
    let app = spawn_app_with(|config| config.operator_token = None).await;
    let before = app.snapshot().await;
    let restock =
        send(&app, reqwest::Method::POST, "/api/products/2/restock", None, Some(json!({"quantity": 5}))).await;
    restock.assert_error(403, "FORBIDDEN");
    assert!(restock.json["error"].as_str().unwrap().contains("OPERATOR_TOKEN"), "{}", restock.text);
    assert_eq!(app.snapshot().await, before);
}

/// jwt mode: the operator endpoints without credentials are 401, with a bad token 401
/// invalid_token, with a customer's token 403; the operator token still works; refusals
/// change nothing.
#[tokio::test]
async fn operator_endpoints_in_jwt_mode_refuse_missing_bad_and_customer_credentials() {
    let app = jwt_app().await;
    let status_path = format!("/api/orders/{}/status", order_as(&app, 1, 1).await);
    let before = app.snapshot().await;
    for (token, expected) in [(None, 401), (Some("not-a-token".to_owned()), 401), (Some(customer(1)), 403)] {
        let token = token.as_deref();
        let restock = send(&app, reqwest::Method::POST, "/api/products/2/restock", token, Some(json!({"quantity": 5})));
        let restock = restock.await;
        let ship = send(&app, reqwest::Method::PUT, &status_path, token, Some(json!({"status": "shipped"}))).await;
        for reply in [restock, ship] {
            match expected {
                401 => assert_unauthorized(&reply, token.is_some()),
                _ => reply.assert_error(403, "FORBIDDEN"),
            }
        }
    }
    assert_eq!(app.snapshot().await, before);
    let operator = Some(crate::common::OPERATOR_TOKEN);
    let ship = send(&app, reqwest::Method::PUT, &status_path, operator, Some(json!({"status": "shipped"}))).await;
    assert_eq!(ship.status, 200, "{}", ship.text);
}

/// jwt mode: a customer orders as the token's user (`userId` may be left out), reads and
/// cancels their own order; another `userId` is 403 and writes nothing.
#[tokio::test]
async fn a_customer_orders_reads_and_cancels_as_the_tokens_user() {
    let app = jwt_app().await;
    let alice = customer(1);
    let items = json!([{"productId": 2, "quantity": 3}]);
    let created = send(&app, reqwest::Method::POST, "/api/orders", Some(&alice), Some(json!({"items": items}))).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order_id = created.json["orderId"].as_i64().unwrap();
    let owner: i32 = app.db.query_one("SELECT user_id FROM orders WHERE id = $1", &[&order_id]).await.unwrap().get(0);
    assert_eq!(owner, 1);

    let before = app.snapshot().await;
    let as_other =
        send(&app, reqwest::Method::POST, "/api/orders", Some(&alice), Some(json!({"userId": 2, "items": items})))
            .await;
    as_other.assert_error(403, "FORBIDDEN");
    assert_eq!(app.snapshot().await, before);

    let read = send(&app, reqwest::Method::GET, &format!("/api/orders/{order_id}"), Some(&alice), None).await;
    assert_eq!((read.status, read.json["user"]["id"].as_i64()), (200, Some(1)));
    let cancel = send(&app, reqwest::Method::PUT, &format!("/api/orders/{order_id}/cancel"), Some(&alice), None).await;
    assert_eq!(cancel.status, 200, "{}", cancel.text);
    assert_eq!(app.stock(2).await, 50);
}

/// Another user's order does not exist for a customer: 404 on read, cancel and status, and
/// nothing changes.
#[tokio::test]
async fn another_users_order_is_404_on_read_cancel_and_status() {
    let app = jwt_app().await;
    let order_id = order_as(&app, 1, 3).await;
    let before = app.snapshot().await;
    let bob = customer(2);
    for (method, path, body) in [
        (reqwest::Method::GET, format!("/api/orders/{order_id}"), None),
        (reqwest::Method::PUT, format!("/api/orders/{order_id}/cancel"), None),
        (reqwest::Method::PUT, format!("/api/orders/{order_id}/status"), Some(json!({"status": "shipped"}))),
    ] {
        let reply = send(&app, method.clone(), &path, Some(&bob), body).await;
        reply.assert_error(404, "ORDER_NOT_FOUND");
    }
    assert_eq!(app.snapshot().await, before);
    // Their own order's status is an operator's to change.
    let own = send(
        &app,
        reqwest::Method::PUT,
        &format!("/api/orders/{order_id}/status"),
        Some(&customer(1)),
        Some(json!({"status": "shipped"})),
    )
    .await;
    own.assert_error(403, "FORBIDDEN");
    assert_eq!(app.snapshot().await, before);
}

/// Reads of single orders are served in batches, one statement for many lookups, and within
/// one batch each customer still reads only their own orders (another's, or none, is 404).
/// The reads are held back by a lock on the orders table until the server has read all of
/// them, so that they queue and go together; PostgreSQL's own count of the statements it ran
/// (`pg_stat_statements`, on a private server) shows that they did: fewer statements than reads.
#[tokio::test]
async fn reads_batched_together_keep_each_customers_orders_their_own() {
    let pg = PrivatePostgres::start_counting_statements().await;
    pg.execute("CREATE DATABASE shop").await;
    let mut config = Config { database_url: pg.url("shop"), port: 0, ..Config::default() };
    jwt_settings(&mut config);
    order_api::prepare_database(&config, true).await.expect("migrate and seed");
    let app = spawn_app_at(config).await;
    // Watches from the `postgres` database, so that its own statements are not counted.
    let monitor = crate::common::connect(&pg.url("postgres")).await;

    let (alice_order, bob_order) = (order_as(&app, 1, 3).await, order_as(&app, 2, 2).await);
    let (alice, bob) = (customer(1), customer(2));
    let mut reads = Vec::new();
    for _ in 0..6 {
        reads.extend([
            (&alice, alice_order, 200),
            (&alice, bob_order, 404),
            (&bob, bob_order, 200),
            (&bob, alice_order, 404),
            (&bob, 999_999, 404),
        ]);
    }
    let holder = crate::common::connect(&pg.url("shop")).await;
    holder.batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE").await.unwrap();
    let before = pg.statements_run("shop").await;
    let requests: Vec<_> = reads
        .iter()
        .map(|(token, order_id, _)| raw::Request::get_as(&format!("/api/orders/{order_id}"), token))
        .collect();
    let in_flight = app.send_all(&requests).await;
    wait::for_lock_waiters(&monitor, "shop", 1).await;
    in_flight.read_by_the_server().await;
    holder.batch_execute("COMMIT").await.unwrap();
    let replies = in_flight.replies().await;

    for ((_, order_id, status), reply) in reads.iter().zip(&replies) {
        match status {
            200 => {
                assert_eq!(reply.status, 200, "{}", reply.text);
                assert_eq!(reply.json["orderId"], *order_id);
                let quantity = if *order_id == alice_order { 3 } else { 2 };
                assert_eq!(reply.json["items"][0]["quantity"], quantity, "{}", reply.text);
            }
            _ => reply.assert_error(404, "ORDER_NOT_FOUND"),
        }
    }
    let statements = pg.statements_run("shop").await - before;
    assert!(statements < reads.len() as i64, "{} reads took {statements} statements: no batch", reads.len());
    println!("{} reads of single orders in {statements} statements", reads.len());
}

/// A customer lists their own orders; another `userId` is 403; an operator's token (a JWT with
/// the operator role, or the operator token) lists everyone's.
#[tokio::test]
async fn listings_are_ones_own_unless_operator() {
    let app = jwt_app().await;
    for user in [1, 2, 2] {
        let body = json!({"items": [{"productId": 3, "quantity": 1}]});
        assert_eq!(
            send(&app, reqwest::Method::POST, "/api/orders", Some(&customer(user)), Some(body)).await.status,
            201
        );
    }
    let own = send(&app, reqwest::Method::GET, "/api/orders", Some(&customer(2)), None).await;
    let users: Vec<i64> = own.json.as_array().unwrap().iter().map(|o| o["userId"].as_i64().unwrap()).collect();
    assert_eq!(users, vec![2, 2]);
    let other = send(&app, reqwest::Method::GET, "/api/orders?userId=1", Some(&customer(2)), None).await;
    other.assert_error(403, "FORBIDDEN");

    let mut operator_claims = claims(9);
    operator_claims["roles"] = json!(["operator"]);
    for operator in [hs256(&operator_claims), crate::common::OPERATOR_TOKEN.to_owned()] {
        let all = send(&app, reqwest::Method::GET, "/api/orders", Some(&operator), None).await;
        assert_eq!(all.json.as_array().map(Vec::len), Some(3), "{}", all.text);
    }
    let mut scoped = claims(9);
    scoped["scope"] = json!("orders:read operator");
    let restock = send(
        &app,
        reqwest::Method::POST,
        "/api/products/3/restock",
        Some(&hs256(&scoped)),
        Some(json!({"quantity": 1})),
    )
    .await;
    assert_eq!(restock.status, 200);
    let by_customer =
        send(&app, reqwest::Method::POST, "/api/products/3/restock", Some(&customer(2)), Some(json!({"quantity": 1})))
            .await;
    by_customer.assert_error(403, "FORBIDDEN");
}

/// Idempotency keys are per user: the same key from two users makes two orders.
#[tokio::test]
async fn the_same_idempotency_key_from_two_users_makes_two_orders() {
    let app = jwt_app().await;
    let mut ids = Vec::new();
    for user in [1, 2] {
        let response = client(Some(&customer(user)))
            .post(app.url("/api/orders"))
            .header("idempotency-key", "shared-key")
            .json(&json!({"items": [{"productId": 2, "quantity": 1}]}))
            .send()
            .await
            .unwrap();
        let reply = Reply::read(response).await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        assert!(reply.header("idempotent-replayed").is_none());
        ids.push(reply.json["orderId"].as_i64().unwrap());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(app.count("orders").await, 2);
}

/// Every kind of bad token is a 401 invalid_token (none at all: 401 without the error), and
/// none of them writes anything.
#[tokio::test]
async fn bad_tokens_are_401_and_write_nothing() {
    let app = jwt_app().await;
    let before = app.snapshot().await;
    let order = json!({"userId": 1, "items": [{"productId": 2, "quantity": 1}]});
    let no_token = send(&app, reqwest::Method::POST, "/api/orders", None, Some(order.clone())).await;
    assert_unauthorized(&no_token, false);

    let good = customer(1);
    let with = |change: &dyn Fn(&mut Value)| {
        let mut claims = claims(1);
        change(&mut claims);
        hs256(&claims)
    };
    let unsigned = {
        let (head, rest) = good.split_once('.').unwrap();
        let _ = head;
        let none_header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = rest.split('.').next().unwrap();
        format!("{none_header}.{payload}.")
    };
    let bad_tokens: Vec<(&str, String)> = vec![
        ("malformed", "not-a-jwt".to_owned()),
        ("truncated", good[..good.len() - 10].to_owned()),
        ("huge (past 8 KiB, within the 16 KiB of headers)", format!("{good}{}", "A".repeat(10_000))),
        ("expired", with(&|c| c["exp"] = json!(now() - 3_600))),
        ("without exp", with(&|c| drop(c.as_object_mut().unwrap().remove("exp")))),
        ("not yet valid", with(&|c| c["nbf"] = json!(now() + 3_600))),
        ("other issuer", with(&|c| c["iss"] = json!("https://evil.test"))),
        ("other audience", with(&|c| c["aud"] = json!("another-api"))),
        ("without sub", with(&|c| drop(c.as_object_mut().unwrap().remove("sub")))),
        ("sub not a user id", with(&|c| c["sub"] = json!("alice"))),
        ("sub zero", with(&|c| c["sub"] = json!(0))),
        ("alg none", unsigned),
        (
            "other secret",
            encode(&Header::new(Algorithm::HS256), &claims(1), &EncodingKey::from_secret(&[7u8; 40]).unwrap()).unwrap(),
        ),
    ];
    for (kind, token) in &bad_tokens {
        let reply = send(&app, reqwest::Method::POST, "/api/orders", Some(token), Some(order.clone())).await;
        assert_eq!(reply.status, 401, "{kind}: {}", reply.text);
        assert_unauthorized(&reply, true);
        assert!(!reply.text.contains(token.as_str()), "{kind}: the body echoes the token");
        let read = send(&app, reqwest::Method::GET, "/api/orders", Some(token), None).await;
        assert_eq!(read.status, 401, "{kind}");
    }
    // Within the leeway a just-expired token still works; a good one works.
    let just_expired = with(&|c| c["exp"] = json!(now() - 5));
    let reply = send(&app, reqwest::Method::GET, "/api/orders", Some(&just_expired), None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(app.snapshot().await, before);
}

/// In jwt mode `/health`, the catalogue (`/api/products`, `/api/products/:id`) and
/// `/openapi.json` stay public: 200 without any credentials, while `/api/orders` is 401.
#[tokio::test]
async fn jwt_mode_keeps_health_the_catalogue_and_the_openapi_document_public() {
    let app = jwt_app().await;
    for path in ["/health", "/api/products", "/api/products/1", "/openapi.json"] {
        let reply = send(&app, reqwest::Method::GET, path, None, None).await;
        assert_eq!(reply.status, 200, "GET {path} without credentials: {}", reply.text);
    }
    assert_unauthorized(&send(&app, reqwest::Method::GET, "/api/orders", None, None).await, false);
}

/// The clock leeway is at most 60 s: `AUTH_JWT_LEEWAY_SECS=61` stops the start, naming the
/// variable. At 60 s a token expired 30 s ago is accepted and one expired 90 s ago refused
/// (each 30 s from the edge, far more than a slow test takes).
#[tokio::test]
async fn the_clock_leeway_is_capped_at_60_seconds() {
    let leeway = |value: &str| {
        let value = value.to_owned();
        Config::from_lookup(move |name| (name == "AUTH_JWT_LEEWAY_SECS").then(|| value.clone()))
    };
    assert_eq!(leeway("60").unwrap().jwt.leeway_secs, 60);
    let error = leeway("61").unwrap_err().to_string();
    assert!(error.contains("AUTH_JWT_LEEWAY_SECS") && error.contains("0 to 60"), "{error}");
    // A configuration built in code is held to the same cap when the service starts.
    let mut too_lenient = Config::default();
    jwt_settings(&mut too_lenient);
    too_lenient.jwt.leeway_secs = 61;
    assert!(order_api::auth::jwt::Verifier::new(&too_lenient.jwt).is_err(), "a 61 s leeway was accepted");

    let app = spawn_app_with(|config| {
        jwt_settings(config);
        config.jwt.leeway_secs = 60;
    })
    .await;
    let expired_ago = |seconds: i64| {
        let mut claims = claims(1);
        claims["exp"] = json!(now() - seconds);
        hs256(&claims)
    };
    let within = send(&app, reqwest::Method::GET, "/api/orders", Some(&expired_ago(30)), None).await;
    assert_eq!(within.status, 200, "{}", within.text);
    assert_unauthorized(&send(&app, reqwest::Method::GET, "/api/orders", Some(&expired_ago(90)), None).await, true);
}

/// `sub` may be a JSON number as well as a string of digits: a positive int4 either way. A
/// number outside int4, negative or fractional is refused and writes nothing.
#[tokio::test]
async fn a_numeric_sub_is_the_user() {
    let app = jwt_app().await;
    let with_sub = |sub: Value| {
        let mut claims = claims(1);
        claims["sub"] = sub;
        hs256(&claims)
    };
    let order = json!({"items": [{"productId": 2, "quantity": 1}]});
    let created =
        send(&app, reqwest::Method::POST, "/api/orders", Some(&with_sub(json!(2))), Some(order.clone())).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let owner: i32 = app
        .db
        .query_one("SELECT user_id FROM orders WHERE id = $1", &[&created.json["orderId"].as_i64().unwrap()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, 2, "the order is the numeric sub's");

    let before = app.snapshot().await;
    for sub in [json!(2_147_483_648_i64), json!(-2), json!(1.5)] {
        let token = with_sub(sub.clone());
        let refused = send(&app, reqwest::Method::POST, "/api/orders", Some(&token), Some(order.clone())).await;
        assert_eq!(refused.status, 401, "sub {sub}: {}", refused.text);
        assert_unauthorized(&refused, true);
    }
    assert_eq!(app.snapshot().await, before);
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A private key made for the test by `openssl genpkey`, as PEM.
pub(crate) fn generate_key(args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl").arg("genpkey").args(args).output().expect("run openssl");
    assert!(output.status.success(), "openssl genpkey {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// RS256, ES256 and EdDSA tokens verify against a JWKS file with freshly generated keys,
/// each key chosen by `kid`; a token whose header claims HS256 and is signed with the RSA
/// public key's bytes (the algorithm-confusion attack) is refused.
#[tokio::test]
async fn public_keys_from_a_jwks_file_verify_their_own_algorithm_only() {
    let rsa =
        EncodingKey::from_rsa_pem(&generate_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])).unwrap();
    let ec =
        EncodingKey::from_ec_pem(&generate_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"])).unwrap();
    let ed = EncodingKey::from_ed_pem(&generate_key(&["-algorithm", "ED25519"])).unwrap();
    let mut keys = Vec::new();
    for (kid, key, algorithm) in
        [("rsa-1", &rsa, Algorithm::RS256), ("ec-1", &ec, Algorithm::ES256), ("ed-1", &ed, Algorithm::EdDSA)]
    {
        let mut jwk = Jwk::from_encoding_key(key, algorithm).unwrap();
        jwk.common.key_id = Some(kid.into());
        keys.push(jwk);
    }
    let jwks = serde_json::to_string(&JwkSet { keys: keys.clone() }).unwrap();
    let app = spawn_app_with(|config| {
        config.auth_mode = AuthMode::Jwt;
        config.jwt.jwks = Some(jwks);
        config.jwt.issuer = Some(ISSUER.into());
        config.jwt.audience = Some(AUDIENCE.into());
    })
    .await;

    for (kid, key, algorithm) in
        [("rsa-1", &rsa, Algorithm::RS256), ("ec-1", &ec, Algorithm::ES256), ("ed-1", &ed, Algorithm::EdDSA)]
    {
        let header = Header { kid: Some(kid.into()), ..Header::new(algorithm) };
        let token = encode(&header, &claims(1), key).unwrap();
        let reply = send(&app, reqwest::Method::GET, "/api/orders", Some(&token), None).await;
        assert_eq!(reply.status, 200, "{kid}: {}", reply.text);
        // The right key under another key's kid fails.
        let wrong_kid =
            Header { kid: Some(if kid == "rsa-1" { "ec-1" } else { "rsa-1" }.into()), ..Header::new(algorithm) };
        let token = encode(&wrong_kid, &claims(1), key).unwrap();
        assert_unauthorized(&send(&app, reqwest::Method::GET, "/api/orders", Some(&token), None).await, true);
    }

    // A kid the JWKS does not have (a key rotated away) is refused, whatever signed it.
    let unknown = Header { kid: Some("rotated-away".into()), ..Header::new(Algorithm::RS256) };
    let token = encode(&unknown, &claims(1), &rsa).unwrap();
    assert_unauthorized(&send(&app, reqwest::Method::GET, "/api/orders", Some(&token), None).await, true);

    // HS256 with the RSA public key as the secret: no HMAC secret is configured, so there is
    // nothing to check it with, and the RSA key only verifies RS256.
    let public = serde_json::to_vec(&keys[0]).unwrap();
    for kid in [Some("rsa-1".to_owned()), None] {
        let header = Header { kid: kid.clone(), ..Header::new(Algorithm::HS256) };
        let forged = encode(&header, &claims(1), &EncodingKey::from_secret(&public).unwrap()).unwrap();
        let reply = send(&app, reqwest::Method::GET, "/api/orders", Some(&forged), None).await;
        assert_unauthorized(&reply, true);
    }
}

/// A run of the real binary that was given every kind of secret (the operator token, the
/// HS256 secret, a password in `DATABASE_URL`) and sent good and bad tokens writes none of
/// them to its log, and no error body echoes a token.
#[tokio::test]
async fn secrets_and_tokens_never_reach_the_log_or_an_error_body() {
    const PASSWORD: &str = "database-password-that-must-not-leak";
    let database = crate::common::TestDatabase::create().await;
    // Trust authentication takes any password, so the URL may carry one for the test.
    let url = database.url.replacen("postgresql://postgres@", &format!("postgresql://postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD), "{url}");
    let (open, gate) = std::sync::mpsc::channel();
    open.send(()).unwrap();
    let env = [("AUTH_MODE", "jwt"), ("AUTH_JWT_HS256_SECRET", SECRET), ("LOG_LEVEL", "debug")];
    let mut server = crate::common::process::ServerProcess::start_with_stdout_gate(&url, gate, &env).await;

    let good = hs256(&json!({"sub": "1", "exp": now() + 300}));
    let bad = format!("{good}x");
    let wrong_operator = "not-the-operator-token-but-long-enough-to-look-like-one";
    let mut bodies = String::new();
    for (method, path, token, body) in [
        (reqwest::Method::POST, "/api/orders", good.as_str(), json!({"items": [{"productId": 2, "quantity": 1}]})),
        (reqwest::Method::POST, "/api/orders", bad.as_str(), json!({"items": [{"productId": 2, "quantity": 1}]})),
        (reqwest::Method::POST, "/api/products/2/restock", crate::common::OPERATOR_TOKEN, json!({"quantity": 1})),
        (reqwest::Method::POST, "/api/products/2/restock", wrong_operator, json!({"quantity": 1})),
        (reqwest::Method::POST, "/api/products/2/restock", good.as_str(), json!({"quantity": 1})),
    ] {
        let response = client(Some(token)).request(method, server.url(path)).json(&body).send().await.unwrap();
        bodies.push_str(&response.text().await.unwrap());
    }
    server.terminate();
    assert!(server.wait_for_exit(std::time::Duration::from_secs(10)).await.is_some_and(|status| status.success()));
    let logs = server.logs();
    assert!(logs.contains("\"route\":\"/api/products/{productId}/restock\""), "the requests were logged:\n{logs}");
    for secret in [PASSWORD, SECRET, crate::common::OPERATOR_TOKEN, good.as_str(), bad.as_str(), wrong_operator] {
        assert!(!logs.contains(secret), "a secret is in the log:\n{logs}");
        assert!(!bodies.contains(secret), "a secret is in an error body:\n{bodies}");
    }
}
