//! Containment: each connection's command in a cgroup of its own, under a
//! subtree delegated to the daemon as systemd delegates one. Nothing a
//! command starts outlives its connection's record, whatever it does; the
//! record says what it used; a limit that cannot be enforced is refused; and
//! without delegation the daemon uses process groups and says why.
//!
//! The cgroup tests run as root: they make cgroups under this machine's
//! cgroup v2 mount, mark them delegated, and start the daemon inside.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use nix::sys::socket::{setsockopt, sockopt};

/// Starts the daemon on `config` inside `cgroup`, with one socket.
fn start_in(cgroup: &TestCgroup, config: &str) -> (Daemon, SocketAddr) {
    let (sock, addr) = pass_tcp("test");
    let opts = Options {
        cgroup: Some(cgroup.path.clone()),
        ..Options::default()
    };
    let mut d = Daemon::spawn(config, vec![sock], opts);
    d.wait_note("READY=1");
    (d, addr)
}

/// Ways a command's processes try to outlive it. Each runs a shell loop
/// with `MARK` in its argv, which says "MARK ran" on the command's stdout
/// (and so holds it) and makes /tmp/MARK; once that exists the command says
/// "started", and stays (writing now and then, so that a client that closes
/// is noticed) or exits.
const ESCAPERS: [(&str, &str); 5] = [
    (
        "a new session",
        "setsid sh -c 'echo $0 ran; : > /tmp/$0; while :; do sleep 1; done' MARK &",
    ),
    (
        "setsid -f",
        "setsid -f sh -c 'echo $0 ran; : > /tmp/$0; while :; do sleep 1; done' MARK",
    ),
    (
        "a double fork",
        "(sh -c 'echo $0 ran; : > /tmp/$0; while :; do sleep 1; done' MARK &) ; :",
    ),
    (
        "a job in a process group of its own",
        "set -m; sh -c 'echo $0 ran; : > /tmp/$0; while :; do sleep 1; done' MARK &",
    ),
    (
        "a new session that ignores SIGTERM",
        "setsid sh -c 'trap : TERM; echo $0 ran; : > /tmp/$0; while :; do sleep 1; done' MARK &",
    ),
];

/// How a client of an escaping command leaves.
#[derive(Clone, Copy, Debug)]
enum Leaves {
    Closes,
    Resets,
    /// Reads until the command's output ends (it exits after "started").
    WaitsForTheEnd,
}

