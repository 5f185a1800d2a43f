//! The kernel's TLS (kTLS): where the kernel has the TLS ULP, the session's
//! keys go to it after the handshake, and the connection goes on as if it
//! were plaintext. These tests need such a kernel; the machines here have
//! none, so `tests/ktls/run.sh` boots Debian's own kernel in a VM (QEMU)
//! and runs them there (`.ci/run` does). Elsewhere they show as ignored.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::*;

fn tls_serve(pki: &Pki, command: &str, extra: &str) -> (Daemon, SocketAddr) {
    let (d, addr) = serve(command, &format!("{}{extra}", pki.tls_lines()));
    let said = d.wait_log(&["tls: "]);
    assert!(
        said.contains("the kernel encrypts after the handshake (kTLS: the tls module is loaded)"),
        "{said}"
    );
    (d, addr)
}

/// 8 MB of random bytes, and their sha256.
fn data(pki: &Pki) -> (std::path::PathBuf, String) {
    let file = pki.path("data");
    let want = random_file(&file, 8_000_000);
    (file, want)
}

const READ_ALL: &str = r#"ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    h, n = hashlib.sha256(), 0
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
print(n, h.hexdigest())"#;

/// Output spliced into the kernel's TLS, copied, and written by a command
/// given the socket itself: all of it arrives, and the record says the
/// kernel encrypted it.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn output_goes_through_the_kernel_on_every_transfer() {
    let pki = Pki::new();
    let (file, want) = data(&pki);
    for transfer in ["splice", "socketpair", "direct"] {
        let (d, addr) = tls_serve(
            &pki,
            &format!(r#"["cat", "{}"]"#, file.display()),
            &format!("transfer = \"{transfer}\""),
        );
        let out = python_tls(addr, &pki, READ_ALL);
        assert_eq!(
            out.split_whitespace().take(2).collect::<Vec<_>>(),
            ["8000000", want.as_str()],
            "{transfer}"
        );
        let r = d.wait_record_where(|r| r.reason == "output-ended" || r.reason == "command-exited");
        assert!(r.tls.ends_with(" kernel"), "{transfer}: {r}");
    }
}

/// A shared command's output to clients whose sessions the kernel took:
/// tee(2) into each client's pipe, spliced into the kernel's TLS; every
/// client gets every byte, encrypted by the kernel.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn a_shared_command_is_spliced_into_every_clients_kernel_tls() {
    let pki = Pki::new();
    let (file, want) = data(&pki);
    let go = pki.path("go");
    for transfer in ["splice", "socketpair"] {
        let _ = std::fs::remove_file(&go);
        let (mut d, addr) = tls_serve(
            &pki,
            &sh(&format!(
                "while [ ! -e {} ]; do sleep 0.02; done; cat {}",
                go.display(),
                file.display()
            )),
            // Exact delivery: emulated CPUs decrypt slowly, and `cat` would
            // leave them max_lag behind.
            &format!("shared = true\nlagging = \"wait\"\ntransfer = \"{transfer}\""),
        );
        std::thread::scope(|scope| {
            let pki = &pki;
            let clients: Vec<_> = (0..3)
                .map(|_| scope.spawn(move || python_tls(addr, pki, READ_ALL)))
                .collect();
            d.wait_note("3 client(s))");
            std::fs::write(&go, "").unwrap();
            for c in clients {
                let out = c.join().unwrap();
                assert_eq!(
                    out.split_whitespace().take(2).collect::<Vec<_>>(),
                    ["8000000", want.as_str()],
                    "{transfer}"
                );
            }
        });
        for r in d.wait_records(3) {
            assert!(
                r.tls.ends_with(" kernel") && r.instance.is_some(),
                "{transfer}: {r}"
            );
        }
    }
}

