//! Ids that arrive in device memory (class labels, embedding ids from CuPy or
//! PyTorch): copied into their input arena by the module's
//! `fg_copy_ids_checked` instead of a plain copy. The kernel writes the
//! input's tag into a flag in pinned host memory mapped into the device when
//! an id lies outside `[0, bound)`; the step reads the flag after the wait it
//! ends with, so a check costs no launch and no copy of its own.
//!
//! Host inputs never get here: their ids are checked before anything runs.
//! Gathers and scatters guard their own reads (`flags_u32`), but a label
//! compared against an arange (a one-hot) has no read to guard, and would
//! give a wrong loss without a sign.

use super::device::Device;
use super::inputs::KernelLaunch;
use super::mapped::MappedWords;
use super::module::{Function, Module};
use crate::error::Error;

/// The kernel's name in every module whose inputs include ids.
pub(crate) const COPY_IDS: &str = "fg_copy_ids_checked";

/// Threads per block of the copy, and the most blocks (a grid-stride loop
/// covers the rest).
const BLOCK: u32 = 256;
const MAX_BLOCKS: u32 = 4096;

/// The checked copy of an executor whose inputs include ids.
pub(crate) struct IdsCheck {
    function: Function,
    flag: MappedWords,
    flag_ptr: u64,
}

// SAFETY: a kernel handle of the executor's module (used with its context
// bound) and the flag (see `MappedWords`).
unsafe impl Send for IdsCheck {}
unsafe impl Sync for IdsCheck {}

impl IdsCheck {
    /// `fg_copy_ids_checked` of `module` and a cleared flag.
    ///
    /// # Errors
    /// [`Error::Device`] when the module lacks the kernel (a ferrograd bug) or
    /// pinned memory cannot be had.
    pub(crate) fn new(module: &Module, device: &Device) -> Result<IdsCheck, Error> {
        let flag = MappedWords::new(device, 1, "the device-input id flag")?;
        Ok(IdsCheck {
            function: module.function(COPY_IDS)?,
            flag_ptr: flag.device_ptr(0, "the device-input id flag")?,
            flag,
        })
    }

    /// Forgets what an earlier call flagged (start of a call).
    pub(crate) fn clear(&self) {
        self.flag.write(0, 0);
    }

    /// The tag of an input that had an id out of range since [`IdsCheck::clear`]
    /// (0 for none), once the work that copied it has been waited for.
    pub(crate) fn flagged(&self) -> u32 {
        self.flag.read(0)
    }

    /// The launch of `dst[..len] = src[..len]` (i32 ids, device addresses),
    /// flagging `tag` (≥ 1) when one lies outside `[0, bound)`; queued as it
    /// is, or captured as a graph's input node.
    pub(crate) fn launch(
        &self,
        (src, dst, len): (u64, u64, usize),
        bound: u32,
        tag: u32,
        what: &str,
    ) -> Result<KernelLaunch, Error> {
        let n = u32::try_from(len)
            .map_err(|_| Error::layout(format!("{what}: {len} ids do not fit a u32 count")))?;
        // The kernel reads .u32 parameters from the first 4 bytes (little-endian).
        Ok(KernelLaunch {
            function: self.function.raw,
            blocks: n.div_ceil(BLOCK).clamp(1, MAX_BLOCKS),
            threads: BLOCK,
            slots: [
                src,
                dst,
                u64::from(n),
                u64::from(bound),
                self.flag_ptr,
                u64::from(tag),
            ],
        })
    }
}