/// Each kind of escaper, `n` times, with clients that close, reset and wait
/// for the end: when each record is written, no process with the
/// connection's marker is alive; then its cgroup is emptied, and at the
/// end (after a reload, which removes the ready cgroups) the daemon's
/// descriptors are back where they were.
fn escapers(n: usize) {
    require_root();
    let cgroup = TestCgroup::delegated();
    // The client sends the kind, its marker (argv shows it) and whether the
    // command stays. Lines end in \n, written as TOML escapes.
    let script = ESCAPERS
        .iter()
        .enumerate()
        .map(|(i, (_, escape))| {
            format!(
                "if [ $KIND = {i} ]; then\\n{}\\nfi\\n",
                escape.replace("MARK", "$MARK")
            )
        })
        .collect::<String>();
    let config = format!(
        "[[service]]\nname = \"test\"\nkill_grace = \"200ms\"\nstdin = \"client\"\n\
         command = [\"sh\", \"-c\", \"read KIND MARK STAY\\n{script}\
         while [ ! -e /tmp/$MARK ]; do sleep 0.01; done; rm /tmp/$MARK\\necho started\\n\
         if [ $STAY = 1 ]; then while :; do sleep 0.1; echo .; done; fi\"]\n"
    );
    let (mut d, addr) = start_in(&cgroup, &config);
    let baseline = d.fd_baseline();
    let ways = [Leaves::Closes, Leaves::Resets, Leaves::WaitsForTheEnd];
    let jobs = n * ESCAPERS.len();
    let took = fan_out(4, jobs, |job| {
        let (kind, leaves) = (job % ESCAPERS.len(), ways[(job / ESCAPERS.len()) % 3]);
        let mark = format!("sr-mark-{}-{job}", std::process::id());
        let what = format!("{} ({leaves:?}), job {job}", ESCAPERS[kind].0);
        let stay = u8::from(!matches!(leaves, Leaves::WaitsForTheEnd));
        // Ports are reused over 500 connections: look from here on.
        let cursor = d.log_len();
        let mut s = connect(addr);
        s.write_all(format!("{kind} {mark} {stay}\n").as_bytes())
            .unwrap();
        let mut seen = (false, false);
        while seen != (true, true) {
            let line = read_line(&mut s);
            seen.0 |= line == "started\n";
            seen.1 |= line == format!("{mark} ran\n");
            assert!(!line.is_empty(), "{what}: output ended early");
        }
        if stay == 1 {
            assert!(
                !processes_with(&mark).is_empty(),
                "{what}: the escaper is gone"
            );
        }
        let port = s.local_addr().unwrap().port();
        let left = Instant::now();
        match leaves {
            Leaves::Closes => drop(s),
            Leaves::Resets => {
                reset_on_close(&s);
                drop(s);
            }
            Leaves::WaitsForTheEnd => {
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let (rest, error) = read_until_end(&mut s);
                assert!(
                    rest.is_empty() && error.is_none(),
                    "{what}: {rest:?} {error:?}"
                );
            }
        }
        let record = d.wait_record_from(cursor, |r| r.peer.ends_with(&format!(":{port}")));
        let alive = processes_with(&mark);
        assert!(alive.is_empty(), "{what}: {alive:?} outlived {record}");
        let reason = match leaves {
            Leaves::WaitsForTheEnd => "output-ended",
            _ => "client-gone",
        };
        assert_eq!(record.reason, reason, "{what}: {record}");
        assert!(record.cpu_usec.is_some_and(|c| c > 0), "{record}");
        left.elapsed()
    });
    cgroup.wait_all_empty();
    // The ready cgroups keep their descriptors open; a reload removes them.
    assert!(!cgroup.slots().is_empty(), "cgroups kept for reuse");
    d.signal(Signal::SIGHUP);
    d.wait_note("READY=1");
    assert_eq!(
        cgroup.slots(),
        Vec::<String>::new(),
        "a reload removes the ready cgroups"
    );
    d.assert_fds_back(baseline);
    let worst = took.iter().max().unwrap();
    eprintln!(
        "escapers: {jobs} connections ({n} of each of {} kinds); the last process gone at worst {worst:?} after the client left",
        ESCAPERS.len()
    );
    assert_eq!(
        cgroup.procs(),
        vec![d.pid()],
        "only the daemon is left in its subtree"
    );
}

#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn escapers_of_every_kind_end_with_their_connection_100_times() {
    escapers(env_count("SPLICE_RELAY_ESCAPERS", 100));
}

#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn the_daemon_lives_in_a_leaf_and_says_which_containment_it_uses() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let (d, addr) = start_in(&cgroup, &one_service(&sh("cat /proc/self/cgroup"), ""));
    let line = d.wait_log(&["containment: a cgroup per connection in"]);
    assert!(
        line.contains(&cgroup.path.display().to_string())
            && line.contains("delegated by the service manager")
            && line.contains("clone3 with CLONE_INTO_CGROUP"),
        "{line}"
    );
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", d.pid())).unwrap();
    let leaf = cgroup.path.file_name().unwrap().to_string_lossy();
    assert!(own.contains(&format!("/{leaf}/daemon\n")), "{own}");
    let seen = fetch_text(addr);
    assert!(seen.contains(&format!("/{leaf}/slot-1\n")), "{seen}");
    let record = d.wait_record(1);
    assert!(record.cpu_usec.is_some(), "{record}");
    cgroup.wait_all_empty();
}

/// A command's cgroup is reused: the next connection's command starts in
/// the same one (no cgroup is made or removed on its path), and its record
/// counts only what its own command used, not the CPU the one before burned.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_cgroup_serves_command_after_command_and_each_record_counts_its_own() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let ticks = clock_ticks_per_second();
    // `burn`: the shell burns half a second of CPU (by its own account, as
    // in cpu_in_the_record); anything else, nothing.
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh(&format!(
                "read W; cat /proc/self/cgroup; t=0; while [ $W = burn ] && [ $t -lt {} ]; do \
                 i=0; while [ $i -lt 1000 ]; do i=$((i+1)); done; \
                 read -r s < /proc/$$/stat; set -- $s; t=$((${{14}}+${{15}})); done",
                ticks / 2
            )),
            "stdin = \"client\"",
        ),
    );
    let leaf = cgroup.path.file_name().unwrap().to_string_lossy();
    let mut cpu = Vec::new();
    for (conn, word) in [(1, "burn"), (2, "idle"), (3, "idle")] {
        let mut s = connect(addr);
        s.write_all(format!("{word}\n").as_bytes()).unwrap();
        let (out, _) = read_until_end(&mut s);
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.contains(&format!("/{leaf}/slot-1\n")),
            "connection {conn}: {out}"
        );
        let record = d.wait_record(conn);
        cpu.push(record.cpu_usec.expect("cpu_usec"));
        // Back in the pool before the next connection takes it.
        let back = poll(PATIENCE, || {
            (cgroup.populated_slots().is_empty()).then_some(())
        });
        assert!(back.is_some(), "{:?}", cgroup.populated_slots());
    }
    eprintln!("cpu of three commands in one cgroup, µs: {cpu:?}");
    assert!(cpu[0] >= 400_000, "the burn: {cpu:?}");
    assert!(
        cpu[1] < cpu[0] / 2 && cpu[2] < cpu[0] / 2,
        "each record counts its own command: {cpu:?}"
    );
    assert_eq!(cgroup.slots(), vec!["slot-1"]);
}

