//! Keys from `AUTH_JWT_JWKS_URL` (issue 12): fetched over real https from a local server with a
//! certificate from a CA the test makes, cached, fetched again when a token names a new `kid`
//! (at most once a minute), and kept while the URL is down. The server counts its fetches, so
//! each step checks both the answer and whether the service went to the network.

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use jsonwebtoken::{
    Algorithm, EncodingKey, Header, encode,
    jwk::{Jwk, JwkSet},
};
use order_api::auth::AuthMode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    auth::{AUDIENCE, ISSUER, assert_unauthorized, claims, generate_key, send},
    common::{TempDir, TestApp, spawn_app_with},
};

/// A local https server answering every GET with the JWKS it currently holds.
struct JwksServer {
    url: String,
    /// The CA that issued its certificate.
    ca_file: PathBuf,
    state: Arc<Served>,
    task: tokio::task::JoinHandle<()>,
    _dir: TempDir,
}

struct Served {
    jwks: Mutex<String>,
    /// While false, connections are closed at once: the URL is down.
    up: AtomicBool,
    fetches: AtomicUsize,
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

impl JwksServer {
    async fn start(keys: &[Jwk]) -> JwksServer {
        let dir = TempDir::new("jwks");
        let path = |name: &str| dir.path.join(name).to_str().unwrap().to_owned();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509", "-new"][..],
                &ec,
                &["-days", "1", "-subj", "/CN=jwks test CA", "-keyout", &path("ca.key"), "-out", &path("ca.pem")],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &["-subj", "/CN=127.0.0.1", "-keyout", &path("key.pem"), "-out", &path("csr.pem")],
            ]
            .concat(),
        );
        std::fs::write(
            dir.path.join("ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &path("csr.pem"),
            "-CA",
            &path("ca.pem"),
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &path("ext"),
            "-out",
            &path("cert.pem"),
        ]);
        let certs = CertificateDer::pem_file_iter(path("cert.pem")).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(path("key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}/.well-known/jwks.json", listener.local_addr().unwrap().port());
        let state = Arc::new(Served {
            jwks: Mutex::new(jwks_text(keys)),
            up: AtomicBool::new(true),
            fetches: AtomicUsize::new(0),
        });
        let served = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if !served.up.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed unanswered
                }
                let (acceptor, served) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    served.fetches.fetch_add(1, Ordering::SeqCst);
                    let body = served.jwks.lock().unwrap().clone();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(head.as_bytes()).await;
                    let _ = tls.write_all(body.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer { url, ca_file: dir.path.join("ca.pem"), state, task, _dir: dir }
    }

    fn serve(&self, keys: &[Jwk]) {
        *self.state.jwks.lock().unwrap() = jwks_text(keys);
    }

    fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn jwks_text(keys: &[Jwk]) -> String {
    serde_json::to_string(&JwkSet { keys: keys.to_vec() }).unwrap()
}

/// A signing key and its public JWK under `kid`.
struct SigningKey {
    kid: &'static str,
    key: EncodingKey,
    algorithm: Algorithm,
    jwk: Jwk,
}

impl SigningKey {
    fn rsa(kid: &'static str) -> SigningKey {
        let pem = generate_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        SigningKey::new(kid, EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS256)
    }