/// The kernel never sends a close_notify; the daemon does, so a client that
/// insists on one (curl with OpenSSL 3) sees a clean end.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn the_end_of_output_carries_a_close_notify() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(
        &pki,
        &sh(r"printf 'HTTP/1.0 200 OK\\r\\n\\r\\n'; echo over the kernel"),
        "",
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert", &pki.file("ca.pem")])
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .arg(format!("https://localhost:{}/", addr.port()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over the kernel\n");
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert!(r.tls.ends_with(" kernel"), "{r}");
}

/// The client's close_notify reaches the command as end-of-file (the kernel
/// hands it to the daemon as a record that is not data).
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn the_clients_close_notify_is_end_of_file() {
    let pki = Pki::new();
    let got = pki.path("got");
    let (d, addr) = tls_serve(
        &pki,
        // No output after the end-of-file: Python's unwrap() takes none
        // between its close_notify and the daemon's.
        &sh(&format!("cat > {}", got.display())),
        "stdin = \"client\"",
    );
    python_tls(
        addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
s.sendall(b"hello over the kernel\n")
raw = s.unwrap()  # sends close_notify, then waits for the daemon's
raw.settimeout(60)
while raw.recv(65536):
    pass"#,
    );
    let r = d.wait_record_where(|r| r.reason == "output-ended" || r.reason == "client-gone");
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        "hello over the kernel\n",
        "{r}"
    );
    assert_eq!(r.exit, "0", "cat saw end-of-file, not an error: {r}");
}

/// A TLS 1.3 key update, which these kernels cannot take, ends the
/// connection with an alert and a warning that says why.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn a_key_update_is_refused_cleanly() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(&pki, &sh("echo ready; cat"), "stdin = \"client\"");
    let mut client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args(["-CAfile", &pki.file("ca.pem")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(client.stdout.take().unwrap()));
    assert!(lines.any(|l| l.unwrap() == "ready"));
    // s_client's interactive command for a KeyUpdate.
    stdin.write_all(b"k\n").unwrap();
    let said = d.wait_log(&["key update", "cannot take before Linux 6.14"]);
    assert!(said.contains("WARN"), "{said}");
    let r = d.wait_record_where(|r| r.reason == "client-gone");
    assert!(r.message.contains("Protocol error"), "{r}");
    drop(stdin);
    let _ = client.kill();
    let _ = client.wait();
}

/// A WebSocket service over the kernel's TLS: binary frames spliced into it.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn websocket_binary_frames_are_spliced_into_the_kernel() {
    let pki = Pki::new();
    let (file, want) = data(&pki);
    let (d, addr) = tls_serve(
        &pki,
        &format!(r#"["cat", "{}"]"#, file.display()),
        "protocol = \"websocket\"\nmessages = \"binary\"",
    );
    let out = python_ws(
        &format!("wss://localhost:{}/", addr.port()),
        &format!(
            "import hashlib, ssl\nctx = ssl.create_default_context(cafile={:?})\nh, n = hashlib.sha256(), 0\n\
             async with websockets.connect(url, ssl=ctx, max_size=None) as ws:\n    async for m in ws:\n        \
             h.update(m)\n        n += len(m)\nprint(n, h.hexdigest())",
            pki.file("ca.pem")
        ),
    );
    assert_eq!(out.trim(), format!("8000000 {want}"));
    let r = d.wait_record_where(|r| r.reason == "output-ended");
    assert!(r.tls.ends_with(" kernel"), "{r}");
}

/// A record that does not verify: the kernel refuses it (EBADMSG), and the
/// connection ends as a TLS error. The kernel still holds the bad record
/// unread, so the client sees a reset rather than an alert.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn a_forged_record_ends_the_connection_as_a_tls_error() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(&pki, &sh("echo ready; exec sleep 60"), "");
    python_tls(
        addr,
        &pki,
        &(FORGED_RECORD.to_owned()
            + r#"raw.settimeout(60)
try:
    while raw.recv(65536):
        pass
except ConnectionResetError:
    pass"#),
    );
    let r = d.wait_record_where(|r| r.reason == "tls-error");
    assert!(r.message.contains("does not verify"), "{r}");
    assert_eq!(r.exit, "SIGTERM", "{r}");
    assert!(r.tls.ends_with(" kernel"), "{r}");
}

