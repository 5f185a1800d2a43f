//! The command the benchmarks serve, the same for every contender.
//!
//!   bench-producer bulk BYTES            BYTES from a fixed 1 MiB buffer, plain write(2)
//!   bench-producer vmsplice BYTES        the same with vmsplice(2) when stdout is a pipe
//!                                        (write(2) otherwise)
//!   bench-producer ticks MS COUNT        COUNT lines "<unix time in ns>", one every MS
//!   bench-producer paced MB_PER_SEC      64 KiB writes at that pace, for ever
//!   bench-producer hello                 one line, at once
//!   bench-producer lines                 short numbered lines as fast as they are
//!                                        taken, until the reader leaves
//!   bench-producer exec PROGRAM ARGS…    runs PROGRAM in its place (a real producer:
//!                                        cat, head, gzip), after the --cgroup move
//!
//! With `--cgroup DIR` first, it moves itself into that cgroup (v2), so the
//! relay's own CPU time can be told apart from the producer's. (An argument,
//! not a variable: xinetd passes no environment.)
//!
//! Run as a CGI program (`GATEWAY_INTERFACE` set, no arguments: lighttpd's
//! mod_cgi, fcgiwrap), it reads its arguments from the file named as it was
//! run plus `.args`, and writes a CGI header block before its output.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() && std::env::var_os("GATEWAY_INTERFACE").is_some() {
        let me = std::env::args().next().unwrap_or_default();
        let file = format!("{me}.args");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        args = text.split_whitespace().map(str::to_owned).collect();
        let mut out = std::io::stdout();
        out.write_all(b"Content-Type: application/octet-stream\r\n\r\n")
            .and_then(|()| out.flush())
            .expect("the CGI header block");
    }
    if args.first().map(String::as_str) == Some("--cgroup") && args.len() > 1 {
        let procs = std::path::Path::new(&args[1]).join("cgroup.procs");
        std::fs::write(procs, std::process::id().to_string()).expect("cannot enter the cgroup");
        args.drain(..2);
    }
    let arg = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("see the usage in the source")
    };
    match args.first().map(String::as_str) {
        Some("bulk") => bulk(arg(1), false),
        Some("vmsplice") => bulk(arg(1), true),
        Some("ticks") => ticks(arg(1), arg(2)),
        Some("paced") => paced(arg(1)),
        Some("hello") => println!("hello"),
        Some("lines") => lines(),
        Some("exec") if args.len() > 1 => {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(&args[1]).args(&args[2..]).exec();
            eprintln!("bench-producer: exec {}: {e}", args[1]);
            std::process::exit(127);
        }
        _ => {
            eprintln!("usage: bench-producer bulk BYTES | vmsplice BYTES | ticks MS COUNT | hello | lines");
            std::process::exit(2);
        }
    }
}

fn bulk(mut left: u64, gift: bool) {
    // The buffer never changes, so pages the pipe still references after
    // vmsplice cannot be overwritten under it.
    let buf = vec![b'x'; 1 << 20];
    let out = std::io::stdout();
    let mut gift = gift;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let moved = if gift {
            let iov = [std::io::IoSlice::new(&buf[..n])];
            match nix::fcntl::vmsplice(&out, &iov, nix::fcntl::SpliceFFlags::empty()) {
                // Not a pipe (a socket, with direct transfer): plain writes.
                Err(nix::errno::Errno::EBADF | nix::errno::Errno::EINVAL) => {
                    gift = false;
                    continue;
                }
                r => r,
            }
        } else {
            nix::unistd::write(&out, &buf[..n])
        };
        match moved {
            Ok(w) => left -= w as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("bench-producer: write: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// 64 KiB writes, `mb_per_sec` MB a second on average, until the reader leaves.
fn paced(mb_per_sec: u64) {
    let buf = vec![b'x'; 64 << 10];
    let out = std::io::stdout();
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    loop {
        let due = Duration::from_secs_f64(sent as f64 / (mb_per_sec.max(1) as f64 * 1e6));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        match nix::unistd::write(&out, &buf) {
            Ok(n) => sent += n as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

fn ticks(every_ms: u64, count: u64) {
    // Start at a random phase: many slow commands started together are not
    // in step, and printing all at the same instant would measure the
    // scheduler's burst, not the relay.
    let phase = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        ^ u64::from(std::process::id()).wrapping_mul(0x9e37_79b9);
    std::thread::sleep(Duration::from_millis(phase % every_ms.max(1)));
    let mut out = std::io::stdout().lock();
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(every_ms));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        if writeln!(out, "{now}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

fn lines() {
    let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    for i in 0u64.. {
        if writeln!(out, "message {i}").is_err() {
            return;
        }
    }
}
