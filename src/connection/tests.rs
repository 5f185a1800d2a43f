//! The connection's pipeline, driven by hand.

use std::io::Write;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use super::*;
use crate::places::Gate;
use crate::shutdown::Shutdown;

/// Log lines, captured for the test that writes them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A descriptor the event loop refuses (epoll takes no regular file)
/// still ends in the connection's one record.
#[tokio::test]
async fn a_socket_the_event_loop_refuses_still_gets_its_record() {
    let log = Captured::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let config = crate::config::load_str(
        "t.toml",
        "[[service]]\nname = \"s\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let site = crate::config::sites::of_socket(&config.services, "s").unwrap();
    let (_stop, watch) = Shutdown::new();
    let stats = Arc::new(Stats::default());
    let ids = Arc::new(AtomicU64::new(1));
    let shared = Commands::new(Arc::from(Vec::new()), None, watch.clone(), ids);
    let context = Arc::new(Context {
        base_env: Arc::from(Vec::new()),
        shutdown: watch,
        shared: Arc::new(shared),
        admissions: Admissions::default(),
        stats: Arc::clone(&stats),
        cgroups: None,
        starved: Starved::default(),
        gates: Gates::default(),
    });
    let file = tempfile::tempfile().unwrap();
    let (service_gate, daemon_gate) = (Gate::new(1), Gate::new(1));
    let handler = Handler {
        record: Record::open(7, "s".into(), Arc::clone(&stats)),
        site,
        socket: OwnedFd::from(file),
        peer: Peer::Unix {
            pid: 1,
            uid: 0,
            gid: 0,
        },
        places: Places {
            service: ServicePlace::Held(service_gate.try_acquire().unwrap()),
            daemon: daemon_gate.try_acquire().unwrap(),
        },
        context,
    };
    handler.run().await;

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let records: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connection ended"))
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    assert!(
        records[0].contains("reason=\"error\"")
            && records[0].contains("cannot register the connection with the event loop")
            && records[0].contains("conn=7"),
        "{text}"
    );
    assert_eq!(stats.served.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(stats.active.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(service_gate.active() + daemon_gate.active(), 0);
}
