//! Scalar functions the generated kernels call instead of `std`'s.
//!
//! `f32::exp`, `ln`, `tanh` and libm's `erff` are calls into the C library:
//! one element at a time, and a call in a loop stops LLVM from vectorizing
//! it. The versions here are branch-free polynomials on bit manipulation, so
//! a kernel loop over them compiles to SIMD code (SSE2 on baseline x86-64,
//! AVX2 in the kernels' `x86-64-v3` versions). Each computes both sides of
//! its range split and selects one, which vectorizes as a blend.
//!
//! Accuracy: within 2 ulp of the correctly rounded result over the whole
//! f32 range (tested below against `f64` references), with IEEE behaviour at
//! the edges: NaN in, NaN out; overflow to infinity; subnormal results.
//! The coefficients are least-squares fits on Chebyshev nodes, refitted by
//! `codegen/runtime/fit_math.py`.

/// Adding this rounds an f32 of magnitude below 2^22 to an integer, which
/// then sits in the low mantissa bits (1.5 · 2^23, so both signs work).
const ROUND: f32 = 12_582_912.0;
/// ln 2 split so that `n * LN_2_HI` is exact for |n| < 2^15.
const LN_2_HI: f32 = 0.693_359_4;
const LN_2_LO: f32 = -2.121_944_4e-4;

/// Horner's rule, highest coefficient first.
#[inline(always)]
fn poly<const N: usize>(x: f32, c: [f32; N]) -> f32 {
    let mut acc = c[0];
    for &k in &c[1..] {
        acc = acc * x + k;
    }
    acc
}

/// 2^n for n in [-126, 127], built from its exponent bits.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) << 23) as u32)
}

/// e^x.
///
/// ```
/// use ferrograd_runtime::math::exp;
/// assert_eq!(exp(0.0), 1.0);
/// assert!((exp(1.0) - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
/// assert_eq!(exp(f32::NEG_INFINITY), 0.0);
/// assert_eq!(exp(100.0), f32::INFINITY);
/// assert!(exp(f32::NAN).is_nan());
/// ```
#[inline]
pub fn exp(x: f32) -> f32 {
    // e^x = 2^n · e^r, n = round(x / ln 2), |r| <= ln 2 / 2. Outside the clamp
    // the result is 0 or infinity anyway; clamp keeps NaN.
    let x = x.clamp(-104.0, 89.0);
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = (x - n * LN_2_HI) - n * LN_2_LO;
    let p = 1.0
        + (r + r
            * r
            * poly(
                r,
                [
                    1.989_927_4e-4,
                    0.001_393_364_2,
                    0.008_333_298,
                    0.041_666_467,
                    0.166_666_67,
                    0.5,
                ],
            ));
    // n in [-150, 128]: two factors, each a normal power of two, so that
    // subnormal and overflowing results round once, in the last product.
    let n = (k.to_bits() as i32) - (ROUND.to_bits() as i32);
    let half = n >> 1;
    p * pow2(half) * pow2(n - half)
}

/// The natural logarithm.
///
/// ```
/// use ferrograd_runtime::math::ln;
/// assert_eq!(ln(1.0), 0.0);
/// assert!((ln(std::f32::consts::E) - 1.0).abs() <= f32::EPSILON);
/// assert_eq!(ln(0.0), f32::NEG_INFINITY);
/// assert!(ln(-1.0).is_nan());
/// assert_eq!(ln(f32::INFINITY), f32::INFINITY);
/// ```
#[inline]
pub fn ln(x: f32) -> f32 {
    // x = m · 2^e with m in [sqrt(1/2), sqrt(2)); ln x = e ln 2 + ln(1 + f).
    let subnormal = x < f32::MIN_POSITIVE;
    let scaled = if subnormal { x * 8_388_608.0 } else { x }; // 2^23
    let bits = scaled.to_bits() as i32;
    let m = f32::from_bits(((bits & 0x007f_ffff) | 0x3f80_0000) as u32);
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (bits >> 23) - 127 - if subnormal { 23 } else { 0 } + i32::from(big);
    let f = m - 1.0;
    let z = f * f;
    let y = f
        * z
        * poly(
            f,
            [
                0.071_489_33,
                -0.115_715_146,
                0.116_620_03,
                -0.124_110_214,
                0.142_498_72,
                -0.166_684_8,
                0.200_007_1,
                -0.249_999_9,
                0.333_333_3,
            ],
        )
        - 0.5 * z;
    let e = e as f32;
    let r = (y + e * LN_2_LO) + f + e * LN_2_HI;
    if x == 0.0 {
        f32::NEG_INFINITY
    } else if x < 0.0 || x.is_nan() {
        f32::NAN
    } else if x == f32::INFINITY {
        x
    } else {
        r
    }
}