/// A ready cgroup is kept for the next command, at most `READY_MAX` (64) of
/// them; a reload removes them (the next command gets a new one, with the
/// limits the configuration now gives), and the cgroup of a command that
/// ran across it once that command ends; the stop removes them all.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn ready_cgroups_are_bounded_and_go_at_a_reload_and_at_the_stop() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let config = format!(
        "max_connections = 100\n{}",
        one_service(
            &sh("echo started; read W; cat /proc/self/cgroup"),
            "stdin = \"client\"\nmax_connections = 100\nmax_per_source = 100"
        )
    );
    let (mut d, addr) = start_in(&cgroup, &config);
    // 70 commands at once: 70 cgroups.
    let clients: Vec<_> = (0..70)
        .map(|_| {
            let mut s = connect(addr);
            assert_eq!(read_line(&mut s), "started\n");
            s
        })
        .collect();
    assert_eq!(cgroup.populated_slots().len(), 70);
    for mut s in clients {
        s.write_all(b"go\n").unwrap();
        read_until_end(&mut s);
    }
    d.wait_records(70);
    cgroup.wait_all_empty();
    let kept = poll(PATIENCE, || (cgroup.slots().len() == 64).then_some(()));
    assert!(kept.is_some(), "64 kept: {:?}", cgroup.slots());

    // One command runs across the reload, in a cgroup from the pool.
    let mut held = connect(addr);
    assert_eq!(read_line(&mut held), "started\n");
    let in_use = cgroup.populated_slots();
    assert_eq!(in_use.len(), 1);

    d.signal(Signal::SIGHUP);
    d.wait_note("READY=1");
    assert_eq!(cgroup.slots(), in_use, "a reload removes the ready ones");
    held.write_all(b"go\n").unwrap();
    read_until_end(&mut held);
    d.wait_record(71);
    let gone = poll(PATIENCE, || cgroup.slots().is_empty().then_some(()));
    assert!(
        gone.is_some(),
        "one made before the reload is not kept: {:?}",
        cgroup.slots()
    );

    let mut s = connect(addr);
    assert_eq!(read_line(&mut s), "started\n");
    s.write_all(b"go\n").unwrap();
    let (out, _) = read_until_end(&mut s);
    let leaf = cgroup.path.file_name().unwrap().to_string_lossy();
    assert!(
        String::from_utf8_lossy(&out).contains(&format!("/{leaf}/slot-71\n")),
        "a new cgroup after the reload: {}",
        String::from_utf8_lossy(&out)
    );
    d.wait_record(72);
    let kept = poll(PATIENCE, || (cgroup.slots() == ["slot-71"]).then_some(()));
    assert!(kept.is_some(), "{:?}", cgroup.slots());

    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    assert_eq!(
        cgroup.slots(),
        Vec::<String>::new(),
        "the stop removes them"
    );
    assert_eq!(cgroup.procs(), Vec::<i32>::new());
}

