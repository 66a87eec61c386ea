"""A small PTX interpreter for tests: runs a launch plan's kernels without a GPU.

It executes the subset of PTX the renderer emits for reductions, row chains, convolution
gathers and the GEMM kernels (integer index arithmetic, f32, v2, v4 and u8 loads and
stores, IEEE-rounded arithmetic, ex2/lg2, predicates, branches, ``shfl.sync.bfly``,
shared memory and ``bar.sync``, ``atom.global.add.u32`` one thread after another,
``membar.gl`` as a no-op since every store lands at once) over every thread of a launch
at once, NumPy vectors of registers, one instruction at a time for the threads at the
lowest program counter ("min-PC" scheduling: a thread that leaves a loop early waits
where the others will join it, as a warp reconverges; a ``bar.sync`` that part of a
block would pass alone raises). Anything outside the subset raises, so a test can never
pass by skipping what it does not understand. Memory is one byte heap with the arenas at
fake addresses; an access outside every arena raises, and so do threads storing
different values to one address in one instruction (a race); each block has its own
shared memory. ``fma.rn.f32`` is computed in float64 (the product is exact there; the
sum is rounded twice, which can differ from one rounding in the last bit, rarely). A
``Gemm`` step runs its fallback kernel, with ``gemm="tiled"`` its most split
register-tiled kernel (``"thin"``: thin kernel), or, with ``gemm="numpy"``,
alpha·product + beta·C (+ bias, ReLU) in float64 rounded to float32 (what a vendor
library computes, up to its order of additions; C unread when beta is 0)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferrograd.codegen.launch_plan import (
    BufferRef,
    DeviceModule,
    DevicePlan,
    Gemm,
    Launch,
    ScalarArg,
)

REG_DTYPES = {"%p": np.bool_, "%r": np.uint32, "%f": np.float32, "%rd": np.uint64}
ELEM_BYTES = {"f32": 4, "i32": 4, "u32": 4, "bool": 1}
INT_BINARY = {"add.u32": np.add, "sub.u32": np.subtract, "mul.lo.u32": np.multiply,
              "min.u32": np.minimum, "and.b32": np.bitwise_and, "rem.u32": np.remainder,
              "div.u32": np.floor_divide, "shr.u32": np.right_shift, "add.s64": np.add,
              "add.s32": np.add, "mul.lo.s32": np.multiply}
FLOAT_BINARY = {"add.rn.f32": np.add, "sub.rn.f32": np.subtract, "mul.rn.f32": np.multiply,
                "div.rn.f32": np.divide, "max.NaN.f32": np.maximum, "min.NaN.f32": np.minimum,
                "max.f32": np.fmax}
# unary float ops, in float64 then rounded once (the hardware's ex2/lg2.approx are within
# 2 ulp of that; the tests compare with NumPy within tolerances, or kernel with kernel)
FLOAT_UNARY = {"neg.f32": np.negative, "abs.f32": np.abs, "sqrt.rn.f32": np.sqrt,
               "rcp.rn.f32": np.reciprocal, "ex2.approx.f32": np.exp2,
               "lg2.approx.f32": np.log2, "cvt.rmi.f32.f32": np.floor,
               "cvt.rni.f32.f32": np.rint}
PRED_BINARY = {"and.pred": np.logical_and, "or.pred": np.logical_or,
               "xor.pred": np.logical_xor}
COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
           "eq": np.equal, "ne": np.not_equal}


@dataclass
class Instruction:
    op: str
    operands: list[str]
    guard: str | None  # "%p1" or "!%p1"


@dataclass
class Entry:
    """One ``.entry`` of the module, parsed."""

    params: list[str]
    code: list[Instruction]
    labels: dict[str, int]  # label -> instruction index
    shared: dict[str, int]  # shared array -> byte offset in the block's shared memory
    shared_bytes: int


def parse_entries(source: str) -> dict[str, Entry]:
    """entry name -> its parameters, instructions, labels and shared arrays."""
    out = {}
    for m in re.finditer(r"\.visible \.entry (\w+)\((.*?)\)\s*\{(.*?)\n\}", source, re.S):
        params = re.findall(r"\.param \.\w+ (\w+)", m.group(2))
        code: list[Instruction] = []
        labels: dict[str, int] = {}
        shared: dict[str, int] = {}
        shared_bytes = 0
        for line in m.group(3).splitlines():
            line = line.strip()
            if not line or line.startswith(("//", ".reg")):
                continue
            if line.endswith(":"):
                labels[line[:-1]] = len(code)
                continue
            array = re.fullmatch(r"\.shared \.align (\d+) \.b8 (\w+)\[(\d+)\];", line)
            if array:
                align, name, size = int(array.group(1)), array.group(2), int(array.group(3))
                shared[name] = -(-shared_bytes // align) * align
                shared_bytes = shared[name] + size
                continue
            if line.startswith("."):
                raise NotImplementedError(f"ptx_sim: directive {line!r}")
            guard = None
            if line.startswith("@"):
                guard, line = line[1:].split(None, 1)
            op, _, rest = line.rstrip(";").partition(" ")
            operands = [o.strip() for o in re.split(r",(?![^{]*\})", rest)] if rest else []
            code.append(Instruction(op, operands, guard))
        out[m.group(1)] = Entry(params, code, labels, shared, shared_bytes)
    return out


class Machine:
    """Arenas of a ``DeviceModule`` on a fake device, and its plans' launches."""

    def __init__(self, module: DeviceModule, elem: dict[str, str], fill: float = np.nan,
                 gemm: str = "fallback") -> None:
        """``elem``: the element dtype of each arena (inputs included); f32 arenas start
        filled with ``fill`` (NaN: a result no kernel wrote shows). ``gemm``: how GEMM
        steps run, "fallback" (the plan's kernel), "tiled" (its most split register-tiled
        kernel, else the fallback), "thin" (likewise its most split thin kernel) or
        "numpy"."""
        assert gemm in ("fallback", "numpy", "tiled", "thin")
        self.module, self.gemm_mode = module, gemm
        self.entries = parse_entries(module.source)
        self.base: dict[str, int] = {}
        self.elem = elem
        size = 256
        for name, n in module.arena_sizes.items():
            self.base[name] = size
            size += (max(n, 1) * ELEM_BYTES[elem[name]] + 255) // 256 * 256
        self.heap = np.zeros(size, np.uint8)
        for name in module.arena_sizes:
            if elem[name] == "f32":
                self.array(name)[:] = fill
        for name, data in module.consts.items():
            if data:
                self.heap[self.base[name]:self.base[name] + len(data)] = np.frombuffer(data,
                                                                                        np.uint8)

    def array(self, arena: str) -> np.ndarray:
        """The arena's elements, a writable view of the heap."""
        dtype = {"f32": np.float32, "i32": np.int32, "u32": np.uint32, "bool": np.uint8}
        n = max(self.module.arena_sizes[arena], 1) * ELEM_BYTES[self.elem[arena]]
        return self.heap[self.base[arena]:self.base[arena] + n].view(dtype[self.elem[arena]])

    def address(self, ref: BufferRef) -> int:
        return self.base[ref.arena] + ref.offset * ELEM_BYTES[self.elem[ref.arena]]

    def run_plan(self, plan: DevicePlan, order: list[int] | None = None) -> None:
        """The plan's steps, in list order or in ``order`` (step indices)."""
        for i in range(len(plan.steps)) if order is None else order:
            step = plan.steps[i]
            if isinstance(step, Launch):
                self.launch(step)
            elif self.gemm_mode == "numpy":
                self.gemm(step)
            elif self.gemm_mode in ("tiled", "thin") and self.candidates(step):
                self.launch(max(self.candidates(step), key=lambda t: t.grid[2]))
            else:
                assert step.fallback is not None
                self.launch(step.fallback)

    def candidates(self, step: Gemm) -> list[Launch]:
        """The step's generated kernels of the ``gemm`` mode's family."""
        thin = ("_warp_rows_", "_thread_rows_", "_short_k_")
        return [t for t in step.tiled
                if any(x in t.kernel for x in thin) == (self.gemm_mode == "thin")]

    def launch(self, step: Launch) -> None:
        entry = self.entries[step.kernel]
        values = []
        for a in step.args:
            if isinstance(a, ScalarArg):
                if a.kind not in ("u32", "f32"):
                    raise NotImplementedError(f"ptx_sim: {a.kind} arguments")
                values.append(int(a.value) if a.kind == "u32" else float(a.value))
            else:
                values.append(self.address(a))
        Threads(self, dict(zip(entry.params, values, strict=True)), entry, step.grid,
                step.block).run()

    def matrix(self, ref: BufferRef, strides: tuple[int, ...], shape: tuple[int, ...]
               ) -> np.ndarray:
        """A strided f32 view into ``ref``'s arena (element strides)."""
        arena = self.array(ref.arena)
        return np.lib.stride_tricks.as_strided(arena[ref.offset:], shape,
                                               tuple(4 * s for s in strides))

    def gemm(self, g: Gemm) -> None:
        if g.outer != 1:
            raise NotImplementedError("ptx_sim: GEMMs with outer batches")
        a = self.matrix(g.a, g.a_strides, (g.batch, g.m, g.k)).astype(np.float64)
        b = self.matrix(g.b, g.b_strides, (g.batch, g.k, g.n)).astype(np.float64)
        c = self.matrix(g.c, g.c_strides, (g.batch, g.m, g.n))
        result = g.alpha * np.matmul(a, b)
        if g.beta != 0:  # as BLAS: C is not read otherwise (it may hold NaN)
            result += g.beta * c.astype(np.float64)
        if g.bias is not None:  # cuBLASLt's epilogue: + bias[col], then ReLU
            result += self.matrix(g.bias, (0, 0, 1), (1, 1, g.n))
            if g.relu:
                result = np.maximum(result, 0)
        c[...] = result.astype(np.float32)


