//! Words of pinned host memory mapped into the device: kernels write them
//! directly (error flags), or a step's scalar result is copied into them
//! asynchronously; the host reads them after the wait a call ends with. No
//! memset launch before a step and no blocking copy after it.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::device::{check, Device};
use crate::error::Error;

/// `len` u32 words of pinned host memory, zeroed, with their device address.
pub(crate) struct MappedWords {
    host: *mut u32,
    device_ptr: u64,
    len: usize,
    device: Device,
}

// SAFETY: the host pointer is pinned memory the value owns. The device writes
// it only during a call, and the host reads or writes it only between calls
// (after their wait), which need `&mut Executor`.
unsafe impl Send for MappedWords {}
unsafe impl Sync for MappedWords {}

impl MappedWords {
    /// `len` ≥ 1 zeroed words; `what` names them in errors.
    pub(crate) fn new(device: &Device, len: usize, what: &str) -> Result<MappedWords, Error> {
        device.bind()?;
        let len = len.max(1);
        let mut host: *mut c_void = std::ptr::null_mut();
        // SAFETY: allocates `4·len` bytes of pinned memory, mapped for the device.
        let status =
            unsafe { sys::cuMemHostAlloc(&mut host, 4 * len, sys::CU_MEMHOSTALLOC_DEVICEMAP) };
        check(status.result(), || {
            format!("allocating {what} in pinned memory")
        })?;
        // Owned from here: freed on drop if mapping fails.
        let mut words = MappedWords {
            host: host.cast(),
            device_ptr: 0,
            len,
            device: device.clone(),
        };
        (0..len).for_each(|i| words.write(i, 0));
        // SAFETY: `host` came from cuMemHostAlloc with DEVICEMAP.
        let status = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut words.device_ptr, host, 0) };
        check(status.result(), || {
            format!("mapping {what} into the device")
        })?;
        Ok(words)
    }

    /// The device address of word `i` (checked against the length).
    pub(crate) fn device_ptr(&self, i: usize, what: &str) -> Result<u64, Error> {
        if i >= self.len {
            return Err(Error::layout(format!(
                "{what}: word {i} of {} mapped words",
                self.len
            )));
        }
        Ok(self.device_ptr + 4 * i as u64)
    }

    /// The host address of word 0 (a pinned destination for async copies).
    pub(crate) fn host_ptr(&self) -> *mut c_void {
        self.host.cast()
    }

    /// Word `i` (`i < len`), as the last write left it: call once the work
    /// that writes it has been waited for.
    pub(crate) fn read(&self, i: usize) -> u32 {
        assert!(i < self.len);
        // SAFETY: inside our allocation; nothing writes it concurrently (see Send).
        unsafe { std::ptr::read_volatile(self.host.add(i)) }
    }

    /// Sets word `i` (`i < len`) from the host, between calls.
    pub(crate) fn write(&self, i: usize, value: u32) {
        assert!(i < self.len);
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.host.add(i), value) }
    }
}

impl Drop for MappedWords {
    fn drop(&mut self) {
        // SAFETY: allocated once by cuMemHostAlloc, freed once.
        unsafe {
            let _ = self.device.bind();
            let _ = sys::cuMemFreeHost(self.host.cast());
        }
    }
}
