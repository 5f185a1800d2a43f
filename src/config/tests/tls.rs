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
        r#"handshake_timeout: applies only with protocol = "websocket" or tls_certificate"#
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
