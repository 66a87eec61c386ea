//! Scalar functions the generated kernels call that `std` lacks.

/// The error function, accurate to f32 rounding (libm's `erff`, a port of
/// FreeBSD's msun). Used by GELU in its exact form.
///
/// ```
/// use ferrograd_runtime::math::erf;
/// assert_eq!(erf(0.0), 0.0);
/// assert!((erf(1.0) - 0.842_700_8).abs() < 1e-7);
/// assert!((erf(-2.0) + 0.995_322_3).abs() < 1e-7);
/// ```
#[inline]
pub fn erf(x: f32) -> f32 {
    libm::erff(x)
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_f64_reference() {
        // erf(x) in f64 from libm as the reference, over [-6, 6].
        let mut worst = 0.0f64;
        for i in -6000..=6000 {
            let x = i as f32 * 1e-3;
            let want = libm::erf(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
        }
        assert!(worst < 2e-7, "worst error {worst}");
    }
}
