//! Scalar functions the generated kernels call instead of `std`'s.
//!
//! `f32::exp`, `ln`, `tanh` and libm's `erff` are calls into the C library:
//! one element at a time, and a call in a loop stops LLVM from vectorizing
//! it. The versions here are branch-free polynomials on bit manipulation, so
//! a kernel loop over them compiles to SIMD code (SSE2 on baseline x86-64,
//! AVX2 in the kernels' `x86-64-v3` versions). Each computes both sides of
//! its range split and selects one, which vectorizes as a blend.
//!
//! They are associated functions of [`Math<FMA>`](Math): with `FMA` true the
//! polynomials use fused multiply-adds (`f32::mul_add`), one instruction per
//! step instead of two. That choice must follow the CPU level of the code that
//! *calls* them, and `cfg!(target_feature = "fma")` in this crate sees the
//! baseline it is built at, so generated kernels name the type once:
//!
//! ```
//! use ferrograd_runtime as rt;
//! type Math = rt::math::Math<{ cfg!(target_feature = "fma") }>;
//! assert_eq!(Math::exp(0.0), 1.0);
//! ```
//!
//! (On a CPU without FMA, `mul_add` is a library call: correct, but slow.)
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

/// `a·b + c`, fused (one rounding) when `FMA`.
#[inline(always)]
fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Horner's rule, highest coefficient first.
#[inline(always)]
fn poly<const FMA: bool, const N: usize>(x: f32, c: [f32; N]) -> f32 {
    let mut acc = c[0];
    for &k in &c[1..] {
        acc = mul_add::<FMA>(acc, x, k);
    }
    acc
}

/// 2^n for n in [-126, 127], built from its exponent bits.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) << 23) as u32)
}

/// The scalar functions; `FMA`: whether the caller's CPU level has fused
/// multiply-add (see the module's documentation).
pub struct Math<const FMA: bool>;

