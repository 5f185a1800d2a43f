//! TLS (`tls_certificate`, `tls_key`, `tls_client_ca`): what real clients
//! (openssl s_client, curl, Python's ssl, Python's websockets, Chromium) get,
//! what the command learns, every failed handshake refused before any
//! command runs, renewals on reload, and a flood of handshakes.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::socket::{setsockopt, sockopt};

fn tls_serve(pki: &Pki, command: &str, extra: &str) -> (Daemon, SocketAddr) {
    serve(command, &format!("{}{extra}", pki.tls_lines()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// curl to https://localhost:PORT/ (resolved to `addr`), with `args`.
fn curl(addr: SocketAddr, pki: &Pki, args: &[&str]) -> Output {
    run(Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "20",
            "--cacert",
            &pki.file("ca.pem"),
        ])
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .args(args)
        .arg(format!("https://localhost:{}/", addr.port())))
}

/// Whether the record names who encrypted as the start-up line does: the
/// daemon (rustls) on a kernel without kTLS, like the machines here, or the
/// kernel (tests/ktls.rs).
fn encrypts(d: &Daemon, r: &Record) -> bool {
    let line = d.wait_log(&["tls: "]);
    let who = if line.contains("the kernel encrypts") {
        " kernel"
    } else {
        " userspace"
    };
    r.tls.ends_with(who)
}

/// An HTTP answer from a shell command, for curl.
const HTTP: &str = r"printf 'HTTP/1.0 200 OK\\r\\n\\r\\n'";

// --- Real clients ---

#[test]
fn openssl_and_curl_are_served_and_the_command_learns_the_session() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(
        &pki,
        &sh("echo $SSL_PROTOCOL $SSL_CIPHER $SSL_TLS_SNI $SSL_CLIENT_VERIFY; while read l; do echo got:$l; done"),
        "stdin = \"client\"",
    );
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-servername",
            "localhost",
        ])
        .args([
            "-CAfile",
            &pki.file("ca.pem"),
            "-connect",
            &addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = s_client.stdin.take().unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(s_client.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let parts: Vec<&str> = first.split(' ').collect();
    assert_eq!(parts[0], "TLSv1.3", "{first}");
    assert!(
        parts[1].starts_with("TLS_"),
        "an OpenSSL suite name: {first}"
    );
    assert_eq!(&parts[2..], ["localhost", "NONE"], "{first}");
    stdin.write_all(b"typed\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "got:typed");
    drop(stdin);
    let _ = s_client.kill();
    let _ = s_client.wait();
    let r = d.wait_record_where(|r| r.reason == "client-gone" || r.reason == "output-ended");
    assert!(r.tls.starts_with("TLSv1.3 TLS_") && encrypts(&d, &r), "{r}");
    assert_eq!(r.bytes_received, 6, "{r}");

    // curl, TLS 1.2 and 1.3.
    let (d, addr) = tls_serve(
        &pki,
        &sh(&format!("{HTTP}; echo $SSL_PROTOCOL $SSL_CIPHER")),
        "",
    );
    for (version, want) in [
        ("--tlsv1.2", "TLSv1.2 ECDHE-ECDSA-"),
        ("--tlsv1.3", "TLSv1.3 TLS_"),
    ] {
        let args: &[&str] = if version == "--tlsv1.2" {
            &[version, "--tls-max", "1.2"]
        } else {
            &[version]
        };
        let out = curl(addr, &pki, args);
        assert!(
            text(&out.stdout).starts_with(want),
            "{version}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    d.wait_records_where(2, |r| r.reason == "output-ended");
}

/// The command itself checks what it learns of the client's certificate,
/// against what openssl says of the file.
#[test]
fn client_certificates_reach_the_command() {
    let pki = Pki::new();
    let client = pki.file("client.pem");
    let subject = x509(&client, &["-subject", "-nameopt", "RFC2253"]);
    let subject = subject.trim_start_matches("subject=");
    let issuer = x509(&client, &["-issuer", "-nameopt", "RFC2253"]);
    let issuer = issuer.trim_start_matches("issuer=");
    let fingerprint = x509(&client, &["-fingerprint", "-sha256"]);
    let dir = tempfile::tempdir().unwrap();
    let check = dir.path().join("check.sh");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\nprintf 'HTTP/1.0 200 OK\\r\\n\\r\\n'\n\
             [ \"$SSL_CLIENT_VERIFY\" = SUCCESS ] || echo \"verify: $SSL_CLIENT_VERIFY\"\n\
             [ \"$SSL_CLIENT_S_DN\" = '{subject}' ] || echo \"subject: $SSL_CLIENT_S_DN\"\n\
             [ \"$SSL_CLIENT_I_DN\" = '{issuer}' ] || echo \"issuer: $SSL_CLIENT_I_DN\"\n\
             [ \"$SSL_CLIENT_M_SERIAL\" = {CLIENT_SERIAL} ] || echo \"serial: $SSL_CLIENT_M_SERIAL\"\n\
             got=$(printf '%s' \"$SSL_CLIENT_CERT\" | openssl x509 -noout -fingerprint -sha256)\n\
             [ \"$got\" = '{fingerprint}' ] || echo \"cert: $got\"\n\
             echo checked\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (d, addr) = tls_serve(
        &pki,
        &format!(r#"["{}"]"#, check.display()),
        &format!("tls_client_ca = \"{}\"", pki.file("ca.pem")),
    );
    let out = curl(
        addr,
        &pki,
        &["--cert", &client, "--key", &pki.file("client-key.pem")],
    );
    assert_eq!(
        text(&out.stdout),
        "checked\n",
        "{}\n{}",
        text(&out.stderr),
        d.log_text()
    );
    d.wait_record_where(|r| r.reason == "output-ended");
}

/// Bulk output arrives whole through the layer on every transfer, to
/// Python's ssl; with optional client certificates, a client without one is
/// served and the command is told so.
#[test]
fn output_arrives_whole_on_every_transfer() {
    let pki = Pki::new();
    let file = pki.path("data");
    let want = random_file(&file, 20_000_000);
    for transfer in ["socketpair", "splice", "copy", "direct"] {
        let (d, addr) = tls_serve(
            &pki,
            &sh(&format!("echo $SSL_CLIENT_VERIFY; cat {}", file.display())),
            &format!(
                "transfer = \"{transfer}\"\ntls_client_ca = \"{}\"\ntls_client_auth = \"optional\"",
                pki.file("ca.pem")
            ),
        );
        let out = python_tls(
            addr,
            &pki,
            r#"import hashlib
ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    data = bytearray()
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        data += chunk
first, rest = data.split(b"\n", 1)
print(first.decode(), len(rest), hashlib.sha256(rest).hexdigest())"#,
        );
        let r = d.wait_record(1);
        assert_eq!(
            out.trim(),
            format!("NONE 20000000 {want}"),
            "{transfer}: {r}"
        );
        assert!(
            r.reason == "output-ended" || r.reason == "command-exited",
            "{transfer}: {r}"
        );
        assert_eq!(r.bytes, 20_000_005, "{transfer}: {r}");
    }
}

/// A daemon whose service gives the command the plaintext side itself
/// (`transfer = "direct"`: what the command wrote waits in the layer or the
/// kernel, nowhere else), with small kernel buffers on the daemon's side of
/// the client's socket too (systemd's `SendBuffer=`).
fn small_buffers_serve(pki: &Pki, command: &str, extra: &str) -> (Daemon, SocketAddr) {
    let (passed, addr) = pass_tcp("test");
    setsockopt(&passed.fd, sockopt::SndBuf, &65536).unwrap();
    let config = one_service(
        command,
        &format!("{}transfer = \"direct\"\n{extra}", pki.tls_lines()),
    );
    (Daemon::start(&config, vec![passed]), addr)
}

/// Whether the daemon encrypts in user space (the TLS layer), as on the
/// machines here; on a kernel with the TLS module the kernel does, and the
/// layer's tests have nothing to test.
fn layer_encrypts(d: &Daemon) -> bool {
    let line = d.wait_log(&["tls: "]);
    if line.contains("the kernel encrypts") {
        eprintln!("skipped: the kernel encrypts here, not the daemon's layer");
        return false;
    }
    true
}

/// A client that pauses gets the whole output even when the command ended
/// long before, as the kernel would give it over a socket the daemon
/// closed: `kill_grace` (300 ms here) bounds the wait for its close, not
/// for it to take the rest. It pauses for a second once the command has
/// written all, reading slowly before, so that the rest waits in the daemon
/// as well as in the kernel.
#[test]
fn a_client_that_pauses_gets_all_of_an_output_that_ended_before() {
    let pki = Pki::new();
    let (file, written) = (pki.path("data"), pki.path("written"));
    let want = random_file(&file, 8_000_000);
    let command = sh(&format!(
        "cat {}; touch {}",
        file.display(),
        written.display()
    ));
    let (d, addr) = small_buffers_serve(&pki, &command, "");
    if !layer_encrypts(&d) {
        return;
    }
    let out = python_tls(
        addr,
        &pki,
        &format!(
            r#"import hashlib
written = os.path.join(pki, "written")
{SMALL_WINDOW}
data, paused = bytearray(), False
while True:
    chunk = s.recv(16384)
    if not chunk:
        break
    data += chunk
    time.sleep(0.005)
    if not paused and os.path.exists(written):
        paused = True
        time.sleep(1)
print(len(data), hashlib.sha256(data).hexdigest(), paused)"#
        ),
    );
    assert_eq!(out.trim(), format!("8000000 {want} True"));
    let r = d.wait_record(1);
    assert_eq!(r.reason, "command-exited", "{r}");
    assert_eq!(r.bytes, 8_000_000, "{r}");
}

/// A client that stops taking the output after the command ended is ended
/// by `idle_timeout`, as it would be while the command ran: its record
/// comes while it still holds its socket, and says so.
#[test]
fn a_client_that_stops_reading_after_the_end_meets_idle_timeout() {
    let pki = Pki::new();
    // Of the 300,000 bytes the layer takes 210-250 KB before the client's
    // window and the socket's buffer are full, and the command's socket
    // pair holds the rest (it takes about 196 KB of 8 KiB writes). The
    // idle timeout leaves a loaded machine time to run the command: at 1 s
    // it once came while the command was still writing, with room left.
    let (d, addr) = small_buffers_serve(
        &pki,
        &sh("head -c 300000 /dev/zero"),
        "idle_timeout = \"3s\"",
    );
    if !layer_encrypts(&d) {
        return;
    }
    let script = format!(
        "import socket, ssl, sys\nport, ca = int(sys.argv[1]), sys.argv[2]\n{SMALL_WINDOW}\n\
         print('connected', flush=True)\nsys.stdin.read()"
    );
    let mut client = Command::new(common::ws::PYTHON)
        .args(["-c", &script, &addr.port().to_string(), &pki.file("ca.pem")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let r = d.wait_record(1);
    // The command wrote all and exited (it was not ended for the client).
    assert_eq!(
        (r.reason.as_str(), r.exit.as_str()),
        ("idle-timeout", "0"),
        "{r}"
    );
    assert!(
        client.try_wait().unwrap().is_none(),
        "the client still holds its socket"
    );
    drop(client.stdin.take());
    assert!(client.wait().unwrap().success());
}

/// For a Python client: `s`, a TLS socket whose receive buffer is 64 KiB.
const SMALL_WINDOW: &str = r#"raw = socket.socket()
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
raw.connect(("127.0.0.1", port))
s = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")"#;

// --- Failed handshakes ---

/// Every failed handshake is refused before any command runs, logged in
/// episodes with its reason.
#[test]
fn failed_handshakes_start_no_command() {
    let pki = Pki::new();
    let mark = pki.path("ran");
    // At debug level every refusal is logged, not only each episode's first.
    let config = format!(
        "log_level = \"debug\"\n{}",
        one_service(
            &sh(&format!("touch {}; echo hi", mark.display())),
            &format!(
                "{}tls_client_ca = \"{}\"\nhandshake_timeout = \"1s\"",
                pki.tls_lines(),
                pki.file("ca.pem")
            ),
        )
    );
    let (passed, addr) = pass_tcp("test");
    let d = Daemon::start(&config, vec![passed]);
    // Plaintext HTTP on the TLS port, and garbage.
    let plain = run(Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{}/", addr.port())));
    assert!(!plain.status.success());
    let mut junk = TcpStream::connect(addr).unwrap();
    junk.set_read_timeout(Some(PATIENCE)).unwrap();
    junk.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    let (got, _) = read_until_end(&mut junk);
    assert!(
        got.is_empty() || got[0] == 21,
        "nothing, or an alert: {got:?}"
    );

    // A ClientHello cut short: the start of a real one, then the close.
    python_tls(
        addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = outgoing.read()
with socket.create_connection(("127.0.0.1", port)) as s:
    s.sendall(hello[: len(hello) // 2])
"#,
    );

    // Client certificates: none, from another CA, expired.
    let no_cert = curl(addr, &pki, &[]);
    assert!(!no_cert.status.success(), "served without a certificate");
    for (cert, key) in [
        ("stranger.pem", "stranger-key.pem"),
        ("expired.pem", "expired-key.pem"),
    ] {
        let out = curl(
            addr,
            &pki,
            &["--cert", &pki.file(cert), "--key", &pki.file(key)],
        );
        assert!(!out.status.success(), "{cert}: served");
    }

    // No suite in common (CBC with RSA key exchange only), and TLS 1.1.
    for args in [
        &["-tls1_2", "-cipher", "AES128-SHA"][..],
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
    ] {
        let out = run(Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(args));
        assert!(!out.status.success(), "{args:?}: {}", text(&out.stdout));
    }

    // One byte a second: the handshake's time runs out.
    let hello = python_tls(
        addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
try:
    obj.do_handshake()
except ssl.SSLWantReadError:
    pass
sys.stdout.write(outgoing.read().hex())"#,
    );
    let hello: Vec<u8> = (0..hello.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hello[i..i + 2], 16).unwrap())
        .collect();
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let started = std::time::Instant::now();
    for byte in &hello {
        if slow.write_all(&[*byte]).is_err() || !nothing_yet(&slow) {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (_, _) = read_until_end(&mut slow);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    for (reason, detail) in [
        ("tls-not-tls", "plaintext HTTP"),
        ("tls-handshake", "truncated"),
        ("tls-client-certificate", "none presented"),
        ("tls-client-certificate", "not issued by tls_client_ca"),
        ("tls-client-certificate", "expired"),
        ("tls-handshake", "nothing in common"),
        ("tls-timeout", "within 1000 ms"),
    ] {
        let refusal = d.wait_log(&["refused", &format!("reason=\"{reason}\""), detail]);
        assert!(!refusal.contains("connection ended"), "{refusal}");
    }
    assert!(!mark.exists(), "a refused client ran the command");
    assert!(d.records().is_empty(), "{:?}", d.records());
}

/// A record the client forges after the handshake ends the connection as
/// tls-error, with the command ended as on a disconnect.
#[test]
fn a_forged_record_ends_the_connection() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(&pki, &sh("echo ready; exec sleep 60"), "");
    python_tls(
        addr,
        &pki,
        &(FORGED_RECORD.to_owned()
            + r#"raw.settimeout(20)
while raw.recv(65536):
    pass"#),
    );
    let r = d.wait_record_where(|r| r.reason == "tls-error");
    assert_eq!(r.exit, "SIGTERM", "{r}");
}

// --- X.509 versions ---

/// Signs `NAME.csr` with `ca` into `NAME.pem` as the common recipe does
/// (`openssl x509 -req`): X.509 v1, unless `ext` gives it extensions.
fn sign(dir: &std::path::Path, name: &str, ca: &str, serial: &str, ext: Option<&str>) {
    let (csr, out) = (format!("{name}.csr"), format!("{name}.pem"));
    let (ca_cert, ca_key) = (format!("{ca}.pem"), format!("{ca}-key.pem"));
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-CA", &ca_cert, "-CAkey", &ca_key,
    ];
    args.extend(["-set_serial", serial, "-days", "30", "-out", &out]);
    let ext_file = format!("{name}.ext");
    if let Some(ext) = ext {
        std::fs::write(dir.join(&ext_file), ext).unwrap();
        args.extend(["-extfile", &ext_file]);
    }
    openssl(dir, &args);
}

/// A v1 server certificate (`openssl x509 -req` without `-extfile`) is
/// refused at load, as a certificate problem with the way to a v3 one; the
/// key is not blamed.
#[test]
fn a_v1_certificate_is_refused_at_check_with_the_way_to_a_v3_one() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    key_and_request(dir, "v1", "/CN=localhost");
    sign(dir, "v1", "ca", "0x10", None);
    let config = pki.path("v1.toml");
    std::fs::write(
        &config,
        one_service(
            "[\"true\"]",
            &format!(
                "tls_certificate = \"{}\"\ntls_key = \"{}\"",
                pki.file("v1.pem"),
                pki.file("v1-key.pem")
            ),
        ),
    )
    .unwrap();
    let check = run(Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&config));
    assert_eq!(check.status.code(), Some(78));
    let said = text(&check.stderr);
    assert!(
        said.contains(&format!(
            "{}:5:19: service \"test\": tls_certificate: {}: an X.509 v1 certificate, which \
             rustls (webpki) does not accept: issue a v3 one, e.g. with `openssl x509 -req … \
             -extfile <(printf \"subjectAltName=DNS:localhost\")`",
            config.display(),
            pki.file("v1.pem")
        )),
        "{said}"
    );
    assert!(
        said.contains("`openssl req -x509 …`, which makes v3"),
        "{said}"
    );
    assert!(
        !said.contains("tls_key") && !said.contains("Other("),
        "{said}"
    );
}

/// A v1 CA (`openssl x509 -req -signkey`, the old recipe) is a CA webpki
/// takes, so `tls_client_ca` may be one: the v3 client certificates it
/// issues are served; a v1 client certificate is refused, and the log
/// says why in words.
#[test]
fn a_v1_client_ca_serves_v3_client_certificates_and_refuses_v1_ones_in_words() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    key_and_request(dir, "old-ca", "/CN=an old CA");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "old-ca.csr",
            "-signkey",
            "old-ca-key.pem",
            "-days",
            "30",
            "-out",
            "old-ca.pem",
        ],
    );
    assert!(x509(&pki.file("old-ca.pem"), &["-text"]).contains("Version: 1 (0x0)"));
    key_and_request(dir, "v3-client", "/CN=v3 client");
    let client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
    sign(dir, "v3-client", "old-ca", "0x11", Some(client_ext));
    key_and_request(dir, "v1-client", "/CN=v1 client");
    sign(dir, "v1-client", "old-ca", "0x12", None);

    let config = format!(
        "log_level = \"debug\"\n{}",
        one_service(
            &sh(&format!("{HTTP}; echo served")),
            &format!(
                "{}tls_client_ca = \"{}\"",
                pki.tls_lines(),
                pki.file("old-ca.pem")
            ),
        )
    );
    let (passed, addr) = pass_tcp("test");
    let d = Daemon::start(&config, vec![passed]);
    let with = |name: &str| {
        curl(
            addr,
            &pki,
            &[
                "--cert",
                &pki.file(&format!("{name}.pem")),
                "--key",
                &pki.file(&format!("{name}-key.pem")),
            ],
        )
    };
    let served = with("v3-client");
    assert_eq!(text(&served.stdout), "served\n", "{}", text(&served.stderr));
    d.wait_record_where(|r| r.reason == "output-ended");

    let refused = with("v1-client");
    assert!(
        !refused.status.success(),
        "a v1 client certificate was served"
    );
    let line = d.wait_log(&["refused", "reason=\"tls-client-certificate\""]);
    assert!(
        line.contains("client certificate: an X.509 v1 (or v2) certificate, which rustls (webpki) does not accept: it must be v3"),
        "{line}"
    );
    assert!(!line.contains("OtherError"), "{line}");
}

// --- Reload, credentials, limits ---

/// Certificates are re-read on reload while clients keep connecting: new
/// connections get the new one, none fails; a broken file keeps the old.
#[test]
fn certificates_are_renewed_by_a_reload_under_load() {
    let pki = Pki::new();
    let live = pki.path("live.pem");
    let live_key = pki.path("live-key.pem");
    std::fs::copy(pki.path("server.pem"), &live).unwrap();
    std::fs::copy(pki.path("server-key.pem"), &live_key).unwrap();
    let lines = format!(
        "tls_certificate = \"{}\"\ntls_key = \"{}\"",
        live.display(),
        live_key.display()
    );
    let (mut d, addr) = serve(&sh("echo hi"), &lines);
    let subject = |addr: SocketAddr| {
        let out = run(Command::new("openssl").args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ]));
        text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("subject=").map(str::to_owned))
            .unwrap_or_default()
    };
    assert_eq!(subject(addr), "CN = localhost");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        let ca = pki.file("ca.pem");
        std::thread::spawn(move || {
            let mut served = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new("curl")
                    .args(["-s", "-S", "--max-time", "20", "--cacert", &ca, "-k"])
                    .arg(format!("https://127.0.0.1:{}/", addr.port()))
                    .output()
                    .unwrap();
                // The command's "hi" is not HTTP: curl says so, after the handshake.
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.stdout.starts_with(b"hi")
                        || err.contains("HTTP/0.9")
                        || err.contains("Received HTTP"),
                    "a client failed during the renewal: {err}"
                );
                served += 1;
            }
            served
        })
    };
    std::fs::copy(pki.path("renewed.pem"), &live).unwrap();
    std::fs::copy(pki.path("renewed-key.pem"), &live_key).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("READY=1");
    assert_eq!(subject(addr), "CN = renewed");
    // A broken file: the reload fails, says why, and the renewed one stays.
    std::fs::write(&live, "not a certificate\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let said = d.wait_log(&["tls_certificate", "no certificate in it"]);
    assert!(said.contains(&live.display().to_string()), "{said}");
    assert_eq!(subject(addr), "CN = renewed");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = load.join().unwrap();
    assert!(served > 0);
}

/// Keys as systemd credentials: names read from $CREDENTIALS_DIRECTORY.
#[test]
fn keys_can_be_systemd_credentials() {
    let pki = Pki::new();
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy(pki.path("server.pem"), creds.path().join("relay.crt")).unwrap();
    std::fs::copy(pki.path("server-key.pem"), creds.path().join("relay.key")).unwrap();
    let config = one_service(
        &sh(&format!("{HTTP}; echo from credentials")),
        "tls_certificate = \"relay.crt\"\ntls_key = \"relay.key\"",
    );
    let (passed, addr) = pass_tcp("test");
    let creds_dir = creds.path().display().to_string();
    let mut d = Daemon::spawn(
        &config,
        vec![passed],
        Options::env(&[("CREDENTIALS_DIRECTORY", creds_dir.as_str())]),
    );
    d.wait_note("READY=1");
    let out = curl(addr, &pki, &[]);
    assert_eq!(
        text(&out.stdout),
        "from credentials\n",
        "{}",
        text(&out.stderr)
    );
    // Without the directory the names mean nothing, and --check says how to fix it.
    let check = run(Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&d.config_path)
        .env_remove("CREDENTIALS_DIRECTORY"));
    assert_eq!(check.status.code(), Some(78));
    let said = text(&check.stderr);
    assert!(said.contains("tls_certificate: \"relay.crt\" names a credential, and $CREDENTIALS_DIRECTORY is not set"), "{said}");
    assert!(said.contains("LoadCredential=relay.crt:"), "{said}");
}

