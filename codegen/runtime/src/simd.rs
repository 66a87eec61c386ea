//! The x86-64 instruction-set level a module's own code is compiled for.
//!
//! ferrograd builds a model's crate for the best level the building machine
//! supports, up to x86-64-v3 (AVX2 + FMA), so its elementwise and reduction
//! loops run 8 floats per instruction instead of SSE2's 4. The dependencies
//! (this runtime included) stay at the baseline; the GEMM crate picks its own
//! kernels at run time. A module copied to an older CPU would die on an illegal
//! instruction, so its init calls [`require`] first and fails with an
//! `ImportError` instead; the Python side checks the same before loading.

use pyo3::exceptions::PyImportError;
use pyo3::PyErr;

/// An instruction-set level a module can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// x86-64 as every 64-bit CPU has it (SSE2); also every other architecture.
    Baseline,
    /// x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE (Haswell, Zen 1 and later).
    V3,
    /// x86-64-v4: v3 and AVX-512 F/BW/CD/DQ/VL (Skylake-SP, Zen 4 and later).
    V4,
}

impl Level {
    /// The name ferrograd uses for it (`FERROGRAD_CPU_LEVEL`).
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::V3 => "v3",
            Level::V4 => "v4",
        }
    }
}

/// Whether this CPU has every feature of `level`.
pub fn supported(level: Level) -> bool {
    match level {
        Level::Baseline => true,
        Level::V4 => {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                supported(Level::V3)
                    && has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512cd")
                    && has!("avx512dq")
                    && has!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        }
        Level::V3 => {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                has!("avx2")
                    && has!("fma")
                    && has!("bmi1")
                    && has!("bmi2")
                    && has!("f16c")
                    && has!("movbe")
                    && has!("lzcnt")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        }
    }
}

/// `Ok` when this CPU can run code compiled for `level`; otherwise the
/// `ImportError` a module's init returns, naming the level and the fix.
pub fn require(level: Level, module: &str) -> Result<(), PyErr> {
    if supported(level) {
        return Ok(());
    }
    Err(PyImportError::new_err(format!(
        "{module} was built for x86-64-{} and this CPU lacks some of its features \
         (AVX2, FMA, BMI, F16C); rebuild it on this machine, or build it with \
         FERROGRAD_CPU_LEVEL=baseline to run on any x86-64",
        level.name()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_runs_everywhere() {
        assert!(supported(Level::Baseline));
        assert!(require(Level::Baseline, "m").is_ok());
        assert!(Level::Baseline < Level::V3);
        assert_eq!(Level::V3.name(), "v3");
    }
}
