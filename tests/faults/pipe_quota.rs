//! The per-user pipe quota running out: the daemon gets smaller pipes than
//! `pipe_size` asks for, and no client loses a byte.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use crate::common::*;

/// What `seq FROM TO` prints.
fn seq_range(from: u64, to: u64) -> Vec<u8> {
    (from..=to)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// How many of `pid`'s pipe descriptors have each capacity.
fn pipe_sizes(pid: i32) -> BTreeMap<usize, usize> {
    let mut sizes = BTreeMap::new();
    for (n, target) in fd_targets(pid) {
        if let Some((_, size)) = target
            .starts_with("pipe:")
            .then(|| pipe_fill(pid, n))
            .flatten()
        {
            *sizes.entry(size).or_default() += 1;
        }
    }
    sizes
}

/// The daemon as an unprivileged user (65534) with `pipe_size = 1048576` and
/// 150 connections alive at once, so the user's pipe quota
/// (fs.pipe-user-pages-soft, 64 MiB by default) runs out after about 60 of
/// them: every client still gets all of its 2.7 MB, byte for byte. What the
/// daemon logs about the quota is printed.
#[test]
#[cfg_attr(
    not(as_root),
    ignore = "needs root: the daemon runs as uid 65534, whose pipe quota runs out"
)]
fn the_pipe_quota_running_out_costs_no_byte() {
    require_root();
    const CLIENTS: usize = 150;
    let first = seq_range(1, 100_000);
    let whole = seq_range(1, 400_000);
    let (passed, addr) = pass_tcp("quota");
    // The command stops after the first part until the client sends a byte,
    // so all 150 connections (and their pipes) exist at once.
    let config = format!(
        "log_level = \"debug\"\n{}",
        one_service(
            &sh("seq 1 100000; head -c 1 >/dev/null; seq 100001 400000"),
            "stdin = \"client\"\nmax_connections = 200\npipe_size = 1048576\ntransfer = \"splice\"",
        )
    );
    let mut d = Daemon::spawn(
        &config,
        vec![passed],
        Options {
            user: Some((65534, 65534)),
            ..Options::default()
        },
    );
    d.wait_note("READY=1");
    let pid = d.pid();
    let uids = status_field(pid, "Uid");
    assert_eq!(uids.split_whitespace().nth(1), Some("65534"), "{uids}");
    let baseline = d.fd_baseline();
    let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft").unwrap();

    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = connect(addr);
        let mut got = vec![0u8; first.len()];
        s.read_exact(&mut got).unwrap();
        assert!(got == first, "the first part differs");
        clients.push(s);
    }
    let pipes_at_peak = pipe_fd_count(pid);
    let sizes = pipe_sizes(pid);
    for mut s in clients {
        s.write_all(b"x").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert_eq!(
            first.len() + rest.len(),
            whole.len(),
            "a client got a short stream"
        );
        assert!(rest == whole[first.len()..], "a client's stream differs");
    }
    let records = d.wait_records(CLIENTS);
    let elapsed = started.elapsed();

    let refused = d.log_lines(&["WARN", "the kernel refuses pipes of pipe_size"]);
    let notable: Vec<String> = d
        .log_lines(&[])
        .into_iter()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains("connection ended"))
        .filter(|l| !l.contains(" listening ") && !l.contains(" ready "))
        .collect();
    eprintln!(
        "pipe quota: pipe-user-pages-soft {}, {CLIENTS} clients with all bytes in {elapsed:?}; \
         {} pipes open at the peak, by size {sizes:?}; refusal logged {} time(s) ({:?}); \
         other lines above debug: {notable:?}",
        soft.trim(),
        pipes_at_peak,
        refused.len(),
        refused.first()
    );
    assert!(pipes_at_peak >= baseline.1 + 3 * CLIENTS);
    assert_eq!(
        refused.len(),
        1,
        "one warning (at most one a minute; none means the quota never ran out and the test proved nothing)"
    );
    for r in &records {
        r.assert_ended("output-ended", "0");
    }
    d.assert_fds_back(baseline);
    assert!(d.children().is_empty());
}
