//! The command's stderr, logged line by line with the connection's fields
//! (`CONN`, `SERVICE`, `PID`, `STREAM=stderr`), by a task of its own, so a
//! command that writes a lot to stderr never blocks on it.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::Tag;
use crate::fdio;

/// Longest stderr line logged as one record; longer lines are split.
const MAX_LINE: usize = 4096;

/// The command's stderr, logged line by line with the connection's fields,
/// by a task of its own until end-of-file or until told to finish.
pub struct StderrLog {
    finish: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl StderrLog {
    pub fn start(fd: AsyncFd<OwnedFd>, tag: Tag, pid: i32) -> StderrLog {
        let (finish, finished) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut lines = Lines {
                pending: Vec::new(),
                tag,
                pid,
            };
            let told = tokio::select! {
                () = lines.until_end(&fd) => false,
                _ = finished => true,
            };
            if told {
                lines.what_is_written(&fd);
            }
            lines.rest();
        });
        StderrLog { finish, task }
    }

    /// Logs what is already written and waits until the last line is out.
    /// Bounded: a process outside the command's group may still be writing.
    pub async fn finish(self) {
        let _ = self.finish.send(());
        let _ = self.task.await;
    }
}

struct Lines {
    pending: Vec<u8>,
    tag: Tag,
    pid: i32,
}

impl Lines {
    /// Logs lines until the command (and everything sharing its stderr) closes it.
    async fn until_end(&mut self, fd: &AsyncFd<OwnedFd>) {
        loop {
            match fdio::read_with(fd, |fd| self.read_once(fd)).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Logs what is already written, without waiting for more (at most 64 KiB).
    fn what_is_written(&mut self, fd: &AsyncFd<OwnedFd>) {
        for _ in 0..16 {
            if self.read_once(fd.get_ref()) != Ok(true) {
                break;
            }
        }
    }

    /// Reads once and logs each complete line (or each `MAX_LINE` bytes of
    /// an overlong one); `Ok(false)` at end-of-file.
    fn read_once(&mut self, fd: &OwnedFd) -> Result<bool, Errno> {
        let mut buf = [0u8; 4096];
        let n = loop {
            match nix::unistd::read(fd, &mut buf) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        if n == 0 {
            return Ok(false);
        }
        self.pending.extend_from_slice(&buf[..n]);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..line.len() - 1]);
        }
        while self.pending.len() >= MAX_LINE {
            let line: Vec<u8> = self.pending.drain(..MAX_LINE).collect();
            self.emit(&line);
        }
        Ok(true)
    }

    fn rest(&mut self) {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.emit(&rest);
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        tracing::info!(
            conn = self.tag.conn,
            service = &*self.tag.service,
            pid = self.pid,
            stream = "stderr",
            "{}",
            text.trim_end_matches('\r')
        );
    }
}