impl<const FMA: bool> Math<FMA> {
    /// e^x.
    ///
    /// ```
    /// type Math = ferrograd_runtime::math::Math<false>;
    /// assert_eq!(Math::exp(0.0), 1.0);
    /// assert!((Math::exp(1.0) - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
    /// assert_eq!(Math::exp(f32::NEG_INFINITY), 0.0);
    /// assert_eq!(Math::exp(100.0), f32::INFINITY);
    /// assert!(Math::exp(f32::NAN).is_nan());
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
                * poly::<FMA, _>(
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
    /// type Math = ferrograd_runtime::math::Math<false>;
    /// assert_eq!(Math::ln(1.0), 0.0);
    /// assert!((Math::ln(std::f32::consts::E) - 1.0).abs() <= f32::EPSILON);
    /// assert_eq!(Math::ln(0.0), f32::NEG_INFINITY);
    /// assert!(Math::ln(-1.0).is_nan());
    /// assert_eq!(Math::ln(f32::INFINITY), f32::INFINITY);
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
            * poly::<FMA, _>(
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
    /// type Math = ferrograd_runtime::math::Math<false>;
    /// assert_eq!(Math::tanh(0.0), 0.0);
    /// assert!((Math::tanh(0.5) - 0.462_117_16).abs() <= f32::EPSILON);
    /// assert_eq!(Math::tanh(-30.0), -1.0);
    /// assert!(Math::tanh(f32::NAN).is_nan());
    /// ```
    #[inline]
    pub fn tanh(x: f32) -> f32 {
        let z = x * x;
        let near = x + x
            * z
            * poly::<FMA, _>(
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
        let far = (1.0 - 2.0 / (Self::exp(2.0 * x.abs()) + 1.0)).copysign(x);
        if x.abs() < 0.625 {
            near
        } else {
            far
        }
    }

    /// The error function. Used by GELU in its exact form.
    ///
    /// ```
    /// type Math = ferrograd_runtime::math::Math<false>;
    /// assert_eq!(Math::erf(0.0), 0.0);
    /// assert!((Math::erf(1.0) - 0.842_700_8).abs() < 1e-7);
    /// assert!((Math::erf(-2.0) + 0.995_322_3).abs() < 1e-7);
    /// assert_eq!(Math::erf(f32::INFINITY), 1.0);
    /// assert!(Math::erf(f32::NAN).is_nan());
    /// ```
    #[inline]
    pub fn erf(x: f32) -> f32 {
        // |x| < 0.9: erf x = x + x P(x^2).
        let z = x * x;
        let near = mul_add::<FMA>(
            x,
            poly::<FMA, _>(
                z,
                [
                    -6.090_344_4e-4,
                    5.011_957e-3,
                    -2.677_890_3e-2,
                    0.112_821_41,
                    -0.376_125_25,
                    0.128_379_15,
                ],
            ),
            x,
        );
        // Beyond: erf |x| = 1 - 2^Q(|x|), Q a fit of log2 erfc on [0.9, 4] (1 in f32
        // from 3.9 on; the clamp keeps NaN). P and Q are the PTX backend's
        // (legalize.ERF_P, ERFC_Q), so both backends compute the same form. No division and one power of two, where
        // erfc = e^(-x^2) R(1/|x|) needs both a divide and an exp.
        let a = x.abs();
        let a = if a > 4.0 { 4.0 } else { a };
        let q = poly::<FMA, _>(
            a,
            [
                -2.966_469_4e-5,
                6.179_68e-4,
                -5.975_131e-3,
                3.612_89e-2,
                -0.156_045_51,
                -0.913_879,
                -1.629_471,
                2.366_932e-4,
            ],
        );
        let far = (1.0 - Self::exp2_small(q)).copysign(x);
        if x.abs() < 0.9 {
            near
        } else {
            far
        }
    }

    /// 2^q for q in [-126, 0] (what erf's tail needs: no overflow, no subnormals):
    /// 2^n · e^(r), n = round(q), r = (q - n) ln 2 with |r| <= ln 2 / 2, on the
    /// polynomial of [`Math::exp`].
    #[inline(always)]
    fn exp2_small(q: f32) -> f32 {
        let k = q + ROUND;
        let n = k - ROUND;
        let r = (q - n) * std::f32::consts::LN_2;
        let p = 1.0
            + (r + r
                * r
                * poly::<FMA, _>(
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
        p * pow2((k.to_bits() as i32) - (ROUND.to_bits() as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::Math;

    /// Runs a test body for both variants (`mul_add` calls the C library's
    /// `fmaf` in this baseline test build: slow, but exact).
    macro_rules! both {
        ($name:ident, $body:ident) => {
            #[test]
            fn $name() {
                $body::<false>();
                $body::<true>();
            }
        };
    }

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

    both!(exp_within_two_ulp, exp_cases);

    fn exp_cases<const FMA: bool>() {
        for (lo, hi) in [(-1.0, 1.0), (-20.0, 20.0), (-87.0, 88.7), (-103.0, -87.0)] {
            let w = worst_ulp(Math::<FMA>::exp, f64::exp, lo, hi, 400_000);
            assert!(w <= 2.0, "FMA {FMA}, [{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(Math::<FMA>::exp(88.8), f32::INFINITY);
        assert_eq!(Math::<FMA>::exp(-104.0), 0.0);
    }

    both!(ln_within_two_ulp, ln_cases);

    fn ln_cases<const FMA: bool>() {
        for (lo, hi) in [(0.5, 2.0), (1e-3, 1e3), (1.0, 3e38), (1e-44, 1e-37)] {
            let w = worst_ulp(Math::<FMA>::ln, f64::ln, lo, hi, 400_000);
            assert!(w <= 2.0, "FMA {FMA}, [{lo}, {hi}]: {w} ulp");
        }
        assert!(Math::<FMA>::ln(f32::NAN).is_nan());
        assert_eq!(Math::<FMA>::ln(-0.0), f32::NEG_INFINITY);
    }

    both!(tanh_within_two_ulp, tanh_cases);

    fn tanh_cases<const FMA: bool>() {
        for (lo, hi) in [(-1.0, 1.0), (-10.0, 10.0), (1e-6, 1e-2)] {
            let w = worst_ulp(Math::<FMA>::tanh, f64::tanh, lo, hi, 400_000);
            assert!(w <= 2.0, "FMA {FMA}, [{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(Math::<FMA>::tanh(f32::INFINITY), 1.0);
        assert_eq!(Math::<FMA>::tanh(f32::NEG_INFINITY), -1.0);
    }

    both!(erf_within_two_ulp, erf_cases);

    fn erf_cases<const FMA: bool>() {
        for (lo, hi) in [(-1.0, 1.0), (-6.0, 6.0), (1e-6, 1e-2)] {
            let w = worst_ulp(Math::<FMA>::erf, libm::erf, lo, hi, 400_000);
            assert!(w <= 2.0, "FMA {FMA}, [{lo}, {hi}]: {w} ulp");
        }
        assert_eq!(Math::<FMA>::erf(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(Math::<FMA>::erf(f32::NEG_INFINITY), -1.0);
    }
}