/// max_bytes counts plaintext; timeout ends a TLS connection as any other.
#[test]
fn limits_hold_over_tls() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(&pki, r#"["yes", "a line"]"#, "max_bytes = 100000");
    let out = python_tls(
        addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    n = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        n += len(chunk)
print(n)"#,
    );
    assert_eq!(out.trim(), "100000");
    let r = d.wait_record_where(|r| r.reason == "max-bytes");
    assert_eq!(r.bytes, 100_000, "{r}");

    // Long enough for the handshake, the spawn and the line on a loaded
    // machine.
    let (d, addr) = tls_serve(&pki, &sh("echo hi; exec sleep 60"), "timeout = \"1s\"");
    let started = std::time::Instant::now();
    let out = python_tls(
        addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    s.settimeout(20)
    data = bytearray()
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
print(data.decode().strip())"#,
    );
    assert_eq!(out.trim(), "hi");
    assert!(started.elapsed() < Duration::from_secs(10));
    d.wait_record_where(|r| r.reason == "timeout")
        .assert_ended("timeout", "SIGTERM");
}

/// 1,000 clients handshake through 100 at a time against max_connections
/// = 20: every one is served, never more than 20 commands run at once, and
/// the daemon's descriptors are back where they were.
#[test]
fn a_flood_of_handshakes_is_served_within_max_connections() {
    let pki = Pki::new();
    let ledger = pki.path("ledger");
    let (d, addr) = tls_serve(
        &pki,
        &sh(&format!(
            "echo s >> {0}; echo hello; sleep 0.01; echo e >> {0}",
            ledger.display()
        )),
        "max_connections = 20",
    );
    let out = python_tls(
        addr,
        &pki,
        r#"import concurrent.futures
ctx = ssl.create_default_context(cafile=ca)
def one(_):
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60), server_hostname="localhost") as s:
        data = bytearray()
        while True:
            chunk = s.recv(100)
            if not chunk:
                return data
            data += chunk