/// With the memory controller, each record's `memory_peak` is its own
/// command's: one that held 24 MiB is followed by one that held little,
/// whether the second got a fresh cgroup (a kernel that cannot reset
/// `memory.peak`, before Linux 6.12) or the first one's, its peak reset.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn each_record_has_its_own_commands_memory_peak() {
    require_root();
    let cgroup = TestCgroup::delegated();
    if !cgroup.offers("memory", "each_record_has_its_own_commands_memory_peak") {
        return;
    }
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh(
                "read W; if [ $W = big ]; then x=$(head -c 24M /dev/zero | tr '\\\\0' a); fi; \
                 echo done; cat /proc/self/cgroup",
            ),
            "stdin = \"client\"\nmemory_max = \"256M\"",
        ),
    );
    let mut peaks = Vec::new();
    for (conn, word) in [(1, "big"), (2, "small")] {
        let mut s = connect(addr);
        s.write_all(format!("{word}\n").as_bytes()).unwrap();
        let (out, _) = read_until_end(&mut s);
        eprintln!("{word}: {}", String::from_utf8_lossy(&out));
        peaks.push(d.wait_record(conn).memory_peak.expect("memory_peak"));
        cgroup.wait_all_empty();
    }
    eprintln!("memory_peak of a big command, then a small one: {peaks:?}");
    assert!(peaks[0] >= 24 << 20, "{peaks:?}");
    assert!(peaks[1] < 12 << 20, "{peaks:?}");
}

/// A daemon started again in a subtree that was ended with cgroup.kill (as
/// a stop that kills the unit's cgroup does) serves its commands: it does
/// not reuse the leaf of the run before.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_second_run_after_a_cgroup_kill_serves_its_commands() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let config = one_service(&sh("echo served"), "");
    let (mut d, addr) = start_in(&cgroup, &config);
    assert_eq!(fetch_text(addr), "served\n");
    d.wait_record(1);
    d.signal(Signal::SIGTERM);
    d.wait_exit();
    std::fs::write(cgroup.path.join("cgroup.kill"), "1").unwrap();
    let (d, addr) = start_in(&cgroup, &config);
    assert_eq!(fetch_text(addr), "served\n");
    d.wait_record(1).assert_ended("output-ended", "0");
    cgroup.wait_all_empty();
}

#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn without_delegation_it_uses_process_groups_and_takes_nothing_over() {
    require_root();
    let cgroup = TestCgroup::plain();
    let (d, addr) = start_in(&cgroup, &one_service(&sh("echo hi"), ""));
    let line = d.wait_log(&["containment: process groups ("]);
    assert!(
        line.contains(&format!(
            "the daemon's cgroup {} is not delegated to it (no user.delegate or trusted.delegate attribute",
            cgroup.path.display()
        )),
        "{line}"
    );
    assert_eq!(fetch_text(addr), "hi\n");
    d.wait_record(1);
    let children: Vec<_> = std::fs::read_dir(&cgroup.path)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .collect();
    assert!(children.is_empty(), "it made cgroups in {:?}", cgroup.path);

    // A service that needs a cgroup is a configuration error there.
    let (sock, _) = pass_tcp("test");
    let config = one_service(&sh("echo hi"), "containment = \"cgroup\"");
    let opts = Options {
        cgroup: Some(cgroup.path.clone()),
        ..Options::default()
    };
    let mut d = Daemon::spawn(&config, vec![sock], opts);
    assert_eq!(d.wait_exit().code(), Some(78));
    d.wait_log(&[&format!(
        ":5:15: service \"test\": containment: \"cgroup\" needs a delegated cgroup v2 subtree, and the daemon has none: the daemon's cgroup {} is not delegated",
        cgroup.path.display()
    )]);
}

#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_limit_without_its_controller_is_refused_with_its_position() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (key, value, controller) in [
        ("memory_max", "\"512M\"", "memory"),
        ("memory_high", "\"1G\"", "memory"),
        ("cpu_quota", "\"50%\"", "cpu"),
        ("cpu_weight", "50", "cpu"),
        ("tasks_max", "16", "pids"),
        ("io_weight", "50", "io"),
    ] {
        std::fs::write(
            &path,
            format!("[[service]]\nname = \"a\"\ncommand = [\"true\"]\n{key} = {value}\n"),
        )
        .unwrap();
        // As ExecReload= runs it: in the subtree (systemd's .control).
        let control = cgroup.path.join(".control");
        std::fs::create_dir_all(&control).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" --check --config \"$1\"",
                control.display()
            ))
            .arg(BIN)
            .arg(&path)
            .output()
            .unwrap();
        let controllers = std::fs::read_to_string(cgroup.path.join("cgroup.controllers")).unwrap();
        if controllers.split_whitespace().any(|c| c == controller) {
            assert_eq!(out.status.code(), Some(0), "{controller} is offered here");
            continue;
        }
        assert!(
            !controllers_required(),
            "{controller} is not offered to {} (cgroup.controllers: {:?}), and {REQUIRE_CONTROLLERS}=1 requires it",
            cgroup.path.display(),
            controllers.trim()
        );
        assert_eq!(out.status.code(), Some(78), "{key}");
        let col = key.len() + 4;
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "splice-relay: {}:4:{col}: service \"a\": {key}: needs the {controller} controller, which {} does not offer (cgroup.controllers: {:?}); see \"containment\" in splice-relay.toml(5)\n",
                path.display(),
                cgroup.path.display(),
                controllers.trim()
            ),
            "{key}"
        );
    }
}

