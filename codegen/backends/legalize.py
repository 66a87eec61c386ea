"""Legalization for PTX: rewrites of elementwise sympy expressions, before rendering,
into what the PTX emitter has instructions for.

PTX has no exp, log, tanh, erf, sin or cos; it has ``ex2.approx``, ``lg2.approx``,
fused multiply-add, IEEE division and square root, and rounding conversions.
``REWRITES`` maps each function to its rewrite into those primitives (sympy →
sympy), so the renderer stays a table and never branches on the math. The
primitives are sympy functions of their own (``Exp2``, ``Log2``, ``Fma``,
``Floor``, ``Rint``, ``Select``, and the fast-math ``TanhApprox``) that nothing
simplifies away; relations are built unevaluated, so sympy's reasoning over the
reals (where no value is NaN or infinite) cannot fold them.

Accuracy, in ulps of the exact result (float32), max over random inputs:

  function  domain          emulated bound   measured on an H200
  exp       [-87, 88]       1.5              1.84
  log       [1e-30, 1e30]   2.0              2.99
  log1p     [-0.999, 1e6]   2.5              3.15
  tanh      [-20, 20]       2.0              1.22
  erf       [-6, 6]         1.5              1.20
  sin, cos  [-1e5, 1e5]     2.0              1.46 (on [-1e4, 1e4])
  pow x**y  x in [0.01, 100], y = 1.7        12.8

"Emulated" is ``ERROR_BOUNDS``, asserted by ``tests/test_ptx.py`` with exact
``2**x`` and ``log2`` in place of the hardware's; the H200 column comes from
``benches/gpu_ptx_check.py`` (its probe). The hardware adds its own error:
``ex2.approx.f32`` about 2 ulps, ``lg2.approx.f32`` an absolute 2^-22 on
[0.5, 2] (not used there) and about 2 ulps elsewhere.

- exp: x = n·ln2 + r with n = floor(x·log2 e) and r by a two-constant Cody–Waite
  reduction (fma), then 2^(r·log2 e)·2^n. x is clamped to [-104, 89] (exp is 0 /
  inf there in float32) so that ±inf give 0 / inf, NaN passes through.
- log: on (0.5, 2), log1p(x - 1) by the series of 2·atanh(s), s = f/(2+f), in
  FreeBSD's form (f plus a small correction); lg2(x)·ln2 elsewhere (where
  |log x| > 0.69, so lg2's error stays relative).
- log1p: the same series on (-0.5, 1), elsewhere log(u) + (x - (u - 1))/u with
  u = 1 + x rounded (the second term restores what the rounding lost).
- tanh: odd minimax polynomial for |x| < 0.75, 1 - 2/(exp(2|x|)+1) with the sign
  of x beyond.
- erf: x + x·P(x²) for |x| < 0.9, ±(1 - 2^Q(min(|x|, 4))) beyond, Q a fit of
  log2(erfc) on [0.9, 4] (1 - 2^Q rounds to 1 from 3.9 on). Both branches in fma
  Horner, 6 + 7 fmas and one ``ex2``: 23 instructions per element in sm_90 SASS (FP32
  and MUFU) where the former form (degree 7 and 10 polynomials as separate mul + add,
  exp with its range reduction and two ``ex2``) took 59. Coefficients fitted in
  float64 (a reweighted least-squares toward minimax).
- sin, cos: q = rint(x·2/π), r = x - q·π/2 by a three-constant Cody–Waite
  reduction (fma), Taylor polynomials on [-π/4, π/4], the quadrant picked by
  q mod 4. Beyond |x| ~ 1e5 the reduction loses bits as |x| grows (no
  Payne–Hanek); inf and NaN give NaN.
- pow: integer and half-integer exponents are left to the emitter (repeated
  multiplication, ``sqrt.rn``); any other exponent y gives 2^(y·log2|x|), with
  x**0 = 1 and the sign of a negative base restored for an integer y (NaN for a
  non-integer one, as NumPy); a constant base takes its exact log2. Relative
  error about (|y·log2 x| + 4)·2^-22.
- sign, Heaviside: comparisons and selects (NaN passes through).

``fast_math`` (off by default) trades accuracy for speed as CUDA's intrinsics do:
tanh by ``tanh.approx.f32`` (measured 126 ulps), exp by ex2(x·log2 e) (60 ulps
at |x| ~ 88), log by lg2(x)·ln2 (absolute 2^-22: 25000 ulps near x = 1); the
emitter then divides with ``div.full`` and takes ``sqrt.approx``. Otherwise
division and square root are IEEE-rounded (``div.rn``, ``sqrt.rn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import log1p

# ---- primitives the PTX emitter renders ------------------------------------------------


class _Real(sp.Function):
    """A float-valued primitive: real for sympy, so relations over it are accepted."""

    def _eval_is_extended_real(self) -> bool:
        return True


class Exp2(_Real):
    """2**x (``ex2.approx.f32``)."""


class Log2(_Real):
    """log2(x) (``lg2.approx.f32``)."""


class Fma(_Real):
    """a*b + c rounded once (``fma.rn.f32``)."""


class Select(_Real):
    """Select(c, a, b): a where c holds, else b (``selp``). Unlike a Piecewise, sympy
    never rewrites it (no collapsing of branches by reasoning over the reals). Real
    for sympy like the other primitives: left unknown, arithmetic on a select (Abs,
    a quotient) made sympy's assumption system conclude "not real" for some nestings
    and refuse to rebuild the relations inside (random graphs: tanh of tanh of a pow)."""


class Floor(_Real):
    """Round toward -inf, as a float (``cvt.rmi.f32.f32``)."""


class Rint(_Real):
    """Round to nearest even, as a float (``cvt.rni.f32.f32``)."""


class TanhApprox(_Real):
    """tanh (``tanh.approx.f32``, fast math only)."""


PRIMITIVES = (Exp2, Log2, Fma, Floor, Rint, TanhApprox)  # float-valued


def f32(value: float) -> sp.Float:
    """A float32 constant as an exact sympy Float."""
    return sp.Float(float(np.float32(value)), 24)


LOG2E = f32(1.4426950408889634)
LN2 = f32(0.6931471805599453)
# ln 2 split for Cody-Waite: LN2_HI + LN2_LO = ln 2 to about 2^-48.
LN2_HI = f32(0.6931471824645996)
LN2_LO = f32(-1.904654323148236e-09)
# pi/2 in three float32 parts, and 2/pi.
PIO2 = (f32(1.5707963705062866), f32(-4.371139000186243e-08), f32(-1.7151245100059164e-15))
TWO_OVER_PI = f32(0.6366197723675814)

# tanh(x) = x + x·z·P(z), z = x², |x| < TANH_SMALL (minimax, max 0.8 ulp emulated).
TANH_SMALL = 0.75
TANH_P = (-0.33333319425582886, 0.13332796096801758, -0.053901009261608124,
          0.021481744945049286, -0.0077061099000275135, 0.0017669876106083393)
# erf(x) = x + x·P(z), z = x², |x| < ERF_SMALL; log2(erfc(t)) = Q(t) on [ERF_SMALL, 4].
# Fitted in float64 (scipy's erf/erfc; least squares reweighted toward the minimax of the
# float32 result's error: relative for P, e·ln2/(1 - e) with e = erfc(t) for Q), then
# rounded to float32 and checked in the float32 emulation with fma Horner.
ERF_SMALL = 0.9
ERF_P = (0.12837915122509003, -0.3761252462863922, 0.11282140761613846,
         -0.026778902858495712, 0.005011957138776779, -0.0006090344395488501)
ERFC_Q = (0.00023669320216868073, -1.629470944404602, -0.9138789772987366,
          -0.15604551136493683, 0.036128900945186615, -0.005975130945444107,
          0.0006179679767228663, -2.9664694011444226e-05)
# 2·atanh(s)/s - 2 = z·(2/3 + 2z/5 + ...), z = s², |s| <= 1/3: Taylor to 2z^7/15.
ATANH_P = tuple(2.0 / (2 * k + 3) for k in range(7))
# sin(r) = r + r·z·S(z), cos(r) = 1 + z·C(z), |r| <= pi/4: Taylor.
SIN_P = (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800)
COS_P = (-1 / 2, 1 / 24, -1 / 720, 1 / 40320, -1 / 3628800, 1 / 479001600)

# function -> (domain (lo, hi), bound in ulps of the exact value), with exact 2**x and
# log2 for the hardware's approximations; tests/test_ptx.py asserts these.
ERROR_BOUNDS: dict[str, tuple[tuple[float, float], float]] = {
    "exp": ((-87.0, 88.0), 1.5),
    "log": ((1e-30, 1e30), 2.0),
    "log1p": ((-0.999, 1e6), 2.5),
    "tanh": ((-20.0, 20.0), 2.0),
    "erf": ((-6.0, 6.0), 1.5),
    "sin": ((-1e5, 1e5), 2.0),
    "cos": ((-1e5, 1e5), 2.0),
}


def _horner(coeffs: tuple[float, ...], z: Any) -> Any:
    acc = f32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = f32(c) + z * acc
    return acc


def _fma_horner(coeffs: tuple[float, ...], z: Any) -> Any:
    """Horner's scheme in fused multiply-adds: one instruction per coefficient, and one
    rounding instead of two."""
    acc = f32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = Fma(z, acc, f32(c))
    return acc


def _lt(a: Any, b: Any) -> Any:
    return sp.StrictLessThan(a, b, evaluate=False)


def _gt(a: Any, b: Any) -> Any:
    return sp.StrictGreaterThan(a, b, evaluate=False)


def _eq(a: Any, b: Any) -> Any:
    return sp.Eq(a, b, evaluate=False)


# Relations are built unevaluated: sympy would otherwise reason about them in real
# arithmetic (and fold comparisons into the branches of a Piecewise).


def _select(*cases: tuple[Any, Any], otherwise: Any) -> Any:
    """The first value whose condition holds, else ``otherwise``."""
    out = otherwise
    for value, cond in reversed(cases):
        out = Select(cond, value, out)
    return out


def _with_sign_of(value: Any, x: Any) -> Any:
    return Select(_lt(x, 0), -value, value)


def _clamp(x: Any, lo: float, hi: float) -> Any:
    """x clamped to [lo, hi]; NaN stays NaN (comparisons with NaN are false)."""
    return _select((f32(lo), _lt(x, lo)), (f32(hi), _gt(x, hi)), otherwise=x)


# ---- the rewrites ------------------------------------------------------------------------


def exp_(x: Any) -> Any:
    xc = _clamp(x, -104.0, 89.0)
    n = Floor(xc * LOG2E)
    r = Fma(n, -LN2_LO, Fma(n, -LN2_HI, xc))
    return Exp2(r * LOG2E) * Exp2(n)


def _log1p_near(f: Any) -> Any:
    """log(1 + f) for -1/2 < f < 1: f - (f²/2 - s·(f²/2 + R)) with s = f/(2 + f) and
    R = 2·atanh(s)/s - 2 (the form of FreeBSD's log: the exact f plus a small
    correction, one fma, so the error stays near 1 ulp)."""
    hfsq = f * f * f32(0.5)
    s = f / (f + 2)
    z = s * s
    r = z * _horner(ATANH_P, z)
    return f - Fma(-s, hfsq + r, hfsq)


def log_(x: Any) -> Any:
    near = sp.And(_gt(x, 0.5), _lt(x, 2))  # x - 1 is exact here
    return Select(near, _log1p_near(x - 1), Log2(x) * LN2)


def log1p_(x: Any) -> Any:
    near = sp.And(_gt(x, -0.5), _lt(x, 1))
    u = Fma(x, f32(1.0), f32(1.0))  # 1 + x, rounded, kept opaque: u - 1 must not fold to x
    lost = x - (u - 1)  # what rounding 1 + x lost (none at u = 0 or inf: no NaN from it)
    fix = Select(sp.And(_gt(u, 0), _lt(u, 1e38)), lost / u, f32(0.0))
    return Select(near, _log1p_near(x), log_(u) + fix)


def tanh_(x: Any) -> Any:
    z = x * x
    small = x + x * (z * _horner(TANH_P, z))
    big = 1 - 2 / (exp_(2 * sp.Abs(x)) + 1)
    return Select(_lt(sp.Abs(x), TANH_SMALL), small, _with_sign_of(big, x))


def erf_(x: Any) -> Any:
    # Both branches run for every element (a warp holds both kinds of x), so each is
    # short: fma Horner, and 2^Q straight from ex2 — Q in [-26, -2.3] needs no range
    # reduction, and ex2's relative error there is at most ~0.8 ulp of 1 - 2^Q.
    small = Fma(x, _fma_horner(ERF_P, x * x), x)
    big = 1 - Exp2(_fma_horner(ERFC_Q, sp.Min(sp.Abs(x), f32(4.0))))  # NaN stays NaN
    return Select(_lt(sp.Abs(x), ERF_SMALL), small, _with_sign_of(big, x))


def _sincos_parts(x: Any) -> tuple[Any, Any, Any]:
    """(sin r, cos r, quadrant q mod 4) with x = r + q·pi/2, |r| <= pi/4."""
    q = Rint(x * TWO_OVER_PI)
    r = Fma(-q, PIO2[2], Fma(-q, PIO2[1], Fma(-q, PIO2[0], x)))
    z = r * r
    s = r + r * (z * _horner(SIN_P, z))
    c = 1 + z * _horner(COS_P, z)
    quadrant = q - 4 * Floor(q * f32(0.25))
    return s, c, quadrant


def _by_quadrant(quadrant: Any, values: tuple[Any, Any, Any, Any]) -> Any:
    return _select((values[0], _eq(quadrant, 0)), (values[1], _eq(quadrant, 1)),
                   (values[2], _eq(quadrant, 2)), otherwise=values[3])


def sin_(x: Any) -> Any:
    s, c, j = _sincos_parts(x)
    return _by_quadrant(j, (s, c, -s, -c))


def cos_(x: Any) -> Any:
    s, c, j = _sincos_parts(x)
    return _by_quadrant(j, (c, -s, -c, s))


def native_exponent(e: Any) -> bool:
    """Exponents the emitter renders itself: integers and halves (sqrt)."""
    return bool(e.is_number) and float(2 * e).is_integer()


def pow_(x: Any, y: Any) -> Any:
    if x.is_number and x > 0:  # log2 of a constant base, exactly
        return Exp2(y * f32(float(sp.log(x, 2))))
    if y.is_number:
        return Exp2(y * Log2(x))  # a negative base gives NaN, as NumPy
    mag = Exp2(y * Log2(sp.Abs(x)))
    integral = _eq(Floor(y), y)
    odd = _eq(y - 2 * Floor(y * f32(0.5)), 1)
    return _select((f32(1.0), _eq(y, 0)), (mag, sp.GreaterThan(x, 0, evaluate=False)),
                   (-mag, sp.And(integral, odd)), (mag, integral), otherwise=sp.nan)


def sign_(x: Any) -> Any:
    return _select((f32(1.0), _gt(x, 0)), (f32(-1.0), _lt(x, 0)), otherwise=x)


def heaviside_(x: Any, h0: Any = 0.5) -> Any:
    return _select((f32(1.0), _gt(x, 0)), (f32(0.0), _lt(x, 0)), (f32(float(h0)), _eq(x, 0)),
                   otherwise=x)


# ---- the rewrite table -----------------------------------------------------------------------

Rewrite = Callable[..., Any]

# sympy function -> its rewrite over legalized args. A rewrite returns legal code only
# (tanh and erf call exp_, log1p calls log_), so one bottom-up pass legalizes all.
REWRITES: dict[type, Rewrite] = {
    sp.sign: sign_,
    sp.Heaviside: heaviside_,
    sp.tanh: tanh_,
    sp.erf: erf_,
    log1p: log1p_,
    sp.log: log_,
    sp.exp: exp_,
    sp.sin: sin_,
    sp.cos: cos_,
}

FAST_MATH: dict[type, Rewrite] = {
    **REWRITES,
    sp.tanh: TanhApprox,
    sp.exp: lambda x: Exp2(x * LOG2E),
    sp.log: lambda x: Log2(x) * LN2,
}


def legalize(expr: Any, fast_math: bool = False) -> Any:
    """``expr`` with every function PTX lacks rewritten into PTX primitives.

    Powers other than integers and halves become ``pow_``; relations are rebuilt
    unevaluated.
    """
    table = FAST_MATH if fast_math else REWRITES
    done: dict[Any, Any] = {}

    def walk(e: Any) -> Any:
        if e in done:
            return done[e]
        if not e.args or (e.is_number and not e.free_symbols):  # constants: exact, rounded
            return e
        args = [walk(a) for a in e.args]
        rewrite = table.get(type(e))
        if rewrite is not None:
            out = rewrite(*args)
        elif isinstance(e, sp.Pow) and not native_exponent(args[1]):
            out = pow_(*args)
        elif all(a is b for a, b in zip(args, e.args, strict=True)):
            out = e
        elif isinstance(e, sp.Rel):
            out = e.func(*args, evaluate=False)
        else:
            out = e.func(*args)
        done[e] = out
        return out

    return walk(expr)


# ---- float32 semantics of the primitives, for tests (NumPy) ------------------------------

def _round(fn: Callable[..., Any]) -> Callable[..., np.ndarray]:
    """``fn`` computed in float64 and rounded once to float32."""
    def f(*args: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.asarray(fn(*(np.asarray(a, np.float64) for a in args))).astype(np.float32)
    return f


NUMPY_PRIMITIVES: dict[type, Callable[..., np.ndarray]] = {
    Select: lambda c, a, b: np.asarray(np.where(c, a, b), np.float32),
    Exp2: _round(np.exp2),
    Log2: _round(np.log2),
    Fma: _round(lambda a, b, c: a * b + c),
    Floor: _round(np.floor),
    Rint: _round(np.rint),
    TanhApprox: _round(np.tanh),
}


def emulate(expr: Any, env: dict[sp.Symbol, np.ndarray]) -> np.ndarray:
    """Evaluate a legalized expression elementwise in float32, each primitive rounded
    once from its exact value (the hardware's ``ex2``/``lg2`` are a little worse)."""
    from ferrograd.ir.ops.elementwise import evaluate

    values = dict(env)
    f32_ = np.dtype(np.float32)

    def value(e: Any) -> np.ndarray:
        prims = {p: _bind(p) for p in _outermost(e)}
        with np.errstate(all="ignore"):
            return np.asarray(evaluate(without_ite(e.xreplace(prims)), values, f32_), np.float32)

    def _bind(p: Any) -> sp.Symbol:
        d = sp.Dummy(real=True)
        values[d] = NUMPY_PRIMITIVES[type(p)](*(value(a) for a in p.args))
        return d

    return value(expr)


def without_ite(e: Any) -> Any:
    """ITE(a, b, c) (which sympy makes of a comparison with a Piecewise) as and/or."""
    return e.replace(sp.ITE, lambda a, b, c: sp.Or(sp.And(a, b), sp.And(sp.Not(a), c)))


def _outermost(e: Any) -> list[Any]:
    """The primitive calls in ``e`` not nested inside another one."""
    if isinstance(e, (*PRIMITIVES, Select)):
        return [e]
    return [p for a in e.args for p in _outermost(a)]
