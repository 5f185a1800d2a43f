//! The copy loop: read(2) and write(2) through a buffer sized to the flow.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;

use super::{Budget, Failed, Pumped, Side};
use crate::fdio;

/// read(2)/write(2), for `Mode::Copy` and for pairs splice refuses.
/// Readiness is unambiguous here: each call touches one side.
///
/// Two speeds. A trickle (lines) is read into a small buffer on the stack
/// of a plain function and written at once: per line one read, one write,
/// and no buffer held while the connection waits (a thousand idle streams
/// hold none). A read that fills it switches to a buffer on the heap that
/// grows while reads keep filling it, up to `COPY_MAX`, so bulk moves in few
/// large calls. It is kept while the source pauses between bursts (bulk
/// output outruns its producer now and then) and freed when a read brings
/// no more than a trickle again.
pub(super) async fn copy_loop(
    src: &AsyncFd<OwnedFd>,
    dst: &AsyncFd<OwnedFd>,
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<Pumped, Failed> {
    let (reading, writing) = (Failed::at(Side::Source), Failed::at(Side::Destination));
    let mut bulk: Option<Vec<u8>> = None;
    loop {
        if budget.left == 0 {
            return Ok(Pumped::Limit);
        }
        let mut ready = src.readable().await.map_err(|e| reading(fdio::errno(&e)))?;
        let Some(buf) = bulk.as_mut() else {
            let ask = budget.ask(COPY_SMALL);
            match copy_small(src.get_ref(), dst.get_ref(), ask)? {
                Small::EndOfFile => return Ok(Pumped::EndOfFile),
                Small::Dry => ready.clear_ready(),
                Small::Copied { read, rest, failed } => {
                    budget.read(read);
                    budget.spend(read - rest.len());
                    if let Some(errno) = failed {
                        return Err(writing(errno));
                    }
                    write_all(dst, &rest, budget).await.map_err(&writing)?;
                    if read == ask && ask == COPY_SMALL {
                        bulk = Some(vec![0u8; COPY_BULK]);
                    } else {
                        // A short read: the source is dry for now. (A newer
                        // readiness event survives the clear: tokio checks.)
                        ready.clear_ready();
                    }
                }
            }
            continue;
        };
        let want = budget.ask(buf.len());
        let read = ready.try_io(|fd| loop {
            match fdio::read(fd.get_ref(), &mut buf[..want]) {
                Err(Errno::EINTR) => continue,
                other => break other.map_err(std::io::Error::from),
            }
        });
        let n = match read {
            Ok(Ok(0)) => return Ok(Pumped::EndOfFile),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(reading(fdio::errno(&e))),
            // Dry (try_io cleared the readiness): wait, buffer kept.
            Err(_would_block) => continue,
        };
        budget.read(n);
        write_all(dst, &buf[..n], budget).await.map_err(&writing)?;
        if n == buf.len() && buf.len() < COPY_MAX {
            buf.resize(buf.len() * 4, 0);
        } else if n < want {
            ready.clear_ready();
            if n < COPY_SMALL {
                bulk = None;
            }
        }
    }
}

/// The stack buffer of a trickle.
const COPY_SMALL: usize = 16 * 1024;
/// The heap buffer's first size, and its largest.
const COPY_BULK: usize = 64 * 1024;
const COPY_MAX: usize = 1 << 20;

enum Small {
    EndOfFile,
    /// Nothing to read (EAGAIN).
    Dry,
    /// `read` bytes were read; `rest` of them could not be written yet,
    /// or at all (`failed`: the destination's error, once they are counted).
    Copied {
        read: usize,
        rest: Vec<u8>,
        failed: Option<Errno>,
    },
}

/// One read into a buffer on the stack of a plain function (not of the
/// future, which every idle connection would carry), written at once.
fn copy_small(src: &OwnedFd, dst: &OwnedFd, ask: usize) -> Result<Small, Failed> {
    let mut buf = [0u8; COPY_SMALL];
    let read = loop {
        match fdio::read(src, &mut buf[..ask]) {
            Ok(0) => return Ok(Small::EndOfFile),
            Ok(n) => break n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(Small::Dry),
            Err(e) => return Err(Failed::at(Side::Source)(e)),
        }
    };
    let (mut written, mut failed) = (0, None);
    while written < read {
        match nix::unistd::write(dst, &buf[written..read]) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    Ok(Small::Copied {
        read,
        rest: buf[written..read].to_vec(),
        failed,
    })
}

/// Writes all of `bytes` to `dst` as it takes them, counting each write.
async fn write_all(
    dst: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    budget: &mut Budget<impl FnMut(usize)>,
) -> Result<(), Errno> {
    fdio::write_all(dst, bytes, |n| budget.spend(n)).await
}