/// A command that forks without end: `cgroup.kill` ends it, and all it made.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_command_that_forks_in_a_loop_is_ended() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let mark = format!("sr-fork-{}", std::process::id());
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh(&format!(
                "echo started; while :; do sh -c 'sleep 30' {mark} & done"
            )),
            "",
        ),
    );
    let mut s = connect(addr);
    assert_eq!(read_line(&mut s), "started\n");
    let many = poll(PATIENCE, || {
        (processes_with(&mark).len() >= 50).then_some(())
    });
    assert!(many.is_some(), "the loop did not fork");
    // The command writes nothing more: a reset is how its client is noticed.
    reset_on_close(&s);
    drop(s);
    let record = d.wait_record(1);
    assert_eq!(record.reason, "client-gone", "{record}");
    assert_eq!(processes_with(&mark), Vec::<i32>::new(), "{record}");
    cgroup.wait_all_empty();
}

/// The record's CPU time is the cgroup's: here the command is a shell
/// alone, which counts until its own CPU time (clock ticks, as /proc shows
/// it) is half a second, then prints that time, with builtins only: the
/// record has it, and the little the shell does after. (A fixed count would
/// take many seconds on an emulated CPU, as in tests/cgroups/run.sh's VM.)
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn the_record_counts_the_cpu_a_command_burns() {
    require_root();
    let cgroup = TestCgroup::delegated();
    cpu_in_the_record(|command| start_in(&cgroup, &one_service(command, "")));
}

/// The same with a process group: the CPU time is the kernel's account of
/// the command (and the children it waited for), from its reaping.
#[test]
fn the_record_counts_the_cpu_a_process_group_command_burns() {
    cpu_in_the_record(|command| serve(command, "containment = \"process-group\""));
}

fn cpu_in_the_record(start: impl FnOnce(&str) -> (Daemon, SocketAddr)) {
    let ticks = clock_ticks_per_second();
    // utime and stime are the 14th and 15th fields of /proc/PID/stat.
    let (d, addr) = start(&sh(&format!(
        "t=0; while [ $t -lt {} ]; do i=0; while [ $i -lt 1000 ]; do i=$((i+1)); done; \
         read -r s < /proc/$$/stat; set -- $s; t=$((${{14}}+${{15}})); done; \
         read -r s < /proc/$$/stat; echo $s",
        ticks / 2
    )));
    let stat = Stat::parse(&fetch_text(addr)).expect("the shell's /proc stat");
    let record = d.wait_record(1);
    let tick_usec = 1_000_000 / ticks;
    let shell = (stat.utime + stat.stime) * tick_usec;
    let cpu = record.cpu_usec.expect("cpu_usec");
    eprintln!("cpu: the shell says {shell} µs; the record {cpu} µs");
    assert!(
        shell >= 100_000,
        "the loop burned too little to measure: {shell} µs"
    );
    // /proc rounds down to ticks.
    assert!(
        cpu + tick_usec >= shell && cpu <= shell + 100_000,
        "shell {shell} µs, record {cpu} µs: {record}"
    );
}

