//! A soak: many short connections, and the daemon's memory and descriptors
//! stay where they were.

use std::time::Instant;

use crate::common::*;

/// Runs `n` fetches of `echo hello` from `threads` threads.
fn fetches(addr: std::net::SocketAddr, n: usize, threads: usize) {
    fan_out(threads, n, move |_| assert_eq!(fetch_text(addr), "hello\n"));
}

/// `n` short connections; RSS and descriptors after the first 1,000 and at
/// the end, both measured with no connection running.
fn soak(n: usize) {
    const THREADS: usize = 4;
    let (d, addr) = serve(r#"["echo", "hello"]"#, "");
    let pid = d.pid();
    let started = Instant::now();
    fetches(addr, 1000, THREADS);
    d.wait_records(1000);
    let (rss_1000, fds_1000) = (rss_kib(pid), d.fd_baseline());
    fetches(addr, n - 1000, THREADS);
    let records = d.wait_records(n);
    let (rss_end, fds_end) = (rss_kib(pid), d.fd_baseline());
    let elapsed = started.elapsed();
    eprintln!(
        "soak: {n} connections from {THREADS} threads in {elapsed:?} ({:.0}/s); RSS after 1,000 \
         {rss_1000} KiB, at the end {rss_end} KiB; fds and pipes {fds_1000:?} -> {fds_end:?}",
        n as f64 / elapsed.as_secs_f64()
    );
    let slack = (rss_1000 / 20).max(512);
    assert!(
        rss_end <= rss_1000 + slack,
        "RSS grew from {rss_1000} KiB to {rss_end} KiB"
    );
    d.assert_fds_back(fds_1000);
    assert_eq!(records.len(), n);
    assert!(d.children().is_empty());
}

/// 3,000 short connections: RSS within max(5%, 512 KiB) and descriptors
/// exactly where they were after the first 1,000.
#[test]
fn a_soak_of_3000_connections_keeps_memory_and_descriptors_flat() {
    soak(3000);
}

/// The same over 100,000 connections (`SPLICE_RELAY_SOAK` overrides).
#[test]
#[ignore = "long tier: 100,000 connections"]
fn long_soak_of_100000_connections_keeps_memory_and_descriptors_flat() {
    soak(env_count("SPLICE_RELAY_SOAK", 100_000).max(1001));
}
