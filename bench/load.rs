//! Benchmark clients. Each mode prints one JSON object on stdout.
//!
//!   bench-load bulk ADDR CLIENTS BYTES        CLIENTS at once, each reads BYTES to EOF
//!   bench-load rate ADDR CONCURRENCY SECS     connect, read all, close, for SECS
//!   bench-load slow ADDR CLIENTS SECS [WARMUP] CLIENTS at once on a ticking command;
//!                                             line delays (now - printed time), not
//!                                             counting the first WARMUP seconds
//!   bench-load ttfb ADDR COUNT                COUNT connections in a row; time to first byte
//!   bench-load burst ADDR STREAMS BURST SECS  STREAMS on a ticking command; after 2 s,
//!                                             BURST more connect at once (and stay);
//!                                             the streams' line delays before and during
//!                                             the burst, and how fast the burst was served
//!
//!   bench-load fanout ADDR CLIENTS SECS [STALLED]
//!                                             CLIENTS read an endless stream (one shared
//!                                             command, or a command each) while STALLED
//!                                             more connect and never read; after 1 s,
//!                                             the bytes a second the readers got for SECS
//!
//! The same over WebSocket (text messages for lines, binary ones for bulk):
//!
//!   bench-load wsfanout ADDR CLIENTS SECS [STALLED]   payload bytes of binary messages
//!   bench-load wsbulk ADDR CLIENTS BYTES      binary payload, to the server's close
//!   bench-load wsrate ADDR CONCURRENCY SECS   upgrade, one message "hello", the close
//!   bench-load wsslow ADDR CLIENTS SECS [WARMUP]
//!   bench-load wstext ADDR SECS               text messages on one connection for SECS
//!
//! And over HTTP (an HTTP/1.0 GET of PATH; the body, after a 200):
//!
//!   bench-load httpbulk ADDR CLIENTS BYTES PATH
//!   bench-load httprate ADDR CONCURRENCY SECS PATH
//!
//! And over TLS (`$BENCH_TLS_CA` names the servers' CA; full handshakes):
//!
//!   bench-load tlsbulk ADDR CLIENTS BYTES
//!   bench-load tlsrate ADDR CONCURRENCY SECS  a full handshake, "hello", the end
//!
//! ADDR is HOST:PORT (127.0.0.1 only).

mod tls;
mod ws;

/// What the client speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Raw,
    WebSocket,
    Tls,
    /// HTTP/1.0: a GET of [`HTTP_PATH`], and its body.
    Http,
}

