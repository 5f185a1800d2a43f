//! The two calls of the kernel's TLS (kTLS) that nix does not wrap: whether
//! a socket has it (so its end can carry a close_notify), and sending a
//! record that is not data (an alert). The rest (the ULP, the keys, reading
//! a record's type) goes through nix.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The record type of an alert.
const ALERT: u8 = 21;

/// Whether any socket has been handed to the kernel's TLS: until one has,
/// no socket is one, and the end of a connection costs no system call to
/// find out.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// Notes that a socket was handed to the kernel's TLS.
pub fn ktls_in_use() {
    IN_USE.store(true, Ordering::Relaxed);
}

/// Whether the socket's writes go through the kernel's TLS (its TLS_TX is set).
pub fn is_ktls(fd: BorrowedFd<'_>) -> bool {
    if !IN_USE.load(Ordering::Relaxed) {
        return false;
    }
    // Large enough for any of the crypto_info structs (56 bytes at most).
    let mut info = [0u8; 64];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to `info`, which has
    // that many, and stores the length it wrote in `len`; `fd` is open for
    // the call (it is borrowed).
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            libc::TLS_TX,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    ret == 0
}

/// Sends an alert record (`level`, `description`) on a kTLS socket: the
/// kernel encrypts it as it encrypts data, as a record of its own.
pub fn send_alert(fd: BorrowedFd<'_>, level: u8, description: u8) -> io::Result<()> {
    let mut payload = [level, description];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // A control message carrying one byte: the record's type.
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths);
    // the fields set below point at `iov` and `control`, which outlive the
    // sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg.msg_control` points at `space` bytes, enough for one
    // header and one byte of data (CMSG_SPACE(1)), so CMSG_FIRSTHDR returns
    // a header inside it and CMSG_DATA a byte inside it too.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = ALERT;
    }
    // SAFETY: `msg` points at a valid iovec and control buffer (above), and
    // `fd` is open for the call.
    let sent = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
