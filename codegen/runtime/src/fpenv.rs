//! The floating-point environment of a training step: denormals flushed to zero.
//!
//! Optimizer state of a parameter whose gradient is zero (a dead ReLU unit)
//! decays geometrically into subnormal floats, and x86 arithmetic on subnormals
//! is tens of times slower: an Adam step slowed fourfold after ~700 steps
//! before this. So steps run with FTZ (results that would be subnormal become 0)
//! and DAZ (subnormal inputs read as 0), as XLA does on CPUs and GPUs do by
//! default. The calling (Python) thread gets its previous mode back when the step
//! ends; the pool's worker threads keep the mode for their lifetime.

/// MXCSR bits: flush-to-zero (15) and denormals-are-zero (6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

#[cfg(target_arch = "x86_64")]
fn read_csr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: stmxcsr stores the 4-byte MXCSR register at a valid, aligned address.
    unsafe { core::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack)) };
    csr
}

#[cfg(target_arch = "x86_64")]
fn write_csr(csr: u32) {
    // SAFETY: ldmxcsr loads MXCSR from a valid address; only mode bits change.
    unsafe { core::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly)) };
}

/// Flush denormals on this thread until the guard is dropped (then restore).
#[must_use = "the mode is restored when the guard is dropped"]
pub struct FlushDenormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushDenormals {
    /// Switch this thread to FTZ + DAZ.
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_csr();
            write_csr(saved | FTZ_DAZ);
            FlushDenormals { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushDenormals {}
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        write_csr(self.saved);
    }
}

/// Put this thread in FTZ + DAZ for good (for the pool's worker threads).
pub fn flush_denormals_forever() {
    std::mem::forget(FlushDenormals::new());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denormals_flush_inside_the_guard_only() {
        let tiny = std::hint::black_box(f32::MIN_POSITIVE);
        let half = std::hint::black_box(0.5f32);
        assert!(
            tiny * half > 0.0,
            "subnormal results exist outside the guard"
        );
        {
            let _guard = FlushDenormals::new();
            if cfg!(target_arch = "x86_64") {
                assert_eq!(std::hint::black_box(tiny) * half, 0.0);
            }
        }
        assert!(
            std::hint::black_box(tiny) * half > 0.0,
            "the mode is restored"
        );
    }
}
