//! A module of device code: PTX text compiled by the driver's JIT when it is
//! loaded, and its kernels.

use std::ffi::{c_uint, c_void, CString};
use std::mem::MaybeUninit;

use cudarc::driver::result;
use cudarc::driver::sys;

use super::device::{check, describe, Device};
use crate::error::Error;

/// Bytes of each JIT log buffer (error and info).
const LOG_BYTES: usize = 1 << 16;

/// A loaded module. Its kernels ([`Function`]) are valid while it lives.
pub struct Module {
    raw: sys::CUmodule,
    info_log: String,
    device: Device,
}

// SAFETY: a CUmodule may be used from any thread with its context current,
// which every user binds first.
unsafe impl Send for Module {}

/// A kernel of a [`Module`].
#[derive(Debug, Clone, Copy)]
pub struct Function {
    pub(crate) raw: sys::CUfunction,
}

fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

impl Module {
    /// Compiles `ptx` for `device` (the driver's JIT, at this call) and loads it.
    ///
    /// # Errors
    /// [`Error::Device`] with the JIT's error log (ptxas's messages, with line
    /// numbers) when the PTX does not compile for this GPU or driver.
    pub fn load_ptx(device: &Device, ptx: &str) -> Result<Module, Error> {
        device.bind()?;
        let source =
            CString::new(ptx).map_err(|_| Error::layout("the module's PTX contains a NUL byte"))?;
        let mut error_log = vec![0u8; LOG_BYTES];
        let mut info_log = vec![0u8; LOG_BYTES];
        use sys::CUjit_option::{
            CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES, CU_JIT_INFO_LOG_BUFFER,
            CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        };
        let mut options = [
            CU_JIT_ERROR_LOG_BUFFER,
            CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
            CU_JIT_INFO_LOG_BUFFER,
            CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
        ];
        // Sizes travel as pointer-sized integers in the value array.
        let mut values: [*mut c_void; 4] = [
            error_log.as_mut_ptr().cast(),
            std::ptr::without_provenance_mut(LOG_BYTES),
            info_log.as_mut_ptr().cast(),
            std::ptr::without_provenance_mut(LOG_BYTES),
        ];
        let mut raw = MaybeUninit::uninit();
        // SAFETY: `source` is NUL-terminated PTX; the option arrays have 4
        // entries and the log buffers the sizes given, and all outlive the call.
        let status = unsafe {
            sys::cuModuleLoadDataEx(
                raw.as_mut_ptr(),
                source.as_ptr().cast(),
                options.len() as c_uint,
                options.as_mut_ptr(),
                values.as_mut_ptr(),
            )
        };
        if let Err(e) = status.result() {
            let log = log_text(&error_log);
            return Err(Error::Device(format!(
                "the CUDA driver could not compile the module's PTX for {} (sm_{}{}): {}{}{}",
                device.name(),
                device.compute_capability().0,
                device.compute_capability().1,
                describe(e),
                if log.is_empty() { "" } else { "\nJIT log:\n" },
                log
            )));
        }
        Ok(Module {
            // SAFETY: written by the successful call.
            raw: unsafe { raw.assume_init() },
            info_log: log_text(&info_log),
            device: device.clone(),
        })
    }

    /// The kernel named `name` (its `.entry`).
    ///
    /// # Errors
    /// [`Error::Device`] naming the kernel when the module has no such entry.
    pub fn function(&self, name: &str) -> Result<Function, Error> {
        self.device.bind()?;
        let c_name =
            CString::new(name).map_err(|_| Error::layout(format!("kernel name {name:?}")))?;
        // SAFETY: the module is loaded.
        let raw = check(
            unsafe { result::module::get_function(self.raw, c_name) },
            || format!("the module has no kernel `{name}`"),
        )?;
        Ok(Function { raw })
    }

    /// The JIT's info log (empty unless the driver had something to say).
    pub fn info_log(&self) -> &str {
        &self.info_log
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded once, unloaded once; errors are ignored (see Device).
        unsafe {
            let _ = self.device.bind();
            let _ = result::module::unload(self.raw);
        }
    }
}