/// A command the OOM killer kills at `memory_max` is recorded `oom-killed`,
/// not `output-ended`: SIGKILL, its cgroup's `memory.events` counts the
/// kill, and `memory.peak` is at the limit. The kill is the command's alone:
/// another connection of the same daemon, whose command waits meanwhile, is
/// served after it, and so is a new one. Needs the memory controller offered
/// to the test's cgroup; where it is not (a hybrid host whose memory
/// controller is cgroup v1's), the test says so and checks nothing, unless
/// controllers are required (tests/cgroups/run.sh's VM): the decision itself
/// is unit-tested in src/end.rs.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn a_command_the_oom_killer_kills_is_recorded_oom_killed() {
    require_root();
    let cgroup = TestCgroup::delegated();
    if !cgroup.offers(
        "memory",
        "a_command_the_oom_killer_kills_is_recorded_oom_killed",
    ) {
        return;
    }
    const LIMIT: u64 = 32 << 20;
    // A client that says `eat` gets a shell that holds what the substitution
    // reads, growing until the OOM killer ends it; any other word, a command
    // that waits for a second line and answers it.
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh(
                "read W; if [ $W = eat ]; then echo eating; x=$(yes | head -c 1G); echo survived; \
                 else echo waiting; read W; echo served $W; fi",
            ),
            "stdin = \"client\"\nmemory_max = \"32M\"",
        ),
    );
    let mut other = connect(addr);
    other.write_all(b"wait\n").unwrap();
    assert_eq!(read_line(&mut other), "waiting\n");

    let mut eater = connect(addr);
    let port = eater.local_addr().unwrap().port();
    eater.write_all(b"eat\n").unwrap();
    let (out, error) = read_until_end(&mut eater);
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), error.is_none()),
        ("eating\n", true)
    );
    let record = d.wait_record_where(|r| r.peer_port() == port);
    record.assert_ended("oom-killed", "SIGKILL");
    assert!(record.oom_kills.is_some_and(|n| n >= 1), "{record}");
    assert!(record.level == "WARN", "{record}");
    let peak = record.memory_peak.expect("memory_peak");
    eprintln!(
        "oom: memory_max {LIMIT}, memory_peak {peak}, oom_kills {:?}",
        record.oom_kills
    );
    assert!(
        (LIMIT / 10 * 9..=LIMIT).contains(&peak),
        "memory_peak {peak}, memory_max {LIMIT}: {record}"
    );

    // The other connection's command lived through it, and is served.
    assert_eq!(d.records().len(), 1, "only the eater's connection ended");
    other.write_all(b"now\n").unwrap();
    let (out, error) = read_until_end(&mut other);
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), error.is_none()),
        ("served now\n", true)
    );
    let port = other.local_addr().unwrap().port();
    let record = d.wait_record_where(|r| r.peer_port() == port);
    record.assert_ended("output-ended", "0");
    assert_eq!(record.oom_kills, Some(0), "{record}");
    // So is the daemon, and a new connection.
    let mut next = connect(addr);
    next.write_all(b"again\nlater\n").unwrap();
    let (out, _) = read_until_end(&mut next);
    assert_eq!(String::from_utf8_lossy(&out), "waiting\nserved later\n");
    d.wait_records(3);
    cgroup.wait_all_empty();
}

/// `tasks_max` stops a fork loop: the shell's fork fails once its cgroup
/// holds that many tasks (it says so on stderr and exits), `pids.peak` is
/// the limit, and the command and all it made are gone when the record is
/// written.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn tasks_max_stops_a_fork_loop() {
    require_root();
    let cgroup = TestCgroup::delegated();
    if !cgroup.offers("pids", "tasks_max_stops_a_fork_loop") {
        return;
    }
    const LIMIT: u64 = 20;
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh("echo started; while :; do sleep 30 & done"),
            &format!("tasks_max = {LIMIT}"),
        ),
    );
    // The output ends once the loop has failed and what it made is killed.
    assert_eq!(fetch_text(addr), "started\n");
    let record = d.wait_record(1);
    assert_eq!(
        cgroup.procs(),
        vec![d.pid()],
        "only the daemon is left in its subtree: {record}"
    );
    assert!(stat(record.pid).is_none(), "the command is gone: {record}");
    let peak = record.tasks_peak.expect("tasks_peak");
    eprintln!("tasks: tasks_max {LIMIT}, tasks_peak {peak}");
    assert!(
        (LIMIT - 2..=LIMIT).contains(&peak),
        "tasks_peak {peak}, tasks_max {LIMIT}: {record}"
    );
    // dash: "sh: 0: Cannot fork", and exit status 2.
    let said = d.wait_log(&["Cannot fork", "stream=\"stderr\""]);
    assert!(said.contains(" conn=1 "), "{said}");
    assert_eq!(record.exit, "2", "the loop's fork failed: {record}");
    cgroup.wait_all_empty();
}

