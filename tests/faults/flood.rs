//! A flood against `max_connections`: never more commands at once than
//! the limit, every client served in full, and a client waiting at the limit
//! served as soon as a place frees.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{left_before_count, median};

/// 5,000 connection attempts from 64 threads against `max_connections = 50`:
/// the commands' own ledger (O_APPEND lines before and after the work, so
/// its running count bounds the commands alive at once from below) never
/// shows more than 50, every client that connected gets all 20,000 bytes, one
/// record per client. Each command stays alive until its client answers
/// (`read` from the client), so the commands, not only the connections,
/// press against the limit. Then, with the 50 places held by clients that
/// have not answered, a probe waits in the backlog (the daemon logs that it is
/// at its limit) and is served within 1 s of one holder closing. Afterwards
/// descriptors are back to the baseline and no child is left.
#[test]
fn a_flood_of_5000_connections_never_exceeds_max_connections() {
    const ATTEMPTS: usize = 5000;
    const THREADS: usize = 64;
    const LIMIT: usize = 50;
    const PAYLOAD: usize = 20000;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger");
    let (passed, addr) = pass_tcp("flood");
    let config = one_service(
        &format!(
            r#"["sh", "-c", "echo s >> {0}; head -c {PAYLOAD} /dev/zero; read x; echo e >> {0}"]"#,
            ledger.display()
        ),
        &format!("max_connections = {LIMIT}\nstdin = \"client\""),
    );
    let mut d = Daemon::start(&config, vec![passed]);
    /// Reads the output, answers, and expects end-of-file.
    fn take(s: &mut TcpStream) {
        let mut out = vec![1u8; PAYLOAD];
        s.read_exact(&mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0), "not the command's output");
        s.write_all(b"\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{} bytes too many", rest.len());
    }
    let mut warm = connect(addr);
    take(&mut warm);
    drop(warm);
    d.wait_records(1);
    let baseline = d.fd_baseline();

    let started = Instant::now();
    // Per attempt: how long its client waited, if it connected.
    let waits = fan_out(THREADS, ATTEMPTS, move |_| {
        let t = Instant::now();
        let mut s = connect_retrying(addr, 3).ok()?;
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        take(&mut s);
        Some(t.elapsed())
    });
    let flood_time = started.elapsed();
    let served = waits.iter().flatten().count();
    let failed = ATTEMPTS - served;
    let total = 1 + served;
    d.wait_records(total);
    // The places are given back just after the records: wait until the
    // daemon itself says none is active.
    d.wait_note(&format!("STATUS=0 active, {total} served"));
    // Counted now: the probe below makes the daemon pause too.
    let pauses = d
        .log_lines(&["not accepting until a connection ends"])
        .len();

    // The precise probe: 50 clients hold every place, the probe waits in the
    // backlog (the daemon counts every place taken), one holder closes.
    let mut holders = Vec::new();
    for _ in 0..LIMIT {
        let mut s = connect(addr);
        let mut out = vec![0u8; PAYLOAD];
        s.read_exact(&mut out).unwrap();
        // No answer: the command waits, and holds its place.
        holders.push(s);
    }
    let mut probe = connect(addr);
    d.wait_note(&format!("STATUS={LIMIT} active"));
    assert!(nothing_yet(&probe), "the probe was served above the limit");
    let freed = Instant::now();
    drop(holders.remove(0));
    let mut first = [0u8; 1];
    probe.read_exact(&mut first).unwrap();
    let slot_to_first_byte = freed.elapsed();
    let mut rest = vec![0u8; PAYLOAD - 1];
    probe.read_exact(&mut rest).unwrap();
    drop(probe);
    drop(holders);
    let total = total + LIMIT + 1;
    d.wait_records(total);

    let (most, now, starts) = ledger_peak(&ledger, "s");
    // The client in the middle of the flood: at most 50 running and the
    // other threads' clients (63 in all) are ahead of it.
    let mid_flood = waits[ATTEMPTS / 2];
    let mut waits: Vec<Duration> = waits.into_iter().flatten().collect();
    let worst = waits.iter().max().copied().unwrap_or_default();
    eprintln!(
        "flood: {ATTEMPTS} attempts from {THREADS} threads in {flood_time:?}: {served} served, \
         {failed} connects failed; most commands at once {most} (limit {LIMIT}); client wait \
         median {:?}, worst {worst:?}; the middle client waited {mid_flood:?}; probe at the \
         limit served {slot_to_first_byte:?} after a holder closed; pauses logged in the flood \
         {pauses}",
        median(&mut waits),
    );
    assert!(most <= LIMIT as i64, "{most} commands ran at once");
    assert!(most >= 2, "the flood never overlapped ({most})");
    assert!(pauses > 0, "the flood never reached the limit");
    assert_eq!(now, 0);
    assert_eq!(starts, total);
    let records = d.records();
    assert_eq!(records.len(), total);
    for r in &records {
        r.assert_ended("output-ended", "0");
    }
    assert!(
        slot_to_first_byte < Duration::from_secs(1),
        "the probe waited {slot_to_first_byte:?} after a place freed"
    );
    d.assert_fds_back(baseline);
    assert!(d.children().is_empty());
}

