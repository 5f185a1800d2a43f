//! The resources a service sets for each connection's cgroup: the files and
//! values written there, and the controllers they need.

/// A service's limits for each connection's cgroup, as systemd names them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// `memory.max`, bytes (None: no limit).
    pub memory_max: Option<u64>,
    /// `memory.high`, bytes.
    pub memory_high: Option<u64>,
    /// `cpu.max`: hundredths of a percent of one CPU (`CPUQuota=`, read as
    /// systemd reads it: `"20%"` is 2000, `"12.5%"` 1250).
    pub cpu_quota: Option<u32>,
    /// `cpu.weight`, 1–10000.
    pub cpu_weight: Option<u32>,
    /// `pids.max`.
    pub tasks_max: Option<u64>,
    /// `io.weight`, 1–10000.
    pub io_weight: Option<u32>,
}

/// The period `cpu_quota` is measured over (systemd's default CPUQuotaPeriodSec=).
const CPU_PERIOD_USEC: u64 = 100_000;

impl Resources {
    /// The files to write, with their contents, and the controller each needs.
    pub fn files(&self) -> Vec<(&'static str, &'static str, String)> {
        let mut out = Vec::new();
        if let Some(v) = self.memory_max {
            out.push(("memory", "memory.max", v.to_string()));
        }
        if let Some(v) = self.memory_high {
            out.push(("memory", "memory.high", v.to_string()));
        }
        if let Some(hundredths) = self.cpu_quota {
            // As systemd: at least 1 ms per period.
            let quota = (u64::from(hundredths) * CPU_PERIOD_USEC / 10_000).max(1000);
            out.push(("cpu", "cpu.max", format!("{quota} {CPU_PERIOD_USEC}")));
        }
        if let Some(v) = self.cpu_weight {
            out.push(("cpu", "cpu.weight", v.to_string()));
        }
        if let Some(v) = self.tasks_max {
            out.push(("pids", "pids.max", v.to_string()));
        }
        if let Some(v) = self.io_weight {
            out.push(("io", "io.weight", format!("default {v}")));
        }
        out
    }

    /// The controllers these limits need.
    pub fn controllers(&self) -> Vec<&'static str> {
        let mut c: Vec<_> = self.files().into_iter().map(|(c, _, _)| c).collect();
        c.dedup();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_as_systemd_writes_them() {
        let limits = Resources {
            memory_max: Some(512 << 20),
            memory_high: None,
            cpu_quota: Some(5000),
            cpu_weight: Some(200),
            tasks_max: Some(32),
            io_weight: Some(10),
        };
        assert_eq!(
            limits.files(),
            vec![
                ("memory", "memory.max", "536870912".into()),
                ("cpu", "cpu.max", "50000 100000".into()),
                ("cpu", "cpu.weight", "200".into()),
                ("pids", "pids.max", "32".into()),
                ("io", "io.weight", "default 10".into()),
            ]
        );
        assert_eq!(limits.controllers(), vec!["memory", "cpu", "pids", "io"]);
        let quota = |hundredths| {
            Resources {
                cpu_quota: Some(hundredths),
                ..Resources::default()
            }
            .files()[0]
                .2
                .clone()
        };
        assert_eq!(quota(1250), "12500 100000", "12.5%");
        assert_eq!(quota(20_000), "200000 100000", "two CPUs");
        assert_eq!(quota(1), "1000 100000", "at least 1 ms, as systemd");
    }
}