/// `cpu_quota` bounds a command that would use a whole CPU: a busy loop
/// ended by `timeout` uses about that share of the wall time (the record's
/// CPU time over its duration), where it would use all of it unbounded.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn cpu_quota_bounds_a_busy_command() {
    require_root();
    let cgroup = TestCgroup::delegated();
    if !cgroup.offers("cpu", "cpu_quota_bounds_a_busy_command") {
        return;
    }
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh("echo started; while :; do :; done"),
            "cpu_quota = \"20%\"\ntimeout = \"3s\"",
        ),
    );
    assert_eq!(fetch_text(addr), "started\n");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "timeout", "{record}");
    let cpu = record.cpu_usec.expect("cpu_usec");
    let share = cpu as f64 / (record.duration_ms as f64 * 1000.0);
    eprintln!(
        "cpu: cpu_quota 20%: cpu_usec {cpu} over {} ms, a share of {share:.3}",
        record.duration_ms
    );
    // Throttled per 100 ms period; slack for an emulated CPU, but one
    // unbounded would be near 1.
    assert!(
        (0.10..=0.30).contains(&share),
        "a share of {share:.3} of one CPU: {record}"
    );
    cgroup.wait_all_empty();
}

/// SIGHUP and SIGTERM while commands that escaped their sessions run: the
/// reload leaves them to their connections, the stop ends them all, and no
/// cgroup is left.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn stop_and_reload_while_escapers_run_leave_nothing() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let mark = format!("sr-stop-{}", std::process::id());
    let (mut d, addr) = start_in(
        &cgroup,
        &format!(
            "shutdown_timeout = \"300ms\"\n{}",
            one_service(
                &sh(&format!(
                    "setsid sh -c 'trap : TERM; while :; do sleep 1; done' {mark} & echo started; exec sleep 3600"
                )),
                ""
            )
        ),
    );
    // The commands outlast the test (`sleep 3600`): on an emulated CPU
    // under load, a minute's sleep ended the first connection before the
    // reload, and its escaper with it.
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let mut s = connect(addr);
            assert_eq!(read_line(&mut s), "started\n");
            s
        })
        .collect();
    assert_eq!(cgroup.populated_slots().len(), 20);
    // "started" comes once the escaper is forked, maybe before its setsid.
    let escaped = poll(PATIENCE, || {
        (session_leaders_with(&mark).len() == 20).then_some(())
    });
    assert!(escaped.is_some(), "{:?}", session_leaders_with(&mark));
    d.signal(Signal::SIGHUP);
    d.wait_note("READY=1");
    assert_eq!(
        session_leaders_with(&mark).len(),
        20,
        "a reload ends nothing"
    );
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    assert_eq!(processes_with(&mark), Vec::<i32>::new());
    assert_eq!(d.records().len(), 20);
    assert_eq!(
        cgroup.slots(),
        Vec::<String>::new(),
        "the stop removes every cgroup"
    );
    for mut s in clients {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
}

/// With `transfer = "direct"` the command holds the socket itself; what it
/// starts is still contained.
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn direct_transfer_commands_are_contained_too() {
    require_root();
    let cgroup = TestCgroup::delegated();
    let mark = format!("sr-direct-{}", std::process::id());
    let (d, addr) = start_in(
        &cgroup,
        &one_service(
            &sh(&format!(
                "setsid sh -c 'while :; do sleep 1; done' {mark} & echo started"
            )),
            "transfer = \"direct\"",
        ),
    );
    let started = Instant::now();
    assert_eq!(fetch_text(addr), "started\n");
    let record = d.wait_record(1);
    assert_eq!(record.reason, "command-exited", "{record}");
    assert_eq!(processes_with(&mark), Vec::<i32>::new(), "{record}");
    assert!(started.elapsed() < Duration::from_secs(5));
    cgroup.wait_all_empty();
}

/// Named by `delegated_cgroup`, a cgroup is used whatever the daemon's own
/// (root may move itself anywhere).
#[test]
#[cfg_attr(not(as_root), ignore = "needs root: makes cgroups")]
fn delegated_cgroup_names_the_subtree_for_a_run_by_hand() {
    require_root();
    let cgroup = TestCgroup::plain();
    let config = format!(
        "delegated_cgroup = \"{}\"\n{}",
        cgroup.path.display(),
        one_service(&sh("cat /proc/self/cgroup"), "")
    );
    let (sock, addr) = pass_tcp("test");
    let d = Daemon::start(&config, vec![sock]);
    d.wait_log(&[
        "containment: a cgroup per connection in",
        "named by delegated_cgroup",
    ]);
    let leaf = cgroup.path.file_name().unwrap().to_string_lossy();
    assert!(fetch_text(addr).contains(&format!("/{leaf}/slot-1\n")));
    d.wait_record(1);
    cgroup.wait_all_empty();
}