class Threads:
    """Every thread of one launch, as vectors."""

    def __init__(self, m: Machine, params: dict[str, int], entry: Entry,
                 grid: tuple[int, int, int], block: tuple[int, int, int]) -> None:
        threads = block[0] * block[1] * block[2]
        if threads % 32:
            raise NotImplementedError("ptx_sim: blocks of whole warps")
        self.m, self.params, self.code, self.labels = m, params, entry.code, entry.labels
        n = grid[0] * grid[1] * grid[2] * threads
        g = np.arange(n, dtype=np.uint32)
        blk, t = g // threads, g % threads
        self.special = {"%tid.x": t % block[0], "%tid.y": t // block[0] % block[1],
                        "%ctaid.x": blk % grid[0], "%ctaid.y": blk // grid[0] % grid[1],
                        "%ctaid.z": blk // (grid[0] * grid[1])}
        for axis, (gs, bs) in zip("xyz", zip(grid, block, strict=True), strict=True):
            self.special[f"%ntid.{axis}"] = np.full(n, bs, np.uint32)
            self.special[f"%nctaid.{axis}"] = np.full(n, gs, np.uint32)
        self.block_of = blk
        self.shared_names = entry.shared
        self.shared_bytes = entry.shared_bytes
        self.shared = np.zeros(max(entry.shared_bytes, 1) * grid[0] * grid[1] * grid[2],
                               np.uint8)
        self.n = n
        self.regs: dict[str, np.ndarray] = {}
        self.pc = np.zeros(n, np.int64)
        self.live = np.ones(n, bool)

    def reg(self, name: str) -> np.ndarray:
        if name not in self.regs:
            prefix = re.match(r"%[a-z]+", name)
            assert prefix is not None, name
            self.regs[name] = np.zeros(self.n, REG_DTYPES[prefix.group(0)])
        return self.regs[name]

    def value(self, operand: str, dtype: Any, sel: np.ndarray) -> np.ndarray:
        """An operand's values for the threads ``sel``, as ``dtype``."""
        if operand in self.special:
            return self.special[operand][sel].astype(dtype)
        if operand in self.shared_names:  # a shared array's address
            return np.full(int(sel.sum()), self.shared_names[operand]).astype(dtype)
        if operand.startswith("%"):
            return self.reg(operand)[sel].astype(dtype) if self.reg(operand).dtype != dtype \
                else self.reg(operand)[sel]
        if operand.startswith("0f"):
            bits = int(operand[2:], 16)
            return np.full(int(sel.sum()), struct.unpack("<f", struct.pack("<I", bits))[0],
                           np.float32)
        return np.full(int(sel.sum()), int(operand, 0)).astype(dtype)

    def set(self, name: str, sel: np.ndarray, values: np.ndarray) -> None:
        reg = self.reg(name)
        reg[sel] = values.astype(reg.dtype)

    def memory(self, operand: str, sel: np.ndarray, nbytes: int, align: int = 1
               ) -> np.ndarray:
        """Byte addresses of ``[reg+imm]`` for ``sel``, checked against the arenas (and,
        for a vector access, its alignment)."""
        inner = operand.strip("[]")
        reg, _, imm = inner.partition("+")
        addr = self.value(reg, np.uint64, sel).astype(np.int64) + int(imm or 0)
        ok = np.zeros(addr.shape, bool)
        for name, base in self.m.base.items():
            size = self.m.module.arena_sizes[name] * ELEM_BYTES[self.m.elem[name]]
            ok |= (addr >= base) & (addr + nbytes <= base + size)
        if not ok.all():
            raise IndexError(f"ptx_sim: access outside every arena at {addr[~ok][:4]}")
        if (addr % align).any():
            raise IndexError(f"ptx_sim: a {nbytes}-byte access at {addr[addr % align != 0][:4]}"
                             " is not aligned to its size")
        return addr

    def run(self) -> None:
        while self.live.any():
            pc = int(self.pc[self.live].min())
            sel = self.live & (self.pc == pc)
            ins = self.code[pc]
            if ins.guard:
                p = self.reg(ins.guard.lstrip("!"))
                run = sel & (~p if ins.guard.startswith("!") else p)
            else:
                run = sel
            self.pc[sel] = pc + 1
            if ins.op == "ret":
                self.live[run] = False
            elif ins.op == "bra":
                self.pc[run] = self.labels[ins.operands[0]]
            elif ins.op == "bar.sync":
                self.barrier(run)
            elif run.any():
                self.execute(ins, run)

    @staticmethod
    def check_one_value_per_address(addr: np.ndarray, words: np.ndarray) -> None:
        """Threads storing different values to one address in one instruction race (a
        GPU keeps one of them, which one it does not say): an error here."""
        order = np.argsort(addr, kind="stable")
        same = addr[order][1:] == addr[order][:-1]
        if (same & (words[order][1:] != words[order][:-1])).any():
            raise AssertionError("ptx_sim: threads store different values to one address "
                                 "in one instruction")

    def barrier(self, run: np.ndarray) -> None:
        """Under min-PC scheduling the threads here wait for every thread at a lower PC,
        so a barrier is right when no live thread of a block it holds is elsewhere."""
        blocks = np.unique(self.block_of[run])
        waiting = np.isin(self.block_of, blocks) & self.live
        if not np.array_equal(waiting, run & self.live):
            raise AssertionError("ptx_sim: bar.sync reached by part of a block")

    def shared_address(self, operand: str, sel: np.ndarray, nbytes: int) -> np.ndarray:
        """Byte offsets into the shared memory of all blocks, checked against the block's."""
        reg, _, imm = operand.strip("[]").partition("+")
        addr = self.value(reg, np.uint64, sel).astype(np.int64) + int(imm or 0)
        if ((addr < 0) | (addr + nbytes > self.shared_bytes)).any():
            raise IndexError("ptx_sim: shared access outside the block's arrays")
        return addr + self.block_of[sel].astype(np.int64) * self.shared_bytes

    def execute(self, ins: Instruction, run: np.ndarray) -> None:
        op, o = ins.op, ins.operands
        if op == "mov.b32" and o[1].startswith("%") and \
                self.reg(o[0]).dtype != self.reg(o[1]).dtype:  # f32 <-> b32: the bits
            self.set(o[0], run, self.reg(o[1])[run].view(self.reg(o[0]).dtype))
        elif op in ("mov.u32", "mov.b32", "mov.f32", "cvta.to.global.u64"):
            self.set(o[0], run, self.value(o[1], self.reg(o[0]).dtype, run))
        elif op in ("ld.param.u64", "ld.param.u32", "ld.param.f32"):
            self.set(o[0], run, np.full(int(run.sum()), self.params[o[1].strip("[]")]))
        elif op in INT_BINARY:
            t = np.uint64 if op.endswith("64") else np.uint32
            self.set(o[0], run, INT_BINARY[op](self.value(o[1], t, run), self.value(o[2], t, run)))
        elif op == "mad.lo.u32":
            a, b, c = (self.value(x, np.uint32, run) for x in o[1:])
            self.set(o[0], run, a * b + c)
        elif op == "fma.rn.f32":
            a, b, c = (self.value(x, np.float32, run).astype(np.float64) for x in o[1:])
            with np.errstate(all="ignore"):
                self.set(o[0], run, (a * b + c).astype(np.float32))
        elif op in PRED_BINARY:
            self.set(o[0], run, PRED_BINARY[op](self.reg(o[1])[run], self.reg(o[2])[run]))
        elif op == "not.pred":
            self.set(o[0], run, ~self.reg(o[1])[run])
        elif op in FLOAT_UNARY:
            with np.errstate(all="ignore"):
                x = self.value(o[1], np.float32, run).astype(np.float64)
                self.set(o[0], run, FLOAT_UNARY[op](x).astype(np.float32))
        elif op == "mul.wide.u32":
            self.set(o[0], run, self.value(o[1], np.uint64, run) * self.value(o[2], np.uint64, run))
        elif op in FLOAT_BINARY:
            with np.errstate(all="ignore"):
                self.set(o[0], run, FLOAT_BINARY[op](self.value(o[1], np.float32, run),
                                                     self.value(o[2], np.float32, run)))
        elif op.startswith("setp."):
            parts = op.split(".")
            cmp, kind = parts[1], parts[-1]
            t = {"u32": np.uint32, "s32": np.int32, "f32": np.float32, "b32": np.uint32}[kind]
            p = COMPARE[cmp](self.value(o[1], t, run), self.value(o[2], t, run))
            if len(parts) == 4:  # setp.cmp.and.type d, a, b, c: d = (a cmp b) and c
                if parts[2] != "and":
                    raise NotImplementedError(f"ptx_sim: {op}")
                p &= self.reg(o[3])[run]
            self.set(o[0], run, p)
        elif op in ("selp.f32", "selp.b32"):
            t = self.reg(o[0]).dtype
            self.set(o[0], run, np.where(self.reg(o[3])[run], self.value(o[1], t, run),
                                         self.value(o[2], t, run)))
        elif op == "membar.gl":
            pass  # every thread's stores land at once here: the order a fence asks for
        elif op == "atom.global.add.u32":  # one thread after another, in thread order
            addr = self.memory(o[1], run, 4, 4)
            old = np.empty(len(addr), np.uint32)
            for i, at in enumerate(addr):
                word = self.m.heap[at:at + 4].view(np.uint32)
                old[i] = word[0]
                word[0] = old[i] + self.value(o[2], np.uint32, run)[i]
            self.set(o[0], run, old)
        elif op in ("ld.global.f32", "ld.global.b32", "ld.global.cg.f32"):
            addr = self.memory(o[1], run, 4)
            word = self.m.heap[addr[:, None] + np.arange(4)].copy().view(np.uint32)[:, 0]
            self.set(o[0], run, word.view(np.float32) if op.endswith("f32") else word)
        elif op in ("ld.global.v2.f32", "ld.global.v4.f32", "ld.global.v4.b32"):
            width = 4 * int(op.split(".")[2][1:])  # bytes: 8 or 16, and aligned to them
            addr = self.memory(o[1], run, width, width)
            words = self.m.heap[addr[:, None] + np.arange(width)].copy().view(np.uint32)
            for lane, reg in enumerate(o[0].strip("{}").split(",")):
                word = words[:, lane]
                self.set(reg.strip(), run, word.view(np.float32) if op.endswith("f32") else word)
        elif op in ("st.global.v2.f32", "st.global.v4.f32", "st.global.v4.b32"):
            width = 4 * int(op.split(".")[2][1:])
            addr = self.memory(o[0], run, width, width)
            for lane, reg in enumerate(o[1].strip("{}").split(",")):
                data = np.ascontiguousarray(self.reg(reg.strip())[run]).view(np.uint8)
                self.m.heap[addr[:, None] + 4 * lane + np.arange(4)] = data.reshape(-1, 4)
        elif op == "ld.global.u8":
            self.set(o[0], run, self.m.heap[self.memory(o[1], run, 1)].astype(np.uint32))
        elif op == "st.global.u8":
            self.m.heap[self.memory(o[0], run, 1)] = self.value(o[1], np.uint32, run).astype(
                np.uint8)
        elif op == "st.global.u32":  # a register or an immediate (the error flags)
            addr = self.memory(o[0], run, 4)
            data = np.ascontiguousarray(self.value(o[1], np.uint32, run), np.uint32)
            self.m.heap[addr[:, None] + np.arange(4)] = data.view(np.uint8).reshape(-1, 4)
        elif op in ("st.global.f32", "st.global.b32", "st.global.cg.f32"):
            addr = self.memory(o[0], run, 4)  # a register, or an immediate (zero fills)
            word = self.reg(o[1])[run] if o[1].startswith("%") else self.value(o[1], np.uint32,
                                                                                run)
            data = np.ascontiguousarray(word).view(np.uint8).reshape(-1, 4)
            self.check_one_value_per_address(addr, data.view(np.uint32)[:, 0])
            self.m.heap[addr[:, None] + np.arange(4)] = data
        elif op == "red.global.add.f32":  # atomic adds, applied in thread order
            addr = self.memory(o[0], run, 4)
            assert (addr % 4 == 0).all(), "unaligned atomic add"
            np.add.at(self.m.heap.view(np.float32), addr // 4,
                      self.value(o[1], np.float32, run))
        elif op in ("ld.shared.f32", "ld.shared.u32"):
            addr = self.shared_address(o[1], run, 4)
            word = self.shared[addr[:, None] + np.arange(4)].copy().view(np.uint32)[:, 0]
            self.set(o[0], run, word.view(np.float32) if op.endswith("f32") else word)
        elif op in ("st.shared.f32", "st.shared.u32"):
            addr = self.shared_address(o[0], run, 4)
            data = np.ascontiguousarray(self.reg(o[1])[run]).view(np.uint8).reshape(-1, 4)
            self.shared[addr[:, None] + np.arange(4)] = data
        elif op == "shfl.sync.bfly.b32":
            if o[3] != "0x1f" or o[4] != "0xffffffff":
                raise NotImplementedError(f"ptx_sim: {op} {o}")
            if not np.array_equal(run, np.repeat(run.reshape(-1, 32).any(1), 32)):
                raise AssertionError("ptx_sim: shfl.sync with part of a warp")
            src = self.reg(o[1]).copy()
            partner = np.arange(self.n) ^ int(o[2], 0)
            self.set(o[0], run, src[partner][run])
        else:
            raise NotImplementedError(f"ptx_sim: no semantics for {op}")
