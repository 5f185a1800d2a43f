//! The command the benchmarks serve, the same for every contender.
//!
//!   bench-producer bulk BYTES            BYTES from a fixed 1 MiB buffer, plain write(2)
//!   bench-producer ticks MS COUNT        COUNT lines "<unix time in ns>", one every MS
//!   bench-producer hello                 one line, at once
//!
//! With BENCH_CGROUP set, it first moves itself into that cgroup (v2), so the
//! relay's own CPU time can be told apart from the producer's.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn main() {
    if let Some(cg) = std::env::var_os("BENCH_CGROUP") {
        let procs = std::path::Path::new(&cg).join("cgroup.procs");
        std::fs::write(procs, std::process::id().to_string()).expect("cannot enter BENCH_CGROUP");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .expect("see the usage in the source")
    };
    match args.first().map(String::as_str) {
        Some("bulk") => bulk(arg(1)),
        Some("ticks") => ticks(arg(1), arg(2)),
        Some("hello") => println!("hello"),
        _ => {
            eprintln!("usage: bench-producer bulk BYTES | ticks MS COUNT | hello");
            std::process::exit(2);
        }
    }
}

fn bulk(mut left: u64) {
    let buf = vec![b'x'; 1 << 20];
    let out = std::io::stdout();
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        match nix::unistd::write(&out, &buf[..n]) {
            Ok(w) => left -= w as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                eprintln!("bench-producer: write: {e}");
                std::process::exit(1);
            }
        }
    }
}

fn ticks(every_ms: u64, count: u64) {
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
