"""PTX assembly for the CUDA backend: the instruction tables, a function being
written (registers, labels, lines), and the register-based emitter of elementwise
expressions.

PTX is register based, so it shares no printer with the C-like backends: an
expression becomes one instruction per node, each writing a fresh virtual
register (ptxas allocates the real ones). Every instruction comes from the tables
below, keyed by (value kind, op). Expressions arrive legalized (``legalize.py``):
anything here without a table entry raises, never emits a guess.

Arithmetic is IEEE-rounded (``.rn``), which also keeps ptxas from contracting a
multiply and an add into an fma that the reference would not do; min/max
propagate NaN (``.NaN``, sm_80+), as NumPy does.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import sympy as sp
from sympy.logic.boolalg import Boolean, BooleanAtom

from ferrograd.ir.errors import BackendError

from ..kernel_ir import ToBool, ToFloat, ToInt
from .legalize import (
    PRIMITIVES,
    Exp2,
    Floor,
    Fma,
    Log2,
    Rint,
    Select,
    TanhApprox,
)

# ---- tables ------------------------------------------------------------------------------

# register class -> (PTX type of the declaration, name prefix)
REGISTERS = {"pred": (".pred", "%p"), "b32": (".b32", "%r"), "f32": (".f32", "%f"),
             "b64": (".b64", "%rd")}
# value kind of an expression -> register class
KIND_REGISTER = {"float": "f32", "int": "b32", "bool": "pred"}
# dtype of a buffer -> value kind in registers
DTYPE_KIND = {"f32": "float", "i32": "int", "bool": "bool"}
ITEMSIZE = {"f32": 4, "i32": 4, "bool": 1}
LOAD = {"f32": "ld.global.f32", "i32": "ld.global.b32", "bool": "ld.global.u8"}
STORE = {"f32": "st.global.f32", "i32": "st.global.b32", "bool": "st.global.u8"}

FLOAT_OPS = {
    "add": "add.rn.f32", "sub": "sub.rn.f32", "mul": "mul.rn.f32", "fma": "fma.rn.f32",
    "div": "div.rn.f32", "rcp": "rcp.rn.f32", "sqrt": "sqrt.rn.f32",
    "neg": "neg.f32", "abs": "abs.f32", "min": "min.NaN.f32", "max": "max.NaN.f32",
    "ex2": "ex2.approx.f32", "lg2": "lg2.approx.f32",
    "floor": "cvt.rmi.f32.f32", "rint": "cvt.rni.f32.f32",
    "tanh": "tanh.approx.f32",
    "select": "selp.f32", "mov": "mov.f32",
}
# Fast math: approximate division (2 ulp), reciprocal and square root.
FAST_FLOAT_OPS = {**FLOAT_OPS, "div": "div.full.f32", "rcp": "rcp.approx.f32",
                  "sqrt": "sqrt.approx.f32"}
INT_OPS = {
    "add": "add.s32", "sub": "sub.s32", "mul": "mul.lo.s32", "neg": "neg.s32",
    "abs": "abs.s32", "min": "min.s32", "max": "max.s32", "select": "selp.b32",
    "mov": "mov.b32",
}
BOOL_OPS = {"and": "and.pred", "or": "or.pred", "not": "not.pred", "xor": "xor.pred"}
# relational -> setp comparison; floats compare ordered (false with NaN) except !=,
# which is true with NaN as in NumPy ("neu": not equal or unordered)
COMPARE = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne"}
FLOAT_COMPARE = {**COMPARE, "!=": "neu"}
# sympy function -> op name in the tables above (unary, n-ary, ternary)
UNARY = {Exp2: "ex2", Log2: "lg2", Floor: "floor", Rint: "rint", TanhApprox: "tanh",
         sp.Abs: "abs"}
NARY = {sp.Max: "max", sp.Min: "min"}
BOOL_NARY = {sp.And: "and", sp.Or: "or", sp.Xor: "xor"}


def f32_immediate(value: float) -> str:
    """A float32 as PTX writes it exactly: 0f + the IEEE bits in hex."""
    bits = struct.unpack(">I", struct.pack(">f", np.float32(value)))[0]
    return f"0f{bits:08X}"


# ---- a function being written ---------------------------------------------------------------


class PtxFunction:
    """One ``.entry``: parameters, virtual registers, labels and instruction lines."""

    def __init__(self, params: list[tuple[str, str]]) -> None:
        self.params = params  # (PTX type, name)
        self.counts: Counter[str] = Counter()
        self.lines: list[str] = []
        self.shared: list[str] = []
        self.labels = 0

    def reg(self, cls: str) -> str:
        self.counts[cls] += 1
        return f"{REGISTERS[cls][1]}{self.counts[cls]}"

    def ins(self, op: str, *operands: str, guard: str | None = None) -> None:
        head = f"@{guard} " if guard else ""
        self.lines.append(f"\t{head}{op} {', '.join(operands)};" if operands else
                          f"\t{head}{op};")

    def comment(self, text: str) -> None:
        self.lines.append(f"\t// {text}")

    def label(self, hint: str) -> str:
        self.labels += 1
        return f"${hint}_{self.labels}"

    def place(self, label: str) -> None:
        self.lines.append(f"{label}:")

    def value(self, cls: str, op: str, *operands: str) -> str:
        """A fresh register of class ``cls`` holding ``op`` of ``operands``."""
        r = self.reg(cls)
        self.ins(op, r, *operands)
        return r

    def special(self, name: str) -> str:
        """A special register (``%tid.x``, ...) copied into a b32 register."""
        return self.value("b32", "mov.u32", name)

    def param_pointer(self, name: str) -> str:
        """The global address passed in ``.param .u64 name``."""
        raw = self.value("b64", "ld.param.u64", f"[{name}]")
        return self.value("b64", "cvta.to.global.u64", raw)

    def param_u32(self, name: str) -> str:
        return self.value("b32", "ld.param.u32", f"[{name}]")

    def param_f32(self, name: str) -> str:
        return self.value("f32", "ld.param.f32", f"[{name}]")

    def address(self, base: str, index: str | None, offset: int, itemsize: int) -> str:
        """``[base + (index + offset) * itemsize]`` (index: a u32 register)."""
        if index is None:
            return f"[{base}+{offset * itemsize}]"
        wide = self.value("b64", "mul.wide.u32", index, str(itemsize))
        addr = self.value("b64", "add.s64", base, wide)
        return f"[{addr}+{offset * itemsize}]"

    def load(self, dtype: str, addr: str, guard: str | None = None) -> str:
        """A register holding the element at ``addr``; with ``guard``, threads whose
        predicate is false load nothing and get 0 (false)."""
        if guard is None:
            if dtype == "bool":
                byte = self.value("b32", LOAD[dtype], addr)
                return self.value("pred", "setp.ne.b32", byte, "0")
            return self.value(KIND_REGISTER[DTYPE_KIND[dtype]], LOAD[dtype], addr)
        raw = (self.value("f32", "mov.f32", "0f00000000") if dtype == "f32"
               else self.value("b32", "mov.b32", "0"))
        self.ins(LOAD[dtype], raw, addr, guard=guard)
        return self.value("pred", "setp.ne.b32", raw, "0") if dtype == "bool" else raw

    def store(self, dtype: str, addr: str, value: str, guard: str | None = None) -> None:
        if dtype == "bool":
            value = self.value("b32", "selp.b32", "1", "0", value)
        self.ins(STORE[dtype], addr, value, guard=guard)

    def butterfly(self, acc: str, op: str, width: int) -> None:
        """``acc`` combined by ``op`` (an f32 instruction) over groups of ``width``
        lanes, by ``shfl.sync.bfly`` at width/2, width/4, ..., 1: every lane of a group
        ends with the group's value."""
        offset = width // 2
        while offset:
            other = self.value("f32", "shfl.sync.bfly.b32", acc, str(offset), "0x1f",
                               "0xffffffff")
            self.ins(op, acc, acc, other)
            offset //= 2

    @contextlib.contextmanager
    def loop(self, start: str, stop: str, step: str, hint: str = "loop") -> Iterator[str]:
        """``for (i = start; i < stop; i += step)`` on u32; yields ``i``."""
        i = self.value("b32", "mov.u32", start)
        top, done = self.label(hint), self.label(f"{hint}_done")
        p = self.reg("pred")
        self.ins("setp.ge.u32", p, i, stop)
        self.ins("bra", done, guard=p)
        self.place(top)
        yield i
        self.ins("add.u32", i, i, step)
        self.ins("setp.lt.u32", p, i, stop)
        self.ins("bra", top, guard=p)
        self.place(done)

    def text(self, name: str) -> str:
        params = ",\n".join(f"\t.param {t} {n}" for t, n in self.params)
        out = [f".visible .entry {name}(", params, ")", "{"] if params else \
            [f".visible .entry {name}()", "{"]
        for cls, (ptx_type, prefix) in REGISTERS.items():
            if self.counts[cls]:
                out.append(f"\t.reg {ptx_type} {prefix}<{self.counts[cls] + 1}>;")
        out += [f"\t{s}" for s in self.shared]
        out += self.lines
        out += ["\tret;", "}"]
        return "\n".join(out) + "\n"


