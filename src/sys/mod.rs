//! The only `unsafe` code of the daemon: the few system calls that need it,
//! behind safe functions. Everything else goes through `nix` or `std`. Each
//! block says why it is sound, in a `// SAFETY:` comment.
//!
//! - `fd`: inherited and accepted descriptors, the event loop's
//!   registrations, TCP_INFO, what a pipe or socket holds, and process-wide
//!   descriptor hygiene.
//! - `ktls`: whether a socket has the kernel's TLS, and sending an alert on it.
//! - `nice`: a thread's nice value.
//! - `pages`: a buffer mapped for itself, whose memory is the system's again
//!   once it is freed.
//! - `spawn`: the clone that starts a command, and its child until exec.
#![allow(unsafe_code)]

mod fd;
mod ktls;
mod nice;
mod pages;
mod spawn;

pub use fd::{
    accept, adopt_inherited_fd, cloexec_from_3, default_sigchld, getxattr, readable_bytes,
    register, send_room, tcp_bytes, tcp_quiet, wait,
};
pub use ktls::{is_ktls, ktls_in_use, send_alert};
pub use nice::set_thread_nice;
pub use pages::Pages;
pub use spawn::{
    cgroup_spawn_method, commands_get_nofile, probe_clone3, spawn, Exec, Place, Slots, Stage,
};