with concurrent.futures.ThreadPoolExecutor(100) as pool:
    got = list(pool.map(one, range(1000)))
print(sum(g == b"hello\n" for g in got))"#,
    );
    assert_eq!(out.trim(), "1000");
    d.wait_records(1000);
    let (most, now, starts) = ledger_peak(&ledger, "s");
    assert_eq!((now, starts), (0, 1000));
    assert!(most <= 20, "{most} commands at once");
}

// --- WebSocket over TLS ---

/// wss:// with Python's websockets, and the console page over https in
/// Chromium.
#[test]
fn websocket_sessions_run_over_tls() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(
        &pki,
        &sh("echo $HTTPS $SSL_PROTOCOL; while read l; do echo got:$l; done"),
        "protocol = \"websocket\"",
    );
    let out = python_ws(
        &format!("wss://localhost:{}/", addr.port()),
        &format!(
            "import ssl\nctx = ssl.create_default_context(cafile={:?})\n\
             async with websockets.connect(url, ssl=ctx) as ws:\n    first = await ws.recv()\n    \
             await ws.send('x')\n    print(first, await ws.recv())",
            pki.file("ca.pem")
        ),
    );
    assert_eq!(out.trim(), "on TLSv1.3 got:x");
    let r = d.wait_record_where(|r| r.reason == "client-closed");
    assert!(encrypts(&d, &r), "{r}");
    assert_eq!(
        (r.messages_sent, r.messages_received),
        (Some(2), Some(1)),
        "{r}"
    );
}

/// The console page over https in Chromium: the page connects back with
/// wss://, types a line, sees the answer and the close.
#[test]
fn the_console_page_works_over_https_in_chromium() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(
        &pki,
        &sh("echo ready; while read l; do echo you said: $l; done"),
        "protocol = \"websocket\"\nconsole = true",
    );
    let url = format!("https://localhost:{}/", addr.port());
    let (v, _) = console_in_chromium(&url, "console-https.png", &["--ignore-certificate-errors"]);
    assert_eq!(
        v["out"],
        serde_json::json!(["ready", "you said: hello from the browser"]),
        "{v}"
    );
    assert!(
        v["closed"].as_str().unwrap().starts_with("closed, 1000"),
        "{v}"
    );
    let page = d.wait_record_where(|r| r.reason == "page");
    assert!(encrypts(&d, &page), "{page}");
    d.wait_record_where(|r| r.reason == "client-closed");
}
