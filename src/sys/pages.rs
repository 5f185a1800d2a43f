//! A buffer of pages mapped for it alone: the relay's bulk buffer. Freed,
//! its memory goes back to the system at once; a freed block of the heap
//! may stay with the process (the allocator keeps it for later), so that
//! buffers freed by stalled connections would still count against the
//! daemon's memory.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// `len` bytes of anonymous private memory, zero until written, unmapped
/// when dropped.
pub struct Pages {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Pages` owns its mapping alone (nothing else has its address),
// like a `Box<[u8]>`; it can move to another thread and be shared as `&[u8]`.
unsafe impl Send for Pages {}
// SAFETY: as for Send: shared access is through `&[u8]` only.
unsafe impl Sync for Pages {}

impl Pages {
    /// A new mapping of `len` bytes (more than 0).
    pub fn new(len: usize) -> io::Result<Pages> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: an anonymous private mapping at an address the kernel
        // picks touches no existing memory; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Pages { ptr, len })
    }
}

impl Deref for Pages {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes (zero-filled when
        // made) for as long as `self` lives; `&self` allows no writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Pages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: this is the mapping `new` made, with its length; no
        // reference to it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_zero_writable_and_their_own() {
        let mut a = Pages::new(100_000).unwrap();
        assert_eq!(a.len(), 100_000);
        assert!(a.iter().all(|&b| b == 0));
        a[99_999] = 7;
        let b = Pages::new(4096).unwrap();
        assert_eq!((a[99_999], b[0]), (7, 0));
        assert!(Pages::new(0).is_err());
    }
}
