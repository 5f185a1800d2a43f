//! How single values are read: durations, sizes and CPU quotas as systemd
//! writes them; a command named without a path, looked up in PATH.

use std::time::Duration;

use super::*;
use crate::config::values::{parse_size, CpuQuota};

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("5 parsecs").is_err());
    assert!(parse_duration("s").is_err());
    assert_eq!(
        parse_duration("5 parsecs").unwrap_err(),
        r#""5 parsecs": unknown unit; use ms, s, m or h"#
    );
}

#[test]
fn sizes_are_read_as_systemd_reads_them() {
    assert_eq!(parse_size("512M"), Ok(Some(512 << 20)));
    assert_eq!(parse_size("1.5G"), Ok(Some(1_610_612_736)));
    assert_eq!(parse_size("4096"), Ok(Some(4096)));
    assert_eq!(parse_size("infinity"), Ok(None));
    let half = parse_size("50%").unwrap().unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as u64;
    assert_eq!(half % page, 0, "a percentage is rounded to pages");
    assert!(parse_size("0").is_err() && parse_size("101%").is_err() && parse_size("5X").is_err());
}

/// A quota is kept in hundredths of a percent, and written to `cpu.max`
/// per 100 ms period as systemd writes `CPUQuota=`.
#[test]
fn cpu_quotas_are_written_as_systemd_writes_them() {
    use serde::de::value::{Error, StrDeserializer};
    use serde::Deserialize;
    let cpu_max = |text: &str| {
        let quota = CpuQuota::deserialize(StrDeserializer::<Error>::new(text)).unwrap();
        let limits = crate::cgroup::Resources {
            cpu_quota: Some(quota.0),
            ..Default::default()
        };
        limits.files()[0].2.clone()
    };
    assert_eq!(cpu_max("20%"), "20000 100000");
    assert_eq!(cpu_max("12.5%"), "12500 100000");
    assert_eq!(cpu_max("150%"), "150000 100000");
    assert_eq!(cpu_max("0.1%"), "1000 100000", "at least 1 ms");
}

#[test]
fn bare_command_names_are_resolved_in_path() {
    let c = load_str("t", "[[service]]\nname = \"a\"\ncommand = [\"true\"]\n").unwrap();
    assert!(c.services[0].program.is_absolute());
    assert_eq!(c.services[0].argv[0], "true");
}