/// With process groups, what the command wrote before it exited still
/// reaches a client that takes it late, though a process that left the
/// group holds the output open: once the group's `kill_grace` (2 s here) is
/// over, the relay abandons the output when it is drained, not before (what
/// the pipe held would be lost) and not a second `kill_grace` later.
#[test]
fn what_the_group_wrote_is_drained_before_a_held_output_is_abandoned() {
    let mark = format!("sr-drained-{}", std::process::id());
    let done = std::env::temp_dir().join(format!("{mark}-done"));
    let (passed, addr) = pass_tcp("test");
    // Socket buffers smaller than the output: the rest waits in the pipe
    // while the client pauses.
    setsockopt(&passed.fd, sockopt::SndBuf, &65536).unwrap();
    let config = format!(
        "[[service]]\nname = \"test\"\ncommand = {}\nkill_grace = \"2s\"\n\
         containment = \"process-group\"\ntransfer = \"copy\"\npipe_size = 1048576\n",
        sh(&format!(
            "setsid sh -c ': > /tmp/$0; sleep 20' {mark} & \
             while [ ! -e /tmp/{mark} ]; do sleep 0.01; done; rm /tmp/{mark}; \
             head -c 800000 /dev/zero; : > {}",
            done.display()
        ))
    );
    let d = Daemon::start(&config, vec![passed]);
    let s = TcpStream::connect(addr).unwrap();
    setsockopt(&s, sockopt::RcvBuf, &65536).unwrap();
    // The command has written all and exited; the client pauses past the
    // group's kill_grace, then takes it all.
    poll(PATIENCE, || done.exists().then_some(())).expect("the command ran");
    std::thread::sleep(Duration::from_millis(2500));
    let (mut got, mut buf) = (0, vec![0u8; 65536]);
    let mut drained = None;
    loop {
        let n = read_some(&s, &mut buf);
        if n == 0 {
            break;
        }
        got += n;
        if got == 800_000 {
            drained = Some(Instant::now());
        }
    }
    let after_drained = drained.map(|t| t.elapsed());
    // Closed at once: the daemon waits for that (kill_grace at most).
    drop(s);
    let record = d.wait_record(1);
    let _ = std::fs::remove_file(&done);
    for pid in processes_with(&mark) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    assert_eq!((got, record.bytes), (800_000, 800_000), "{record}");
    // Abandoned once drained, not at a second kill_grace (1.5 s later).
    assert!(
        after_drained.is_some_and(|t| t < Duration::from_secs(1)),
        "the end came {after_drained:?} after the last byte: {record}"
    );
}

/// With process groups, a process that leaves the group cannot be ended; it
/// no longer keeps the connection (and its place) open: the relay stops
/// waiting for output once the rest of the group is gone, and says so.
#[test]
fn a_process_that_left_its_group_does_not_hold_the_connection() {
    let mark = format!("sr-held-{}", std::process::id());
    let (passed, addr) = pass_tcp("test");
    let config = format!(
        "[[service]]\nname = \"test\"\ncommand = {}\nkill_grace = \"2s\"\n\
         stdin = \"client\"\ncontainment = \"process-group\"\n",
        sh(&format!(
            "setsid sh -c ': > /tmp/$0; sleep 20' {mark} & \
             while [ ! -e /tmp/{mark} ]; do sleep 0.01; done; rm /tmp/{mark}; echo started"
        ))
    );
    let d = Daemon::start(&config, vec![passed]);
    let connected = Instant::now();
    let mut s = connect(addr);
    assert_eq!(read_line(&mut s), "started\n");
    // The command exits once it has said so: from then on, the wait.
    let said = Instant::now();
    let (out, error) = read_until_end(&mut s);
    let took = (connected.elapsed(), said.elapsed());
    let record = d.wait_record(1);
    let escaped = processes_with(&mark);
    for pid in &escaped {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
    }
    assert_eq!((out.as_slice(), error.is_none()), (&b""[..], true));
    // kill_grace (2 s) for what the group still writes; then, the pipe
    // drained, no more (not a second kill_grace). Timed from the connection
    // at least, from the command's last line at most: an emulated CPU (as in
    // tests/cgroups/run.sh's VM) takes a second or more to start it.
    assert!(
        took.0 >= Duration::from_secs(2) && took.1 < Duration::from_millis(3600),
        "the client waited {:?} from the connection, {:?} from \"started\"",
        took.0,
        took.1
    );
    assert_eq!(record.reason, "command-exited", "{record}");
    assert!(
        record
            .message
            .contains("held open by a process that left its process group"),
        "{record}"
    );
    assert_eq!(
        escaped.len(),
        1,
        "the escaper was out of reach, as documented"
    );
}
