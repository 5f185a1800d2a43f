//! The TLS keys: a certificate and its key, read and matched when the file
//! is loaded; the keys that need a certificate; client certificates.

use std::time::Duration;

use super::*;

/// A fixture's absolute path (src/config/fixtures).
fn fixture(name: &str) -> String {
    format!("{}/src/config/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tls_keys_are_checked_where_they_stand() {
    let svc = |extra: &str| {
        load_str(
            "t.toml",
            &format!("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{extra}\n"),
        )
    };
    let e = |extra: &str| svc(extra).unwrap_err().to_string();
    let (cert, key, other) = (
        fixture("tls-cert.pem"),
        fixture("tls-key.pem"),
        fixture("tls-other-key.pem"),
    );
    let good = svc(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\""
    ))
    .unwrap();
    let tls = good.services[0].tls.as_ref().expect("TLS");
    assert_eq!(tls.client_auth, ClientAuth::None);
    assert_eq!(
        good.services[0].handshake_timeout,
        defaults::HANDSHAKE_TIMEOUT
    );

    assert_eq!(
        e(&format!("tls_key = \"{key}\"")),
        r#"t.toml:4:11: service "a": tls_key: applies only with tls_certificate"#
    );
    assert!(e(&format!("tls_certificate = \"{cert}\"")).contains("tls_certificate: needs tls_key"));
    assert!(
        e("tls_certificate = \"/nonexistent.pem\"\ntls_key = \"/k\"")
            .contains("tls_certificate: /nonexistent.pem: No such file or directory")
    );
    assert!(
        e(&format!("tls_certificate = \"{key}\"\ntls_key = \"{key}\""))
            .contains("no certificate in it")
    );
    assert!(
        e(&format!(
            "tls_certificate = \"{cert}\"\ntls_key = \"{cert}\""
        ))
        .contains("tls_key: ")
            && e(&format!(
                "tls_certificate = \"{cert}\"\ntls_key = \"{cert}\""
            ))
            .contains("no private key in it")
    );
    assert!(e(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{other}\""
    ))
    .contains("does not go with tls_certificate"));
    assert!(e(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_auth = \"optional\""
    ))
    .contains("tls_client_auth: needs tls_client_ca"));
    assert!(e("tls_certificate = \"certs/x.pem\"")
        .contains("an absolute path, or the name of a systemd credential"));
    assert!(e("handshake_timeout = 3").contains(
        r#"handshake_timeout: applies only with protocol = "websocket" or "http", or tls_certificate"#
    ));
    // A CA for client certificates asks for them unless told otherwise.
    let with_ca = svc(&format!(
        "tls_certificate = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{cert}\"\nhandshake_timeout = \"2s\""
    ))
    .unwrap();
    let s = &with_ca.services[0];
    assert_eq!(s.tls.as_ref().unwrap().client_auth, ClientAuth::Required);
    assert_eq!(s.handshake_timeout, Duration::from_secs(2));
}

/// Runs the openssl command line in `dir`, as an administrator would.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and two certificates for it, made the two common ways:
/// `v1.pem` by `openssl x509 -req` without `-extfile` (X.509 v1), `v3.pem`
/// by `openssl req -x509` (X.509 v3).
fn key_with_v1_and_v3_certificates() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        d,
        &[
            "x509", "-req", "-in", "req.csr", "-signkey", "key.pem", "-days", "30", "-out",
            "v1.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-key",
            "key.pem",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-out",
            "v3.pem",
        ],
    );
    dir
}

#[test]
fn a_v1_certificate_is_named_with_the_way_to_a_v3_one() {
    let made = key_with_v1_and_v3_certificates();
    let file = |name: &str| made.path().join(name).display().to_string();
    let (v1, v3, key) = (file("v1.pem"), file("v3.pem"), file("key.pem"));
    let text = |cert: &str| {
        format!(
            "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ntls_certificate = \"{cert}\"\ntls_key = \"{key}\"\n"
        )
    };
    assert_eq!(
        err(&text(&v1)),
        format!(
            "t.toml:4:19: service \"a\": tls_certificate: {v1}: an X.509 v1 certificate, which \
             rustls (webpki) does not accept: issue a v3 one, e.g. with `openssl x509 -req … \
             -extfile <(printf \"subjectAltName=DNS:localhost\")` (any extension makes it v3), \
             or with `openssl req -x509 …`, which makes v3"
        )
    );
    // The same key with a v3 certificate is good.
    load_str("t.toml", &text(&v3)).unwrap();
}

#[test]
fn a_key_that_is_not_the_certificates_is_told_in_words() {
    let (cert, other) = (fixture("tls-cert.pem"), fixture("tls-other-key.pem"));
    let e = err(&format!(
        "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ntls_certificate = \"{cert}\"\ntls_key = \"{other}\"\n"
    ));
    assert_eq!(
        e,
        format!(
            "t.toml:5:11: service \"a\": tls_key: {other}: does not go with tls_certificate \
             {cert}: the certificate's public key is not this key's"
        )
    );
}

#[test]
fn a_client_ca_that_is_no_certificate_is_told_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (cert, key) = (fixture("tls-cert.pem"), fixture("tls-key.pem"));
    let e = err(&format!(
        "[[service]]\nname = \"a\"\ncommand = [\"true\"]\ntls_certificate = \"{cert}\"\n\
         tls_key = \"{key}\"\ntls_client_ca = \"{}\"\n",
        ca.display()
    ));
    assert_eq!(
        e,
        format!(
            "t.toml:6:17: service \"a\": tls_client_ca: {}: certificate 1 of the file cannot be \
             a CA: not a well-formed X.509 certificate",
            ca.display()
        )
    );
}
