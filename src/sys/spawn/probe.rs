//! What this process learnt the kernel and its seccomp filter allow, once for
//! every spawn: clone3 into a cgroup, a shared descriptor table.

use std::io;

/// Whether clone3 with `CLONE_INTO_CGROUP` may be tried: not after it was
/// refused once (ENOSYS: systemd's `RestrictNamespaces=` filter refuses
/// clone3 whole, since seccomp cannot see its flags; EINVAL or E2BIG: a
/// kernel before 5.7).
pub(super) static CLONE3_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(
        // Only x86_64 has the trampoline (see `clone`); elsewhere the child joins.
        !cfg!(target_arch = "x86_64"),
    );

/// Asks the kernel whether clone3 is allowed here, without starting
/// anything: an argument of size 0 is refused with EINVAL by the kernel, and
/// with ENOSYS by a seccomp filter (or a kernel before 5.3).
pub fn probe_clone3() {
    // SAFETY: a null pointer with size 0: the kernel reads nothing.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    if ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        CLONE3_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How the spawns of this process put commands into their cgroups.
pub fn cgroup_spawn_method() -> &'static str {
    if CLONE3_REFUSED.load(std::sync::atomic::Ordering::Relaxed) {
        "the child joins its cgroup before exec (clone3 is not allowed here)"
    } else {
        "clone3 with CLONE_INTO_CGROUP"
    }
}

/// Whether the child may share the descriptor table: not once a kernel
/// refused close_range's CLOSE_RANGE_UNSHARE (before 5.9).
pub(super) static SHARE_FILES_REFUSED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
