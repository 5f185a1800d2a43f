//! Sets `cfg(as_root)` when the build runs as root, so the integration tests
//! that need root run there and show as ignored, with the reason, elsewhere
//! (tests/common/mod.rs, `require_root`).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(as_root)");
    // Who builds is no input cargo tracks; these change with the user.
    for var in ["USER", "HOME", "SUDO_UID"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if effective_uid() == Some(0) {
        println!("cargo::rustc-cfg=as_root");
    }
}

/// The effective uid, from /proc/self/status ("Uid:\treal\teffective\t…"),
/// which needs no dependency.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
