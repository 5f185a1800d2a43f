use std::io::Write;
use std::time::Duration;

use super::*;

/// A pipe's read end and write end, with room for what the tests write.
fn pipe() -> (OwnedFd, std::fs::File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    (r, std::fs::File::from(w))
}

fn tag() -> Tag {
    Tag {
        conn: 1,
        service: "t".into(),
    }
}

/// Waits (up to 10 s) until `done` holds of the log's entry.
fn until(log: &StderrLog, what: &str, done: impl Fn(&Entry) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&lock(&log.entry)) {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn registered(log: &StderrLog) -> bool {
    let readers = READERS.as_ref().unwrap();
    lock(&readers.entries).contains_key(&log.id)
}

/// The thread logs every line, the last one (without a newline) at the
/// end of the file, and then lets the pipe go.
#[test]
fn the_thread_logs_every_line_and_lets_the_pipe_go_at_its_end() {
    let (r, mut w) = pipe();
    let log = StderrLog::watch(r, tag()).unwrap();
    log.started(1);
    assert!(registered(&log));
    w.write_all(b"one\ntwo\nthr").unwrap();
    until(&log, "two lines", |e| e.lines.counts().0 == 2);
    assert!(!lock(&log.entry).done, "the pipe is still open");
    drop(w);
    until(&log, "the end", |e| e.done);
    assert_eq!(lock(&log.entry).lines.counts(), (3, 0));
    assert!(!registered(&log));
    log.finish();
}

/// A flood's drops are reported a second after the first one, not at every
/// read, and not only at the end.
#[test]
fn drops_are_reported_when_due_not_before() {
    let (r, mut w) = pipe();
    let log = StderrLog::watch(r, tag()).unwrap();
    w.write_all(&b"x\n".repeat(300)).unwrap();
    until(&log, "300 lines read", |e| e.lines.counts() == (200, 100));
    let counted = Instant::now();
    until(&log, "the report", |e| e.lines.counts().1 == 0);
    let waited = counted.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "reported {waited:?} after the drops, before it was due"
    );
    assert!(!lock(&log.entry).done);
    drop(w);
    log.finish();
}

/// finish() ends the log even while something still holds the pipe open
/// (a process that left the command's group), after logging what was
/// written: the daemon's end is closed once it returns.
#[test]
fn finish_ends_the_log_while_the_pipe_is_held_open() {
    let (r, mut w) = pipe();
    let log = StderrLog::watch(r, tag()).unwrap();
    // Not read by the thread yet, perhaps: finish() reads it.
    w.write_all(b"last words\n").unwrap();
    let entry = Arc::clone(&log.entry);
    log.finish();
    assert_eq!(lock(&entry).lines.counts().0, 1);
    drop(entry);
    let after = w.write(b"more\n").map_err(|e| e.raw_os_error());
    assert_eq!(after, Err(Some(libc::EPIPE)), "the daemon's end is open");
}

/// A pipe that is always full does not hold back another's lines: the
/// thread reads each ready pipe once a wake.
#[test]
fn a_flood_on_one_pipe_does_not_hold_back_another() {
    let (flood_r, mut flood_w) = pipe();
    let flood = StderrLog::watch(flood_r, tag()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let chunk = b"flood\n".repeat(10_000);
            while !stop.load(Ordering::Relaxed) {
                if flood_w.write_all(&chunk).is_err() {
                    return;
                }
            }
        })
    };
    until(&flood, "the flood is dropping", |e| e.lines.counts().1 > 0);
    let (r, mut w) = pipe();
    let quiet = StderrLog::watch(r, tag()).unwrap();
    w.write_all(b"heard\n").unwrap();
    until(&quiet, "the quiet pipe's line", |e| e.lines.counts().0 == 1);
    stop.store(true, Ordering::Relaxed);
    flood.finish();
    writer.join().unwrap();
    quiet.finish();
}