/// The path HTTP clients ask for (each server has its own).
static HTTP_PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An HTTP/1.0 GET: the response's body, once its head says 200.
fn http_get(mut s: TcpStream) -> std::io::Result<BufReader<TcpStream>> {
    use std::io::Write;
    let path = HTTP_PATH.get().map_or("/", String::as_str);
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.split(' ').nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("the status line: {line:?}")));
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            return Ok(r);
        }
    }
}

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect("ADDR");
    assert!(addr.ip().is_loopback(), "benchmarks talk to loopback only");
    let num = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("see the usage in the source")
    };
    match args[0].as_str() {
        "bulk" => bulk(addr, num(2) as usize, num(3), Wire::Raw),
        "wsbulk" => bulk(addr, num(2) as usize, num(3), Wire::WebSocket),
        "tlsbulk" => bulk(addr, num(2) as usize, num(3), Wire::Tls),
        "rate" => rate(addr, num(2) as usize, num(3), Wire::Raw),
        "wsrate" => rate(addr, num(2) as usize, num(3), Wire::WebSocket),
        "tlsrate" => rate(addr, num(2) as usize, num(3), Wire::Tls),
        mode @ ("httpbulk" | "httprate") => {
            let path = args.get(4).cloned().unwrap_or_else(|| "/".into());
            HTTP_PATH.set(path).expect("once");
            match mode {
                "httpbulk" => bulk(addr, num(2) as usize, num(3), Wire::Http),
                _ => rate(addr, num(2) as usize, num(3), Wire::Http),
            }
        }
        "slow" | "wsslow" => slow(
            addr,
            num(2) as usize,
            num(3),
            args.get(4).map_or(0, |_| num(4)),
            if args[0] == "wsslow" {
                Wire::WebSocket
            } else {
                Wire::Raw
            },
        ),
        "wstext" => text(addr, num(2)),
        "ttfb" => ttfb(addr, num(2)),
        "burst" => burst(addr, num(2) as usize, num(3) as usize, num(4)),
        "fanout" | "wsfanout" => fanout(
            addr,
            num(2) as usize,
            num(3),
            args.get(4).map_or(0, |_| num(4)) as usize,
            if args[0] == "wsfanout" {
                Wire::WebSocket
            } else {
                Wire::Raw
            },
        ),
        other => panic!("unknown mode {other}"),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// What one connection's lines are: lines of bytes, or text messages.
fn lines(s: TcpStream, wire: Wire) -> Box<dyn Iterator<Item = std::io::Result<String>>> {
    match wire {
        Wire::WebSocket => match ws::Ws::upgrade(s, "127.0.0.1") {
            Ok(c) => Box::new(ws::Messages(c)),
            Err(e) => Box::new(std::iter::once(Err(e))),
        },
        Wire::Tls => match tls::Tls::new(s) {
            Ok(t) => Box::new(BufReader::new(t).lines()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        },
        Wire::Raw => Box::new(BufReader::new(s).lines()),
        Wire::Http => match http_get(s) {
            Ok(body) => Box::new(body.lines()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        },
    }
}

/// Reads a connection to its end; the bytes (payload, over WebSocket;
/// plaintext, over TLS).
fn drain(s: TcpStream, wire: Wire) -> u64 {
    let mut got = 0u64;
    let mut s: Box<dyn Read> = match wire {
        Wire::Raw => Box::new(s),
        Wire::Tls => Box::new(tls::Tls::new(s).expect("TLS")),
        Wire::Http => Box::new(http_get(s).expect("an HTTP response")),
        Wire::WebSocket => {
            let mut c = ws::Ws::upgrade(s, "127.0.0.1").expect("upgrade");
            while let Some(frame) = c.next(None).expect("read") {
                assert!(
                    [ws::BINARY, ws::CONTINUATION].contains(&frame.opcode),
                    "bulk comes in binary messages"
                );
                got += frame.len as u64;
            }
            return got;
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn bulk(addr: SocketAddr, clients: usize, bytes: u64, wire: Wire) {
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                drain(connect(addr).expect("connect"), wire)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let got: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let secs = t0.elapsed().as_secs_f64();
    let ok = got.iter().all(|&g| g == bytes);
    let total: u64 = got.iter().sum();
    println!(
        r#"{{"bytes":{total},"secs":{secs},"ok":{ok},"gbps":{}}}"#,
        total as f64 / secs / 1e9
    );
}

fn rate(addr: SocketAddr, concurrency: usize, secs: u64, wire: Wire) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let got: Option<Vec<String>> = connect(addr)
                        .ok()
                        .and_then(|s| lines(s, wire).collect::<Result<_, _>>().ok());
                    match got.as_deref() {
                        Some([hello]) if hello == "hello" => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        r#"{{"ok":{ok},"failed":{failed},"secs":{secs},"per_sec":{}}}"#,
        ok as f64 / secs
    );
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn slow(addr: SocketAddr, clients: usize, secs: u64, warmup: u64, wire: Wire) {
    let delays = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(Barrier::new(clients + 1));
    let deadline = Instant::now() + Duration::from_secs(secs) + Duration::from_secs(30);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (delays, connected) = (Arc::clone(&delays), Arc::clone(&connected));
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let s = connect(addr);
                    connected.wait();
                    let Ok(s) = s else { return false };
                    // Lines in the warm-up are not counted: the server may
                    // still be starting the other commands.
                    let counted_from = now_ns() + u128::from(warmup) * 1_000_000_000;
                    let mut mine = Vec::new();
                    for line in lines(s, wire) {
                        let Ok(line) = line else { return false };
                        let sent: u128 = line.trim().parse().unwrap_or(0);
                        let now = now_ns();
                        if now >= counted_from {
                            mine.push((now.saturating_sub(sent)) as f64 / 1e6);
                        }
                        if Instant::now() > deadline {
                            break;
                        }
                    }
                    delays.lock().unwrap().extend(mine);
                    true
                })
                .unwrap()
        })
        .collect();
    connected.wait();
    // All clients are connected: the orchestrator may start measuring now.
    eprintln!("connected");
    let served = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|&ok| ok)
        .count();
    let mut d = delays.lock().unwrap().clone();
    d.sort_by(|a, b| a.total_cmp(b));
    println!(
        r#"{{"clients":{clients},"served":{served},"lines":{},"p50_ms":{},"p99_ms":{},"max_ms":{}}}"#,
        d.len(),
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        d.last().copied().unwrap_or(f64::NAN)
    );
}

/// Text messages on one connection for `secs`: how many a second.
fn text(addr: SocketAddr, secs: u64) {
    let mut c = ws::Ws::upgrade(connect(addr).expect("connect"), "127.0.0.1").expect("upgrade");
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let (mut messages, mut bytes) = (0u64, 0u64);
    while let Some(frame) = c.next(None).expect("read") {
        assert!(frame.fin, "a line is one frame");
        assert_eq!(frame.opcode, ws::TEXT, "lines come in text messages");
        messages += 1;
        bytes += frame.len as u64;
        // One clock read per thousand messages, so the client stays cheap.
        if messages % 1000 == 0 && Instant::now() >= until {
            break;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    c.close();
    println!(
        r#"{{"messages":{messages},"bytes":{bytes},"secs":{secs},"per_sec":{}}}"#,
        messages as f64 / secs
    );
}

fn ttfb(addr: SocketAddr, count: u64) {
    let mut t = Vec::new();
    for _ in 0..count {
        let t0 = Instant::now();
        let mut s = connect(addr).expect("connect");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("first byte");
        t.push(t0.elapsed().as_secs_f64() * 1e3);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    println!(
        r#"{{"count":{count},"p50_ms":{},"p99_ms":{}}}"#,
        percentile(&t, 0.5),
        percentile(&t, 0.99)
    );
}

/// A line's arrival: when (ns since the epoch) and its delay (ms).
type Arrival = (u128, f64);

fn burst(addr: SocketAddr, streams: usize, burst: usize, secs: u64) {
    const WARMUP: u64 = 2;
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(Barrier::new(streams + 1));
    let end = now_ns() + u128::from(WARMUP + secs) * 1_000_000_000 + 5_000_000_000;
    let readers: Vec<_> = (0..streams)
        .map(|_| {
            let (arrivals, connected) = (Arc::clone(&arrivals), Arc::clone(&connected));
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    let s = connect(addr);
                    connected.wait();
                    let Ok(s) = s else { return };
                    let mut mine = Vec::new();
                    for line in BufReader::new(s).lines() {
                        let Ok(line) = line else { break };
                        let sent: u128 = line.trim().parse().unwrap_or(0);
                        let now = now_ns();
                        mine.push((now, now.saturating_sub(sent) as f64 / 1e6));
                        if now > end {
                            break;
                        }
                    }
                    arrivals.lock().unwrap().extend(mine);
                })
                .unwrap()
        })
        .collect();
    connected.wait();
    std::thread::sleep(Duration::from_secs(WARMUP));
    // The burst: BURST clients at once, each timed to its first line.
    let started = now_ns();
    let firsts: Arc<Mutex<Vec<u128>>> = Arc::new(Mutex::new(Vec::new()));
    let go = Arc::new(Barrier::new(burst));
    let bursters: Vec<_> = (0..burst)
        .map(|_| {
            let (firsts, go) = (Arc::clone(&firsts), Arc::clone(&go));
            std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn(move || {
                    go.wait();
                    let Ok(s) = connect(addr) else { return };
                    let mut lines = BufReader::new(s).lines();
                    if let Some(Ok(_)) = lines.next() {
                        firsts.lock().unwrap().push(now_ns());
                    }
                    // Stay connected to the end, as a real client would.
                    for line in lines {
                        if line.is_err() || now_ns() > end {
                            break;
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    let window_end = now_ns();
    for t in readers.into_iter().chain(bursters) {
        let _ = t.join();
    }
    let arrivals = arrivals.lock().unwrap();
    let pick = |from: u128, to: u128| {
        let mut d: Vec<f64> = arrivals
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|(_, d)| *d)
            .collect();
        d.sort_by(|a, b| a.total_cmp(b));
        d
    };
    let before = pick(started - u128::from(WARMUP) * 500_000_000, started);
    let during = pick(started, window_end);
    let firsts = firsts.lock().unwrap();
    let served = firsts.len();
    let last = firsts.iter().max().copied().unwrap_or(started);
    let burst_secs = (last - started) as f64 / 1e9;
    println!(
        r#"{{"streams":{streams},"burst":{burst},"served":{served},"burst_secs":{burst_secs},"burst_per_sec":{},"before_p99_ms":{},"during_p50_ms":{},"during_p99_ms":{},"during_max_ms":{},"lines_during":{}}}"#,
        served as f64 / burst_secs.max(1e-9),
        percentile(&before, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().copied().unwrap_or(f64::NAN),
        during.len()
    );
}

/// Readers of an endless stream, beside clients that never read: the
/// bytes a second the readers got in a window of `secs` after a second of
/// warm-up, in total and for the slowest reader, and every byte they got.
fn fanout(addr: SocketAddr, clients: usize, secs: u64, stalled: usize, wire: Wire) {
    let stalled: Vec<TcpStream> = (0..stalled)
        .map(|_| {
            let s = connect(addr).expect("connect");
            // A small receive buffer: a reader that stopped, as the server sees it.
            let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &4096);
            s
        })
        .collect();
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            let s = connect(addr).expect("connect");
            let mut ws = (wire == Wire::WebSocket)
                .then(|| ws::Ws::upgrade(s.try_clone().unwrap(), "127.0.0.1").expect("upgrade"));
            let mut s = s;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    // The bytes of a read (a message's payload), None at the end.
                    let read = match ws.as_mut() {
                        Some(ws) => ws.next(None).map(|f| f.map(|f| f.len)),
                        None => s.read(&mut buf).map(|n| (n > 0).then_some(n)),
                    };
                    match read {
                        Ok(None) => break,
                        Ok(Some(n)) => {
                            counts[i].fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    let sample = || {
        counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<u64>>()
    };
    std::thread::sleep(Duration::from_secs(1));
    let (before, t0) = (sample(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (after, took) = (sample(), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    drop(stalled);
    let window: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = window.iter().sum();
    let slowest = window.iter().copied().min().unwrap_or(0);
    let all: u64 = after.iter().sum();
    // The readers are stopped by closing their sockets from under them.
    std::process::exit({
        println!(
            r#"{{"clients":{clients},"gbps":{},"slowest_gbps":{},"bytes":{all},"ok":{}}}"#,
            total as f64 / took / 1e9,
            slowest as f64 / took / 1e9,
            slowest > 0
        );
        drop(threads);
        0
    });
}