def _constant(e: Any) -> bool:
    """A number sympy can evaluate (to be rounded to an immediate)."""
    return bool(e.is_number) and not e.free_symbols and not e.has(*PRIMITIVES, Select)


def _key(e: Any) -> Any:
    """Kernel inputs are bound by name (their assumptions vary); cse temporaries are
    Dummies, unique by identity."""
    return e.name if isinstance(e, sp.Symbol) and not isinstance(e, sp.Dummy) else e


# ---- expressions --------------------------------------------------------------------------


def shared_subexpressions(exprs: list[Any]) -> tuple[list[tuple[Any, Any]], list[Any]]:
    """``sympy.cse`` of ``exprs``: (temporary, subexpression) pairs and the reduced
    expressions, temporaries being Dummies."""
    subs, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("_t", cls=sp.Dummy),
                           optimizations=None)
    return list(subs), list(reduced)


class ExprEmitter:
    """Legalized sympy expressions -> instructions of a ``PtxFunction``.

    ``bind`` gives a symbol its register and kind (float, int, bool); ``emit_all``
    names shared subexpressions (``sympy.cse``) and returns one operand per
    expression, of the kind asked for. Numbers adapt to the kind their context
    needs; a mix of kinds without an explicit cast raises.
    """

    def __init__(self, f: PtxFunction, fast_math: bool = False) -> None:
        self.f = f
        self.float_ops = FAST_FLOAT_OPS if fast_math else FLOAT_OPS
        self.regs: dict[Any, str] = {}
        self.kinds: dict[Any, str] = {}

    def bind(self, symbol: Any, reg: str, kind: str) -> None:
        """``symbol`` (a sympy symbol, or a kernel input's name) lives in ``reg``."""
        self.regs[_key(symbol)] = reg
        self.kinds[_key(symbol)] = kind

    def emit_all(self, exprs: list[Any], kinds: list[str]) -> list[str]:
        return self.emit_shared(shared_subexpressions(exprs), kinds)

    def emit_shared(self, shared: tuple[list[tuple[Any, Any]], list[Any]], kinds: list[str]
                    ) -> list[str]:
        """``emit_all`` of expressions already through ``shared_subexpressions``: emitting
        them again (after binding the inputs anew) writes fresh registers."""
        subs, reduced = shared
        for sym, sub in subs:
            kind = self.kind_of(sub)
            if kind == "number":
                kind = "float"
            self.bind(sym, self.register(self.emit(sub, kind), kind), kind)
        return [self.emit(e, k) for e, k in zip(reduced, kinds, strict=True)]

    # ---- kinds -----------------------------------------------------------------------------
    def kind_of(self, e: Any) -> str:
        """"float", "int", "bool", or "number": a literal, or an expression of literals only
        (a Piecewise of numbers), which takes the kind its context needs."""
        if _key(e) in self.kinds:
            return self.kinds[_key(e)]
        if isinstance(e, sp.Symbol):
            raise BackendError(f"PTX: unbound symbol {e}")
        if isinstance(e, ToFloat):
            return "float"
        if isinstance(e, ToInt):
            return "int"
        if isinstance(e, Boolean | sp.Rel | ToBool | BooleanAtom):
            return "bool"
        if _constant(e):
            return "number"
        if isinstance(e, sp.Piecewise):
            return self._joint([v for v, _ in e.args], e)
        if isinstance(e, Select):
            return self._joint(list(e.args[1:]), e)
        if isinstance(e, PRIMITIVES) or (isinstance(e, sp.Pow) and not e.exp.is_Integer):
            return "float"
        return self._joint(list(e.args), e)

    def _joint(self, args: list[Any], e: Any) -> str:
        kinds = {self.kind_of(a) for a in args} - {"number"}
        if len(kinds) > 1:
            raise BackendError(f"PTX: {e} mixes {' and '.join(sorted(kinds))} values "
                               "without a cast")
        return kinds.pop() if kinds else "number"

    def register(self, operand: str, kind: str) -> str:
        """``operand`` in a register (immediates are moved into one)."""
        if operand.startswith("%"):
            return operand
        if kind == "float":
            return self.f.value("f32", "mov.f32", operand)
        if kind == "int":
            return self.f.value("b32", "mov.b32", operand)
        raise BackendError(f"PTX: no register for immediate {operand} of kind {kind}")

    # ---- emission ----------------------------------------------------------------------------
    def emit(self, e: Any, want: str) -> str:
        """An operand (register or immediate) holding ``e`` as a ``want`` value."""
        if _key(e) in self.regs:
            if self.kinds[_key(e)] != want:
                raise BackendError(f"PTX: {e} is {self.kinds[_key(e)]}, needed as {want}")
            return self.regs[_key(e)]
        kind = self.kind_of(e)
        if _constant(e):
            return self._number(e, want)
        if kind == "number":  # e.g. a Piecewise of literals: takes the kind asked for
            kind = want
        if kind != want:
            raise BackendError(f"PTX: {e} is a {kind} value, needed as {want}")
        if want == "bool":
            return self._bool(e)
        ops = self.float_ops if want == "float" else INT_OPS
        cls = KIND_REGISTER[want]
        if isinstance(e, sp.Add):
            return self._add(e, want, ops, cls)
        if isinstance(e, sp.Mul):
            return self._mul(e, want, ops, cls)
        if isinstance(e, sp.Pow):
            return self._pow(e, want, ops, cls)
        if isinstance(e, sp.Piecewise):
            return self._piecewise(e, want, ops, cls)
        if isinstance(e, Select):
            p = self.emit(e.args[0], "bool")
            return self.f.value(cls, ops["select"], self.emit(e.args[1], want),
                                self.emit(e.args[2], want), p)
        if isinstance(e, ToFloat | ToInt):
            return self._cast(e, want)
        if type(e) in NARY:
            return self._fold(ops[NARY[type(e)]], [self.emit(a, want) for a in e.args], cls)
        if type(e) in UNARY and UNARY[type(e)] in ops:
            arg = self.register(self.emit(e.args[0], want), want)
            return self.f.value(cls, ops[UNARY[type(e)]], arg)
        if isinstance(e, Fma) and want == "float":
            return self.f.value(cls, ops["fma"], *(self.emit(a, want) for a in e.args))
        raise BackendError(f"PTX: no instruction for {type(e).__name__} as {want} "
                           f"(in {e}); is the expression legalized?")

    def _number(self, e: Any, want: str) -> str:
        if want == "float":
            return f32_immediate(float(e))
        if want == "int":
            if not e.is_Integer:
                raise BackendError(f"PTX: {e} is not an integer")
            return str(int(e))
        raise BackendError(f"PTX: number {e} used as a bool")

    def _fold(self, op: str, operands: list[str], cls: str) -> str:
        acc = operands[0]
        for x in operands[1:]:
            acc = self.f.value(cls, op, acc, x)
        if not acc.startswith("%"):
            acc = self.f.value(cls, "mov.f32" if cls == "f32" else "mov.b32", acc)
        return acc

    def _add(self, e: Any, want: str, ops: dict[str, str], cls: str) -> str:
        acc: str | None = None
        for term in e.args:
            coeff, rest = term.as_coeff_Mul()
            negated = coeff.is_negative and not (coeff == -1 and rest == 1)
            operand = self.emit(-term if negated else term, want)
            if acc is None:
                acc = self.f.value(cls, ops["neg"], self.register(operand, want)) if negated \
                    else operand
            else:
                acc = self.f.value(cls, ops["sub" if negated else "add"], acc, operand)
        assert acc is not None
        return self.register(acc, want)

    def _mul(self, e: Any, want: str, ops: dict[str, str], cls: str) -> str:
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:  # -x is a negation, not a multiplication
            return self.f.value(cls, ops["neg"], self.register(self.emit(rest, want), want))
        num, den = [], []
        for factor in e.args:
            if isinstance(factor, sp.Pow) and factor.exp.is_number and factor.exp < 0 \
                    and want == "float":
                den.append(self.emit(factor.base ** -factor.exp, want))
            else:
                num.append(self.emit(factor, want))
        if not den:
            return self._fold(ops["mul"], num, cls)
        d = self._fold(ops["mul"], den, cls)
        if not num:
            return self.f.value(cls, ops["rcp"], d)
        return self.f.value(cls, ops["div"], self._fold(ops["mul"], num, cls), d)

    def _pow(self, e: Any, want: str, ops: dict[str, str], cls: str) -> str:
        n = e.exp
        if not n.is_number or not float(2 * n).is_integer():
            raise BackendError(f"PTX: exponent {n} needs legalization (in {e})")
        base = self.register(self.emit(e.base, want), want)
        if want != "float" and not n.is_Integer:
            raise BackendError(f"PTX: integer power with exponent {n}")
        half = not float(n).is_integer()
        whole = int(abs(float(n)) - (0.5 if half else 0))
        value = self._power(base, whole, ops, cls) if whole else None
        if half:
            root = self.f.value(cls, ops["sqrt"], base)
            value = root if value is None else self.f.value(cls, ops["mul"], value, root)
        if value is None:  # x**0
            return self._number(sp.S.One, want)
        if n < 0:
            if want != "float":
                raise BackendError(f"PTX: negative integer power {e}")
            value = self.f.value(cls, ops["rcp"], value)
        return value

    def _power(self, base: str, n: int, ops: dict[str, str], cls: str) -> str:
        """base**n for n >= 1 by repeated squaring."""
        result: str | None = None
        square = base
        while n:
            if n & 1:
                result = square if result is None else self.f.value(cls, ops["mul"], result,
                                                                    square)
            n >>= 1
            if n:
                square = self.f.value(cls, ops["mul"], square, square)
        assert result is not None
        return result

    def _piecewise(self, e: Any, want: str, ops: dict[str, str], cls: str) -> str:
        *cases, (last, cond) = e.args
        if cond is not sp.true:
            raise BackendError(f"PTX: Piecewise without an otherwise branch: {e}")
        out = self.emit(last, want)
        for value, c in reversed(cases):
            p = self.emit(c, "bool")
            out = self.f.value(cls, ops["select"], self.emit(value, want), out, p)
        return self.register(out, want)

    def _cast(self, e: Any, want: str) -> str:
        (a,) = e.args
        src = self.kind_of(a)
        if src == "number":
            return self._number(a, want)
        x = self.emit(a, src)
        if src == want:
            return x
        if src == "bool":
            one, zero = ("0f3F800000", "0f00000000") if want == "float" else ("1", "0")
            return self.f.value(KIND_REGISTER[want], self.float_ops["select"] if want == "float"
                                else INT_OPS["select"], one, zero, x)
        op = "cvt.rn.f32.s32" if want == "float" else "cvt.rzi.s32.f32"
        return self.f.value(KIND_REGISTER[want], op, self.register(x, src))

    def _bool(self, e: Any) -> str:
        if isinstance(e, BooleanAtom):
            flag = self.f.value("b32", "mov.b32", "1" if e is sp.true else "0")
            return self.f.value("pred", "setp.ne.b32", flag, "0")
        if isinstance(e, sp.Rel):
            return self._compare(e)
        if isinstance(e, ToBool):
            (a,) = e.args
            src = self.kind_of(a)
            if src == "bool":
                return self.emit(a, "bool")
            if src == "float":
                return self.f.value("pred", "setp.neu.f32", self.emit(a, "float"), "0f00000000")
            return self.f.value("pred", "setp.ne.s32", self.emit(a, "int"), "0")
        if isinstance(e, sp.Not):
            return self.f.value("pred", BOOL_OPS["not"], self.emit(e.args[0], "bool"))
        if type(e) in BOOL_NARY:
            return self._fold(BOOL_OPS[BOOL_NARY[type(e)]],
                              [self.emit(a, "bool") for a in e.args], "pred")
        if isinstance(e, sp.ITE | Select):
            return self._select_pred(*(self.emit(x, "bool") for x in e.args))
        if isinstance(e, sp.Piecewise):
            *cases, (last, cond) = e.args
            if cond is not sp.true:
                raise BackendError(f"PTX: Piecewise without an otherwise branch: {e}")
            out = self.emit(last, "bool")
            for value, c in reversed(cases):
                out = self._select_pred(self.emit(c, "bool"), self.emit(value, "bool"), out)
            return out
        raise BackendError(f"PTX: no instruction for bool {type(e).__name__} (in {e})")

    def _select_pred(self, p: str, a: str, b: str) -> str:
        """p ? a : b on predicates: (p and a) or (not p and b)."""
        not_p = self.f.value("pred", BOOL_OPS["not"], p)
        first = self.f.value("pred", BOOL_OPS["and"], p, a)
        second = self.f.value("pred", BOOL_OPS["and"], not_p, b)
        return self.f.value("pred", BOOL_OPS["or"], first, second)

    def _compare(self, e: Any) -> str:
        kinds = {self.kind_of(e.lhs), self.kind_of(e.rhs)} - {"number"}
        if kinds == {"int"}:
            kind, op, suffix = "int", COMPARE[e.rel_op], "s32"
        elif kinds <= {"float"}:
            kind, op, suffix = "float", FLOAT_COMPARE[e.rel_op], "f32"
        else:
            raise BackendError(f"PTX: cannot compare {' and '.join(sorted(kinds))} in {e}")
        a, b = self.emit(e.lhs, kind), self.emit(e.rhs, kind)
        if not a.startswith("%") and not b.startswith("%"):
            a = self.register(a, kind)
        return self.f.value("pred", f"setp.{op}.{suffix}", a, b)
