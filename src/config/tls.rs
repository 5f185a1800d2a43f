//! A service's TLS material: the certificate chain, its key and the client
//! CA, from files or from systemd credentials, read and checked when the
//! configuration is loaded, into the rustls configuration every handshake
//! of the service uses.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_cert::certificate::Version;
use x509_cert::der::Decode;
use x509_cert::Certificate;

/// Whether clients present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// None is asked for.
    None,
    /// Asked for; a client without one is served, one with a bad one is not.
    Optional,
    /// A client without a valid certificate from `tls_client_ca` is refused.
    Required,
}

/// A service's TLS, loaded and checked.
pub struct Tls {
    pub config: Arc<ServerConfig>,
    pub client_auth: ClientAuth,
    /// The keys as written, so that services sharing a socket can be
    /// checked to give it the same certificate.
    pub written: String,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// The keys as written: each a path or a credential name.
pub struct Sources<'a> {
    pub certificate: &'a str,
    pub key: &'a str,
    pub client_ca: Option<&'a str>,
    pub client_auth: ClientAuth,
}

/// A problem with one key: the key, and what is wrong.
pub type KeyProblem = (&'static str, String);

/// Reads and checks the certificate chain, the key, and the client CA.
pub fn load(sources: &Sources<'_>) -> Result<Tls, KeyProblem> {
    let (cert_path, chain) = certificates("tls_certificate", sources.certificate)?;
    // rustls checks the key against the certificate with webpki, which
    // takes X.509 v3 only, and would blame the key.
    if let Some(problem) = not_v3(&chain[0]) {
        return Err((
            "tls_certificate",
            format!("{}: {problem}", cert_path.display()),
        ));
    }
    let key_path = resolve(sources.key).map_err(|m| ("tls_key", m))?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls_key", &key_path)?).map_err(|e| {
        (
            "tls_key",
            format!(
                "{}: no private key in it ({e}; PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY expected)",
                key_path.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ("tls_certificate", e.to_string()))?;
    let builder = match (sources.client_ca, sources.client_auth) {
        (_, ClientAuth::None) => builder.with_no_client_auth(),
        (None, _) => {
            return Err((
                "tls_client_auth",
                "needs tls_client_ca: the certificates client certificates are checked against"
                    .into(),
            ))
        }
        (Some(ca), auth) => {
            let (ca_path, anchors) = certificates("tls_client_ca", ca)?;
            let mut roots = RootCertStore::empty();
            for (n, cert) in anchors.into_iter().enumerate() {
                // webpki takes a v1 certificate as a CA (it has no
                // extensions to check); the client certificates it issues
                // must be v3.
                roots.add(cert).map_err(|e| {
                    let why = match e {
                        rustls::Error::InvalidCertificate(c) => certificate_problem(&c),
                        other => other.to_string(),
                    };
                    (
                        "tls_client_ca",
                        format!(
                            "{}: certificate {} of the file cannot be a CA: {why}",
                            ca_path.display(),
                            n + 1
                        ),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match auth {
                ClientAuth::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            let verifier = verifier
                .build()
                .map_err(|e| ("tls_client_ca", format!("{}: {e}", ca_path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| unusable(e, &cert_path, &key_path))?;
    // No 0-RTT data: it could be replayed, and no command may run twice for one request.
    config.max_early_data_size = 0;
    // The keys may go to the kernel (kTLS) after the handshake.
    config.enable_secret_extraction = true;
    Ok(Tls {
        config: Arc::new(config),
        client_auth: sources.client_auth,
        written: format!(
            "tls_certificate = {:?}, tls_key = {:?}, tls_client_ca = {:?}, tls_client_auth = {:?}",
            sources.certificate, sources.key, sources.client_ca, sources.client_auth
        ),
    })
}

/// Why rustls cannot serve this certificate with this key, as a problem
/// of the key at fault.
fn unusable(e: rustls::Error, cert_path: &Path, key_path: &Path) -> KeyProblem {
    let (cert, key) = (cert_path.display(), key_path.display());
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => (
            "tls_key",
            format!(
                "{key}: does not go with tls_certificate {cert}: the certificate's public key is not this key's"
            ),
        ),
        rustls::Error::InvalidCertificate(c) => {
            ("tls_certificate", format!("{cert}: {}", certificate_problem(&c)))
        }
        // The key could not be loaded: "failed to parse private key as RSA, ECDSA, or EdDSA".
        rustls::Error::General(why) => (
            "tls_key",
            format!("{key}: not a key rustls can sign with ({why}; RSA, ECDSA P-256 or P-384, or Ed25519 expected)"),
        ),
        other => ("tls_key", format!("{key}: cannot be used with tls_certificate {cert}: {other}")),
    }
}

/// Why a certificate that is not X.509 v3 is refused, with how to issue
/// one that is; None for a v3 certificate (or one x509-cert cannot read,
/// which rustls then judges).
fn not_v3(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = Certificate::from_der(cert).ok()?;
    let version = match cert.tbs_certificate.version {
        Version::V3 => return None,
        Version::V1 => 1,
        Version::V2 => 2,
    };
    let name = common_name(&cert)
        .filter(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c))
        })
        .unwrap_or_else(|| "NAME".into());
    Some(format!(
        "an X.509 v{version} certificate, which rustls (webpki) does not accept: issue a v3 one, \
         e.g. with `openssl x509 -req … -extfile <(printf \"subjectAltName=DNS:{name}\")` \
         (any extension makes it v3), or with `openssl req -x509 …`, which makes v3"
    ))
}

/// The subject's common name (CN), if it has one.
fn common_name(cert: &Certificate) -> Option<String> {
    const CN: &str = "2.5.4.3";
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid.to_string() == CN)
        .and_then(|atv| std::str::from_utf8(atv.value.value()).ok())
        .map(str::to_owned)
}

/// Every certificate in a PEM file (at least one), and the file's path.
fn certificates(
    key: &'static str,
    source: &str,
) -> Result<(PathBuf, Vec<CertificateDer<'static>>), KeyProblem> {
    let path = resolve(source).map_err(|m| (key, m))?;
    let pem = read(key, &path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err((
            key,
            format!(
                "{}: no certificate in it (PEM CERTIFICATE blocks expected)",
                path.display()
            ),
        ));
    }
    Ok((path, certs))
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, KeyProblem> {
    std::fs::read(path).map_err(|e| {
        (
            key,
            format!("{}: {}", path.display(), crate::fdio::reason(&e)),
        )
    })
}

/// An absolute path as it is; a name without '/' is a systemd credential
/// (`LoadCredential=NAME:…`), in `$CREDENTIALS_DIRECTORY`.
pub(super) fn resolve(source: &str) -> Result<PathBuf, String> {
    if source.starts_with('/') {
        return Ok(PathBuf::from(source));
    }
    if source.is_empty() || source.contains('/') {
        return Err(format!(
            "{source:?}: an absolute path, or the name of a credential (LoadCredential=), expected"
        ));
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Ok(Path::new(&dir).join(source)),
        None => Err(format!(
            "{source:?} names a credential, and $CREDENTIALS_DIRECTORY is not set: give the unit \
             LoadCredential={source}:/path/to/file (see splice-relay.toml(5)), or write an absolute path"
        )),
    }
}

/// What is wrong with a certificate, in words: the common problems said
/// plainly, others by their name in rustls or webpki split into words
/// (`UnsupportedCriticalExtension`: "unsupported critical extension").
pub fn certificate_problem(e: &rustls::CertificateError) -> String {
    match e {
        rustls::CertificateError::BadEncoding => "not a well-formed X.509 certificate".into(),
        rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
            "expired".into()
        }
        rustls::CertificateError::NotValidYet
        | rustls::CertificateError::NotValidYetContext { .. } => "not valid yet".into(),
        rustls::CertificateError::Revoked => "revoked".into(),
        rustls::CertificateError::UnknownIssuer => "issued by no CA it is checked against".into(),
        rustls::CertificateError::BadSignature => "its signature does not verify".into(),
        rustls::CertificateError::InvalidPurpose
        | rustls::CertificateError::InvalidPurposeContext { .. } => {
            "not issued for this use (its extendedKeyUsage)".into()
        }
        rustls::CertificateError::Other(other) => match other.to_string().as_str() {
            "UnsupportedCertVersion" => "an X.509 v1 (or v2) certificate, which rustls (webpki) \
                 does not accept: it must be v3 (`openssl x509 -req` makes v1 unless -extfile \
                 gives it an extension)"
                .into(),
            why => words(why),
        },
        e => words(&e.to_string()),
    }
}

/// `UnsupportedCriticalExtension` as "unsupported critical extension"; any
/// other text as it is.
pub fn words(text: &str) -> String {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric()) {
        return text.to_owned();
    }
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_and_paths() {
        assert_eq!(resolve("/etc/x.pem").unwrap(), PathBuf::from("/etc/x.pem"));
        assert!(resolve("tls/x.pem")
            .unwrap_err()
            .contains("an absolute path"));
        assert!(resolve("").is_err());
    }
}