/// Each cipher and both versions reach the kernel: TLS 1.3 with AES-128-GCM
/// and ChaCha20-Poly1305 (curl), TLS 1.2 with AES-GCM.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs these in a VM"]
fn every_cipher_and_version_goes_through_the_kernel() {
    let pki = Pki::new();
    let (d, addr) = tls_serve(
        &pki,
        &sh(r"printf 'HTTP/1.0 200 OK\\r\\n\\r\\n'; head -c 300000 /dev/zero | tr '\\0' x"),
        "",
    );
    let url = format!("https://localhost:{}/", addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());
    let cases: [(&[&str], &str); 3] = [
        (
            &["--tls13-ciphers", "TLS_AES_128_GCM_SHA256"],
            "TLSv1.3 TLS_AES_128_GCM_SHA256 kernel",
        ),
        (
            &["--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"],
            "TLSv1.3 TLS_CHACHA20_POLY1305_SHA256 kernel",
        ),
        (
            &[
                "--tls-max",
                "1.2",
                "--ciphers",
                "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
            ],
            "TLSv1.2 ",
        ),
    ];
    for (n, (args, want)) in cases.iter().enumerate() {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert", &pki.file("ca.pem")])
            .args(["--resolve", &resolve])
            .args(*args)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout.len(), 300_000, "{args:?}");
        let r = d.wait_record_where(|r| r.conn == n as u64 + 1 && r.reason == "output-ended");
        assert!(
            r.tls.starts_with(want) && r.tls.ends_with(" kernel"),
            "{args:?}: {r}"
        );
    }
}

/// When the kernel refuses a session's keys after rustls has given them up
/// (here: its ChaCha20-Poly1305 is unloaded, which the start-up probe of
/// the ULP cannot see), that connection can only be closed: it is recorded
/// as a TLS error, no command is started for its dead socket, and later
/// sessions with that cipher are encrypted in the daemon. The module cannot
/// come back in the guest, so `tests/ktls/run.sh` runs this test last.
#[test]
#[ignore = "needs the kernel's TLS: tests/ktls/run.sh runs it last in a VM"]
fn zz_a_session_the_kernel_refuses_is_closed_and_its_cipher_stays_in_user_space() {
    let removed = Command::new("rmmod").arg("chacha20poly1305").status();
    assert!(
        removed.as_ref().is_ok_and(|s| s.success()),
        "rmmod chacha20poly1305: {removed:?}"
    );
    let pki = Pki::new();
    let ledger = pki.path("started");
    let (d, addr) = tls_serve(
        &pki,
        &sh(&format!("echo started >> {}; echo hello", ledger.display())),
        "",
    );
    let curl = |n: u64| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert", &pki.file("ca.pem")])
            .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
            .args([
                "--tls13-ciphers",
                "TLS_CHACHA20_POLY1305_SHA256",
                "--http0.9",
            ])
            .arg(format!("https://localhost:{}/", addr.port()))
            .output()
            .unwrap();
        (out, d.wait_record(n))
    };
    let (out, r) = curl(1);
    assert!(!out.status.success(), "the refused session went on: {r}");
    assert_eq!(r.reason, "tls-error", "{r}");
    assert!(
        r.message.contains("the kernel refused the session's keys"),
        "{r}"
    );
    assert!(r.tls.ends_with(" kernel-refused"), "{r}");
    assert_eq!(r.pid, 0, "a command was started for a dead socket: {r}");
    assert!(!ledger.exists(), "a command was started for a dead socket");
    let (out, r) = curl(2);
    assert!(out.status.success(), "{r}");
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(
        r.tls, "TLSv1.3 TLS_CHACHA20_POLY1305_SHA256 userspace",
        "{r}"
    );
    let warned = d.log_lines(&["the kernel's TLS refused a session's keys"]);
    assert_eq!(warned.len(), 1, "{warned:?}");
}
