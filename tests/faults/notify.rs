//! A service manager that does not read its notifications for a while: the
//! daemon serves on, and notifies again once it is read.

use std::io::Read;
use std::net::TcpStream;
use std::time::Duration;

use crate::common::*;

/// While the notify socket's queue is full (the service manager lags; the
/// queue holds net.unix.max_dgram_qlen datagrams, 10 by default), the daemon
/// goes on serving clients (STATUS and WATCHDOG are dropped, and it says so
/// once); once the socket is read again, it notifies again.
/// The watchdog (every 10 ms here) fills the queue quickly.
#[test]
fn a_lagging_service_manager_does_not_stop_the_daemon() {
    let (passed, addr) = pass_tcp("lag");
    let opts = Options::env(&[("WATCHDOG_USEC", "20000")]);
    let mut d = Daemon::spawn(&one_service(r#"["echo", "hi"]"#, ""), vec![passed], opts);
    d.wait_note("READY=1");
    assert_eq!(fetch_text(addr), "hi\n");
    d.pause_notifications(true);
    d.wait_log(&["WARN", "notification queue is full"]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let served = s.read_to_string(&mut out);
    assert!(
        served.is_ok() && out == "hi\n",
        "not served within 5 s while the notify queue was full: {served:?} {out:?}"
    );
    // Once the manager reads again, so does the daemon's next notification.
    d.pause_notifications(false);
    d.wait_log(&["reads notifications again"]);
    d.wait_note("WATCHDOG=1");
    assert_eq!(fetch_text(addr), "hi\n");
}
