//! TLS client settings, with rustls (pure Rust apart from ring's primitives, so the static
//! distroless image needs no OpenSSL): for PostgreSQL (`db::target`, libpq's `sslmode`) and
//! for fetching a JWKS over https (`auth::jwks`).
//!
//! Certificate checking itself is rustls' and webpki's; this module only picks how much of it
//! a connection asks for.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

/// How much of the server's certificate is checked.
#[derive(Debug)]
pub enum Verify {
    /// Encryption only (libpq's `prefer` and `require`): any certificate is accepted, though
    /// the handshake's signatures are still checked against it.
    Nothing,
    /// The chain must lead to one of these roots; the host name is not compared
    /// (libpq's `verify-ca`).
    Chain(RootCertStore),
    /// The chain must lead to one of these roots and name the host connected to
    /// (libpq's `verify-full`, and every https fetch).
    Full(RootCertStore),
}

/// The trust anchors: the PEM certificates in `file`, or the system's store (which honours
/// `SSL_CERT_FILE` and `SSL_CERT_DIR`) when `file` is `None` or libpq's special `system`.
pub fn roots(file: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match file {
        None | Some("system") => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!("no CA certificate found in the system store ({:?})", found.errors));
            }
        }
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read the CA certificates in {path}: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("cannot read the CA certificates in {path}: {e}"))?;
            let (added, _unparsable) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{path} holds no usable CA certificate"));
            }
        }
    }
    Ok(roots)
}

/// A client configuration checking what `verify` asks, with ring as the crypto provider
/// (named here rather than installed process-wide, so nothing depends on start-up order).
pub fn client_config(verify: Verify) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    let config = match verify {
        Verify::Full(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        Verify::Chain(roots) => {
            let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("TLS set-up failed: {e}"))?;
            let verifier = Partial { chain: Some(chain), algorithms: provider.signature_verification_algorithms };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
        Verify::Nothing => {
            let verifier = Partial { chain: None, algorithms: provider.signature_verification_algorithms };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
    };
    Ok(config)
}

/// The certificate checks of `verify-ca` (the chain, not the name) and of `prefer`/`require`
/// (neither). The handshake signatures are always checked, so the session is still bound to
/// the certificate's key.
#[derive(Debug)]
struct Partial {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Partial {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        // webpki checks the chain (and validity dates) before the name, so a name mismatch
        // means everything verify-ca asks for has passed.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            outcome => outcome,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