/// Clients that connect and reset before they are served (here: while they
/// wait in the backlog behind a full service) cost the journal one line per
/// episode, not a record each.
#[test]
fn resets_before_service_are_counted_not_recorded_one_by_one() {
    const RESETS: usize = 100;
    let (d, addr) = serve(&sh("echo ready; exec sleep 60"), "max_connections = 1");
    let mut first = connect(addr);
    let mut ready = [0u8; 6];
    first.read_exact(&mut ready).unwrap();
    for _ in 0..RESETS {
        let s = TcpStream::connect(addr).unwrap();
        reset_on_close(&s);
    }
    // The place frees; the backlog is accepted, resets and all.
    reset_on_close(&first);
    drop(first);
    let mut next = connect(addr);
    let served = next.read_exact(&mut ready);
    assert!(served.is_ok(), "{served:?}\n{}", d.log_text());
    assert_eq!(&ready, b"ready\n");
    let ended = d.wait_log(&["client(s) left before their command started"]);
    let records = d.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].reason, "client-gone", "{}", records[0]);
    let firsts = d.log_lines(&["left before its command started"]);
    assert_eq!(firsts.len(), 1, "{firsts:?}");
    let counted = left_before_count(&ended);
    assert_eq!(counted, RESETS, "{ended}");
}

/// Clients that keep a service at its limit, wave after wave, make one
/// at-limit line and one below-the-limit line, not a pair per wave.
#[test]
fn a_service_that_keeps_meeting_its_limit_says_so_once() {
    let (d, addr) = serve(&sh("echo ok"), "max_connections = 2");
    for wave in 0..20 {
        for out in fan_out(8, 8, move |_| fetch_text(addr)) {
            assert_eq!(out, "ok\n", "wave {wave}");
        }
    }
    d.wait_records(160);
    let at = d.log_lines(&["not accepting until a connection ends"]);
    assert_eq!(at.len(), 1, "{at:#?}");
    // The episode ends only after 5 s below the limit, with its count.
    let below = d.log_lines(&["below the limit"]);
    assert!(below.is_empty(), "{below:#?}");
}

/// Clients that open a connection and never finish their handshake (TLS, a
/// WebSocket upgrade) hold no place in `max_connections`: with both places
/// of each service taken by such clients (ten of them), a real client is
/// served at once, not after `handshake_timeout`.
#[test]
fn slow_handshakes_do_not_take_the_places_of_real_clients() {
    let pki = Pki::new();
    let (tls, tls_addr) = pass_tcp("tls");
    let (ws, ws_addr) = pass_tcp("ws");
    let config = format!(
        "[[service]]\nname = \"tls\"\ncommand = {cmd}\nmax_connections = 2\n\
         handshake_timeout = \"30s\"\n{tls_lines}\n\
         [[service]]\nname = \"ws\"\ncommand = {cmd}\nmax_connections = 2\n\
         handshake_timeout = \"30s\"\nprotocol = \"websocket\"\n",
        cmd = sh("echo served"),
        tls_lines = pki.tls_lines(),
    );
    let d = Daemon::start(&config, vec![tls, ws]);
    // Silent clients: a TCP connection, then nothing.
    let silent: Vec<TcpStream> = (0..10)
        .flat_map(|_| [connect(tls_addr), connect(ws_addr)])
        .collect();
    let started = Instant::now();
    let out = python_tls(
        tls_addr,
        &pki,
        r#"ctx = ssl.create_default_context(cafile=ca)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as s:
    print(s.recv(100).decode().strip())"#,
    );
    let tls_took = started.elapsed();
    assert_eq!(out.trim(), "served");
    let started = Instant::now();
    let out = python_ws(
        &format!("ws://{ws_addr}/"),
        "ws = await websockets.connect(url)\nprint(await ws.recv())",
    );
    let ws_took = started.elapsed();
    assert_eq!(out.trim(), "served");
    eprintln!("with 10 silent clients each: TLS served in {tls_took:?}, WebSocket in {ws_took:?}");
    assert!(tls_took < Duration::from_secs(10), "TLS: {tls_took:?}");
    assert!(ws_took < Duration::from_secs(10), "WebSocket: {ws_took:?}");
    assert!(
        d.log_lines(&["not accepting"]).is_empty(),
        "{}",
        d.log_text()
    );
    drop(silent);
}
