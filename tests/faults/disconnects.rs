//! Clients that leave at random points of a stream, with a close or a
//! reset: each time the command's whole process group is gone soon after,
//! no zombie is left, and the daemon's descriptors and pipes end where they
//! began.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{median, seed, XorShift};

/// What `seq 1 N` prints, until it is at least `len` bytes long.
fn seq_output(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 1u64;
    while out.len() < len {
        out.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    out
}

/// Where `got` first differs from `pattern` repeated (None: it does not).
/// Compares slices, not bytes: this runs over gigabytes in the long tier.
fn first_difference(got: &[u8], pattern: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < got.len() {
        let len = pattern.len().min(got.len() - at);
        if got[at..at + len] != pattern[..len] {
            let i = (0..len).find(|&i| got[at + i] != pattern[i]).unwrap();
            return Some(at + i);
        }
        at += len;
    }
    None
}

/// Waits until no live process is left in process group `pgid`; returns how
/// long that took from `since`, or panics after `patience`.
fn wait_group_gone(pgid: i32, since: Instant, patience: Duration) -> Duration {
    let gone = poll(patience.saturating_sub(since.elapsed()), || {
        group_members(pgid).is_empty().then(|| since.elapsed())
    });
    gone.unwrap_or_else(|| {
        panic!(
            "process group {pgid} still has {:?} after {:?}",
            group_members(pgid),
            since.elapsed()
        )
    })
}

/// Per point: how the client leaves, and what was measured.
struct Disconnects {
    served: usize,
    left_before_served: usize,
    resets: usize,
    zero_reads: usize,
    most_group_gone: Duration,
    group_gone: Vec<Duration>,
}

/// Runs `points` clients that each read a random number of bytes (0 to
/// 4 MiB) of an endless stream, then close or reset. Two services: `seq 1 …
/// | cat` and a shell looping `cat` over a file, both groups of several
/// processes.
fn disconnect_at_random_points(points: usize) -> Disconnects {
    const KILL_GRACE: Duration = Duration::from_millis(500);
    const MAX_READ: u64 = 4 << 20;
    let seed = seed();
    eprintln!(
        "disconnects: {points} points, seed {seed} (SPLICE_RELAY_FAULT_SEED={seed} repeats them)"
    );
    let mut rng = XorShift::new(seed);

    let files = tempfile::tempdir().unwrap();
    // An odd length, so the repetitions do not line up with any buffer size.
    let chunk = rng.bytes((1 << 20) + 7);
    let file = files.path().join("chunk");
    std::fs::write(&file, &chunk).unwrap();
    let seq = seq_output(MAX_READ as usize);

    let (seq_sock, seq_addr) = pass_tcp("seq");
    let (cat_sock, cat_addr) = pass_tcp("cat");
    let config = format!(
        r#"log_level = "debug"
[[service]]
name = "seq"
command = ["sh", "-c", "seq 1 1000000000 | cat"]
kill_grace = "500ms"

[[service]]
name = "cat"
command = ["sh", "-c", "while :; do cat {}; done"]
kill_grace = "500ms"
"#,
        file.display()
    );
    let d = Daemon::start(&config, vec![seq_sock, cat_sock]);

    // Warm up both services, then take the baseline.
    for addr in [seq_addr, cat_addr] {
        let mut s = connect(addr);
        let mut b = [0u8; 100];
        s.read_exact(&mut b).unwrap();
    }
    d.wait_records(2);
    let pid = d.pid();
    let baseline = d.fd_baseline();

    let mut out = Disconnects {
        served: 0,
        left_before_served: 0,
        resets: 0,
        zero_reads: 0,
        most_group_gone: Duration::ZERO,
        group_gone: Vec::new(),
    };
    let mut buf = vec![0u8; MAX_READ as usize];
    // Every client gets a connection number, served or not.
    for (point, next_conn) in (0..points).zip(3u64..) {
        let use_cat = rng.below(2) == 0;
        let n = match rng.below(10) {
            0 => 0,
            1 | 2 => rng.below(65536),
            _ => rng.below(MAX_READ + 1),
        } as usize;
        let reset = rng.below(2) == 0;
        let what = format!(
            "point {point} (seed {seed}): {} {n} bytes, then {}",
            if use_cat { "cat" } else { "seq" },
            if reset { "reset" } else { "close" }
        );

        let cursor = d.log_len();
        let mut s = connect(if use_cat { cat_addr } else { seq_addr });
        let peer = s.local_addr().unwrap().to_string();
        s.read_exact(&mut buf[..n])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let pattern = if use_cat { &chunk } else { &seq };
        if let Some(i) = first_difference(&buf[..n], pattern) {
            let want = pattern[i % pattern.len()];
            panic!("{what}: byte {i} is {} instead of {want}", buf[i]);
        }
        if reset {
            reset_on_close(&s);
            out.resets += 1;
        }
        if n == 0 {
            out.zero_reads += 1;
        }
        let closed = Instant::now();
        drop(s);

        // Only this client is in flight: either the daemon accepted it (a
        // debug line with its address) or it left before it was served (no
        // record: a debug line, and an episode that counts such clients).
        let (_, line) = d.wait_line_from(cursor, |l| {
            (l.contains(" accepted ") && log_field(l, "peer") == Some(&peer))
                || l.contains("left before it was served")
        });
        let conn: u64 = log_field(&line, "conn").unwrap().parse().unwrap();
        assert_eq!(conn, next_conn, "{what}: {line}");
        if line.contains("left before it was served") {
            assert_eq!(n, 0, "{what}: it got bytes, so it was served: {line}");
            assert!(Record::parse(&line).is_err(), "{what}: a record: {line}");
            out.left_before_served += 1;
            continue;
        }
        let record = d.wait_record_from(cursor, |r| r.conn == conn);
        assert_eq!(record.reason, "client-gone", "{what}: {record}");
        assert!(
            record.bytes >= n as u64,
            "{what}: the record says {} bytes: {record}",
            record.bytes
        );
        assert!(record.pid > 0, "{what}: {record}");
        let took = wait_group_gone(record.pid, closed, KILL_GRACE + Duration::from_secs(1));
        out.most_group_gone = out.most_group_gone.max(took);
        out.group_gone.push(took);
        assert!(
            d.children().is_empty(),
            "{what}: children left: {:?}",
            d.children()
        );
        out.served += 1;
    }

    // Every record is written after the connection's last descriptor closed.
    d.assert_fds_back(baseline);
    let after = (d.fd_count(), pipe_fd_count(pid));
    eprintln!(
        "disconnects: {} served, {} left before they were served, {} resets, {} zero-byte reads; \
         group gone after the close: median {:?}, worst {:?}; fds and pipes {baseline:?} -> \
         {after:?}",
        out.served,
        out.left_before_served,
        out.resets,
        out.zero_reads,
        median(&mut out.group_gone.clone()),
        out.most_group_gone
    );
    assert!(d.children().is_empty());
    assert_eq!(d.records().len(), 2 + out.served);
    if out.left_before_served > 0 {
        d.wait_log(&["left before its command started"]);
    }
    out
}

/// Clients that leave at 100 random points of a stream (0 to 4 MiB read, then
/// a close or a reset): each time the command's whole process group is gone
/// within kill_grace + 1 s, no zombie is left, and at the end the daemon's
/// descriptors and pipes are back to the baseline.
#[test]
fn clients_leaving_at_100_random_points_leave_nothing_behind() {
    disconnect_at_random_points(100);
}

/// The same at 1,000 points (`SPLICE_RELAY_FAULT_POINTS` overrides).
#[test]
#[ignore = "long tier: 1,000 disconnect points"]
fn long_clients_leaving_at_1000_random_points_leave_nothing_behind() {
    disconnect_at_random_points(env_count("SPLICE_RELAY_FAULT_POINTS", 1000));
}