    fn ec(kid: &'static str) -> SigningKey {
        let pem = generate_key(&["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
        SigningKey::new(kid, EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES256)
    }

    fn new(kid: &'static str, key: EncodingKey, algorithm: Algorithm) -> SigningKey {
        let mut jwk = Jwk::from_encoding_key(&key, algorithm).unwrap();
        jwk.common.key_id = Some(kid.into());
        SigningKey { kid, key, algorithm, jwk }
    }

    /// A customer token for user 1, signed with this key, naming `kid`.
    fn token_as(&self, kid: &str) -> String {
        encode(&Header { kid: Some(kid.into()), ..Header::new(self.algorithm) }, &claims(1), &self.key).unwrap()
    }

    fn token(&self) -> String {
        self.token_as(self.kid)
    }
}

async fn app_on(server: &JwksServer, ca_file: Option<PathBuf>) -> TestApp {
    let url = server.url.clone();
    let app = spawn_app_with(move |config| {
        config.auth_mode = AuthMode::Jwt;
        config.jwt.jwks_url = Some(url);
        config.jwt.jwks_ca_file = ca_file.map(|path| path.to_str().unwrap().to_owned());
        config.jwt.issuer = Some(ISSUER.into());
        config.jwt.audience = Some(AUDIENCE.into());
    })
    .await;
    // Answered once the service serves, which is after its first fetch.
    assert_eq!(app.get("/health/live").await.status, 200);
    app
}

async fn list_orders(app: &TestApp, token: &str) -> crate::common::Reply {
    send(app, reqwest::Method::GET, "/api/orders", Some(token), None).await
}

#[tokio::test]
async fn keys_from_a_jwks_url_are_cached_refreshed_on_rotation_and_kept_while_it_is_down() {
    let (first, second) = (SigningKey::rsa("key-1"), SigningKey::ec("key-2"));
    let server = JwksServer::start(std::slice::from_ref(&first.jwk)).await;
    let app = app_on(&server, Some(server.ca_file.clone())).await;
    assert_eq!(server.fetches(), 1, "fetched once at start");

    // Known kid: verified from the cache, no fetch.
    for _ in 0..3 {
        assert_eq!(list_orders(&app, &first.token()).await.status, 200);
    }
    assert_eq!(server.fetches(), 1);

    // The provider rotates: a token with the new kid makes the service look again, once.
    server.serve(&[first.jwk.clone(), second.jwk.clone()]);
    let reply = list_orders(&app, &second.token()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(server.fetches(), 2);

    // Made-up kids within the minute: refused without another fetch each.
    for kid in ["key-3", "key-4", "key-5"] {
        assert_unauthorized(&list_orders(&app, &second.token_as(kid)).await, true);
    }
    assert_eq!(server.fetches(), 2, "an unknown kid refreshes at most once a minute");

    // The URL goes down: the cached keys keep working.
    server.set_up(false);
    assert_eq!(list_orders(&app, &first.token()).await.status, 200);
    let created = send(
        &app,
        reqwest::Method::POST,
        "/api/orders",
        Some(&second.token()),
        Some(serde_json::json!({"items": [{"productId": 2, "quantity": 1}]})),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(app.stock(2).await, 49);
}

/// Down at start: the service starts anyway, and while the URL stays down the tokens of the
/// keys it lacks are refused, 401 invalid_token, and write nothing.
#[tokio::test]
async fn tokens_are_401_and_write_nothing_while_the_jwks_url_is_down_at_start() {
    let key = SigningKey::rsa("key-1");
    let server = JwksServer::start(std::slice::from_ref(&key.jwk)).await;
    server.set_up(false);
    let app = app_on(&server, Some(server.ca_file.clone())).await;
    let before = app.snapshot().await;
    let order = serde_json::json!({"items": [{"productId": 2, "quantity": 1}]});
    let created = send(&app, reqwest::Method::POST, "/api/orders", Some(&key.token()), Some(order)).await;
    assert_unauthorized(&created, true);
    assert_unauthorized(&list_orders(&app, &key.token()).await, true);
    assert_eq!(app.snapshot().await, before);
    assert_eq!(server.fetches(), 0, "nothing could be fetched");
}

/// Down at start: the service starts anyway, its public paths work without keys, and the
/// first token after the URL is back is verified. (No token is sent while it is down: the
/// fetch such a token sets off counts against the once-a-minute refresh for unknown kids, so
/// a token within the minute after would be refused; the test above covers that time.)
#[tokio::test]
async fn a_jwks_url_down_at_start_is_fetched_once_it_answers() {
    let key = SigningKey::rsa("key-1");
    let server = JwksServer::start(std::slice::from_ref(&key.jwk)).await;
    server.set_up(false);
    let app = app_on(&server, Some(server.ca_file.clone())).await;
    assert_eq!(app.get("/api/products/2").await.status, 200, "public paths work without keys");
    server.set_up(true);
    let reply = list_orders(&app, &key.token()).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(server.fetches(), 1);
}

/// The JWKS server's certificate is not from a CA the service trusts (here: the system's
/// store, which does not hold the test's CA): nothing is fetched, its tokens are 401 and
/// nothing is written, never a 500.
#[tokio::test]
async fn a_jwks_url_whose_certificate_does_not_check_out_is_not_used() {
    let key = SigningKey::rsa("key-1");
    let server = JwksServer::start(std::slice::from_ref(&key.jwk)).await;
    let app = app_on(&server, None).await;
    assert_eq!(server.fetches(), 0, "the TLS handshake failed before any request");
    let created = send(
        &app,
        reqwest::Method::POST,
        "/api/orders",
        Some(&key.token()),
        Some(serde_json::json!({"items": [{"productId": 2, "quantity": 1}]})),
    )
    .await;
    assert_unauthorized(&created, true);
    assert_eq!(app.count("orders").await, 0);
}