/// The hyperbolic tangent.
///
/// ```
/// use ferrograd_runtime::math::tanh;
/// assert_eq!(tanh(0.0), 0.0);
/// assert!((tanh(0.5) - 0.462_117_16).abs() <= f32::EPSILON);
/// assert_eq!(tanh(-30.0), -1.0);
/// assert!(tanh(f32::NAN).is_nan());
/// ```
#[inline]
pub fn tanh(x: f32) -> f32 {
    let z = x * x;
    let near = x + x
        * z
        * poly(
            z,
            [
                2.314_125_2e-3,
                -8.365_824e-3,
                2.177_690_5e-2,
                -5.396_049e-2,
                1.333_331e-1,
                -3.333_333_4e-1,
            ],
        );
    let far = (1.0 - 2.0 / (exp(2.0 * x.abs()) + 1.0)).copysign(x);
    if x.abs() < 0.625 {
        near
    } else {
        far
    }
}

/// The error function. Used by GELU in its exact form.
///
/// ```
/// use ferrograd_runtime::math::erf;
/// assert_eq!(erf(0.0), 0.0);
/// assert!((erf(1.0) - 0.842_700_8).abs() < 1e-7);
/// assert!((erf(-2.0) + 0.995_322_3).abs() < 1e-7);
/// assert_eq!(erf(f32::INFINITY), 1.0);
/// assert!(erf(f32::NAN).is_nan());
/// ```
#[inline]
pub fn erf(x: f32) -> f32 {
    // |x| < 0.875: erf x = x + x P(x^2).
    let z = x * x;
    let near = x + x * poly(
        z,
        [
            8.737_628e-5,
            -8.225_873_5e-4,
            0.005_208_075_5,
            -0.026_862_144,
            0.112_837_44,
            -0.376_126_38,
            0.128_379_17,
        ],
    );
    // Beyond: erf |x| = 1 - e^(-x^2) Q(1/|x|), which is 1 in f32 from |x| = 3.92
    // on; the clamp keeps NaN.
    let a = x.abs();
    let a = if a > 4.0 { 4.0 } else { a };
    let q = poly(
        1.0 / a,
        [
            3.796_865_6e-4,
            -0.020_325_018,
            0.127_180_22,
            -0.363_292,
            0.583_181_86,
            -0.509_512_96,
            0.052_026_942,
            0.557_585_3,
            3.595_333e-4,
        ],
    );
    let far = (1.0 - exp(-(a * a)) * q).copysign(x);
    if x.abs() < 0.875 {
        near
    } else {
        far
    }
}

#[cfg(test)]
mod tests {
    use super::{erf, exp, ln, tanh};

    /// Largest error in units of the f32 spacing at the f64 reference, over
    /// `n` evenly spaced points of [lo, hi].
    fn worst_ulp(f: fn(f32) -> f32, reference: fn(f64) -> f64, lo: f32, hi: f32, n: usize) -> f64 {
        let mut worst = 0.0f64;
        for i in 0..=n {
            let x = lo + (hi - lo) * (i as f32 / n as f32);
            let want = reference(f64::from(x));
            let got = f64::from(f(x));
            if want == 0.0 || !want.is_finite() {
                assert_eq!(got, want, "x = {x}");
                continue;
            }
            let w = want as f32;
            let ulp = f64::from(f32::from_bits(w.abs().to_bits() + 1) - w.abs());
            worst = worst.max((got - want).abs() / ulp);
        }
        worst
    }

    #[test]
    fn exp_within_two_ulp() {
        for (lo, hi) in [(-1.0, 1.0), (-20.0, 20.0), (-87.0, 88.7), (-103.0, -87.0)] {
            let w = worst_ulp(exp, f64::exp, lo, hi, 400_000);
            assert!(w <= 2.0, "[{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(exp(88.8), f32::INFINITY);
        assert_eq!(exp(-104.0), 0.0);
    }

    #[test]
    fn ln_within_two_ulp() {
        for (lo, hi) in [(0.5, 2.0), (1e-3, 1e3), (1.0, 3e38), (1e-44, 1e-37)] {
            let w = worst_ulp(ln, f64::ln, lo, hi, 400_000);
            assert!(w <= 2.0, "[{lo}, {hi}]: {w} ulp");
        }
        assert!(ln(f32::NAN).is_nan());
        assert_eq!(ln(-0.0), f32::NEG_INFINITY);
    }

    #[test]
    fn tanh_within_two_ulp() {
        for (lo, hi) in [(-1.0, 1.0), (-10.0, 10.0), (1e-6, 1e-2)] {
            let w = worst_ulp(tanh, f64::tanh, lo, hi, 400_000);
            assert!(w <= 2.0, "[{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn erf_within_two_ulp() {
        for (lo, hi) in [(-1.0, 1.0), (-6.0, 6.0), (1e-6, 1e-2)] {
            let w = worst_ulp(erf, libm::erf, lo, hi, 400_000);
            assert!(w <= 2.0, "[{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(erf(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
    }
}
