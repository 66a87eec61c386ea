"""Refit the polynomial coefficients of ``src/math.rs``.

    python codegen/runtime/fit_math.py

Least squares on Chebyshev nodes in f64 against Python's ``math`` functions,
then an f32 simulation of each kernel (Horner in float32, as the Rust code
evaluates it) to report the worst error in ulp. Prints the coefficients as
the shortest f32 literals, highest degree first, ready to paste.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

F32 = np.float32


def nodes(lo: float, hi: float, n: int = 4000) -> np.ndarray:
    k = np.arange(n)
    return (lo + hi) / 2 + (hi - lo) / 2 * np.cos(np.pi * (k + 0.5) / n)


def fit(x: np.ndarray, y: np.ndarray, degree: int, var: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(np.vander(var, degree + 1), y, rcond=None)
    return coef.astype(F32)


def horner(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    acc = np.full_like(x, coef[0])
    for c in coef[1:]:
        acc = acc * x + c
    return acc


def worst_ulp(got: np.ndarray, want: np.ndarray) -> float:
    ok = want != 0
    return float(np.max(np.abs(got[ok] - want[ok]) / np.spacing(np.abs(want[ok]).astype(F32))))


def report(name: str, coef: np.ndarray, kernel: Callable[[np.ndarray], np.ndarray],
           ref: Callable[[float], float], lo: float, hi: float) -> None:
    x = np.linspace(lo, hi, 200_001).astype(F32)
    want = np.array([ref(float(v)) for v in x])
    with np.errstate(all="ignore"):
        got = kernel(x).astype(np.float64)
    literals = ", ".join(np.format_float_scientific(c, unique=True) for c in coef)
    print(f"{name}: worst {worst_ulp(got, want):.2f} ulp on [{lo}, {hi}]\n  [{literals}]")


def exp_f64_rounded(x: np.ndarray) -> np.ndarray:
    return np.exp(x.astype(np.float64)).astype(F32)


def main() -> None:
    # exp: e^r = 1 + r + r^2 P(r), |r| <= ln 2 / 2.
    h = math.log(2) / 2
    r = nodes(-h, h)
    c = fit(r, (np.exp(r) - 1 - r) / (r * r), 5, r)
    report("exp", c, lambda r: F32(1) + (r + r * r * horner(c, r)), math.exp, -h, h)

    # ln(1 + f) = f - f^2/2 + f^3 P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1].
    lo, hi = math.sqrt(0.5) - 1, math.sqrt(2) - 1
    f = nodes(lo, hi)
    c = fit(f, (np.log1p(f) - f + f * f / 2) / f**3, 8, f)
    report("ln", c, lambda f: f + (f * (f * f) * horner(c, f) - F32(0.5) * (f * f)),
           math.log1p, lo, hi)

    # tanh x = x + x^3 P(x^2) for |x| < 0.625.
    x = nodes(1e-4, 0.625)
    c = fit(x, (np.tanh(x) - x) / x**3, 5, x * x)
    report("tanh", c, lambda x: x + x * (x * x) * horner(c, x * x), math.tanh, 1e-6, 0.625)

    # erf: its coefficients are the PTX backend's (legalize.ERF_P, ERFC_Q, fitted there
    # toward the float32 minimax), shared so both backends compute the same form:
    # x + x P(x^2) for |x| < 0.9, 1 - 2^Q(x) beyond. Reported here in the f32 form of
    # math.rs (2^Q rounded once, as exp2_small is within an ulp).
    from ferrograd.codegen.backends.legalize import ERF_P, ERF_SMALL, ERFC_Q

    p = np.array(ERF_P[::-1], F32)
    report("erf near", p, lambda x: x + x * horner(p, x * x), math.erf, 1e-6, ERF_SMALL)
    q = np.array(ERFC_Q[::-1], F32)
    report("erf far", q, lambda x: F32(1) - np.exp2(horner(q, x).astype(np.float64)).astype(F32),
           math.erf, ERF_SMALL, 4.0)

if __name__ == "__main__":
    main()
