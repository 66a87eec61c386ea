"""The WGSL backend's device module: storage layout, shaders and launch plans.

``render_wgsl`` turns the schedules of a model into a ``WgslModule`` (a
``launch_plan.DeviceModule`` with the shaders kept apart): every kernel becomes
one compute shader (``wgsl_kernels.py``), identical shaders are kept once, and
each entry point gets a ``DevicePlan`` of ``Launch``es in order.

Storage (the contract with ``ferrograd_runtime::wgsl`` and with any other
WebGPU host, see ``wgsl_crate.manifest``): the arenas of the memory plan are regions of
three storage buffers, each region starting at a multiple of ``REGION_ALIGN``
elements:

- ``f32s`` (binding 0): param, state, temp_f32, const_f32, then one region per
  f32 input;
- ``i32s`` (binding 1): temp_i32, const_i32, then the i32 inputs;
- ``bools`` (binding 2, one u32 per bool): temp_bool, const_bool;
- ``status`` (binding 3): one atomic u32, nonzero when a gather or scatter-add
  met an id out of range.

A shader addresses element ``base(arena) + offset`` directly: offsets are baked
into its text, so a dispatch needs no arguments, only its workgroup counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ferrograd._version import __version__
from ferrograd.ir.errors import BackendError
from ferrograd.ir.graph import Graph

from ..kernel_ir import unfused
from ..launch_plan import BufferRef, DeviceModule, DevicePlan, Launch
from ..memory import MemoryPlan
from ..schedule import Schedule
from .ptx import const_layout
from .wgsl_kernels import ARRAYS, ShaderCode, render_kernel

REGION_ALIGN = 64  # elements: 256 bytes, WebGPU's minStorageBufferOffsetAlignment
ARRAY_ORDER = {"f32s": ("param", "state", "temp_f32", "const_f32"),
               "i32s": ("temp_i32", "const_i32"), "bools": ("temp_bool", "const_bool")}


@dataclass
class Storage:
    """Where each arena lives: arena -> (array, first element, elements)."""

    regions: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # array -> elements

    def base(self, arena: str) -> int:
        return self.regions[arena][1]

    def address(self, ref: BufferRef) -> tuple[str, int]:
        """(array, element) of a buffer reference."""
        array, base, _ = self.regions[ref.arena]
        return array, base + ref.offset


@dataclass
class WgslModule(DeviceModule):
    """A ``DeviceModule`` whose device code is one WGSL shader per distinct kernel.

    ``source`` joins the shaders (for reading); ``shaders`` keeps them apart, by name
    (the first kernel that uses each); ``kernels`` maps every kernel to its shader and
    ``dispatched`` names the kernel of each launch of a plan (a kernel over an empty
    space launches nothing); ``storage`` places the arenas in the storage buffers.
    A ``Launch``'s ``kernel`` is a shader name, ``grid`` its workgroup counts,
    ``block`` its workgroup size, and ``args`` the buffers it touches (for people:
    the offsets are in the shader)."""

    shaders: dict[str, ShaderCode] = field(default_factory=dict)
    kernels: dict[str, str] = field(default_factory=dict)
    dispatched: dict[str, list[str]] = field(default_factory=dict)  # entry -> its plan's kernels
    storage: Storage = field(default_factory=Storage)
    persistent: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # as MemoryPlan
    model: str = ""


def _round(n: int) -> int:
    return (n + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN


def plan_storage(arena_sizes: dict[str, int], input_dtypes: dict[str, str]) -> Storage:
    storage = Storage()
    arrays = {a: list(order) for a, order in ARRAY_ORDER.items()}
    for name, dtype in input_dtypes.items():
        if dtype == "bool":
            raise BackendError(f"input {name!r}: bool inputs are not supported by compiled "
                               "backends yet; pass a float32 or int32 array")
        arrays[ARRAYS[dtype]].append(f"input:{name}")
    for array, arenas in arrays.items():
        at = 0
        for arena in arenas:
            n = arena_sizes.get(arena, 0)
            storage.regions[arena] = (array, at, n)
            at += _round(n)
        storage.sizes[array] = at
    return storage


def _arena_sizes(graph: Graph, plan: MemoryPlan, const_sizes: dict[str, int]
                 ) -> dict[str, int]:
    sizes = {"param": plan.persistent_size.get("param", 0),
             "state": plan.persistent_size.get("state", 0)}
    for dtype in ("f32", "i32", "bool"):
        sizes[f"temp_{dtype}"] = plan.arena.get(dtype, 0)
        sizes[f"const_{dtype}"] = const_sizes[dtype]
    for name, nid in graph.inputs.items():  # every input is written, used or not
        sizes[f"input:{name}"] = graph.node(nid).size
    return sizes


def _input_name(buffer: str) -> str:
    return buffer.removeprefix("input_")


class _Refs:
    """Buffer name -> arena reference, for one entry point."""

    def __init__(self, s: Schedule, plan: MemoryPlan, const_at: dict[str, int],
                 storage: Storage) -> None:
        self.s, self.plan, self.const_at, self.storage = s, plan, const_at, storage

    def ref(self, name: str) -> BufferRef:
        buf = self.s.buffers[name]
        if buf.kind == "input":
            return BufferRef(f"input:{_input_name(name)}", 0)
        if buf.kind in ("param", "state"):
            return BufferRef(buf.kind, self.plan.persistent[name][1])
        if buf.kind == "const":
            return BufferRef(f"const_{buf.dtype}", self.const_at[name])
        return BufferRef(f"temp_{buf.dtype}", self.plan.temps[self.s.entry][name].offset)

    def element(self, name: str) -> int:
        """The element of its storage array where buffer ``name`` starts."""
        return self.storage.address(self.ref(name))[1]


def render_wgsl(graph: Graph, schedules: list[Schedule], plan: MemoryPlan) -> WgslModule:
    """The WGSL shaders of ``schedules`` and the launch plan of each entry point."""
    const_data, const_at, const_sizes = const_layout(schedules)
    input_dtypes = {name: graph.node(nid).dtype for name, nid in graph.inputs.items()}
    storage = plan_storage(_arena_sizes(graph, plan, const_sizes), input_dtypes)
    module = WgslModule("", {}, {}, const_data, storage=storage,
                        persistent=dict(plan.persistent), model=graph.name)
    by_source: dict[str, str] = {}
    for s in schedules:
        refs = _Refs(s, plan, const_at, storage)
        device_plan = DevicePlan(s.entry)
        module.dispatched[s.entry] = []
        # Epilogues run as shaders of their own after their product (not fused yet).
        for k in (part for kernel in s.kernels for part in unfused(kernel)):
            code = render_kernel(k, refs.element)
            name = by_source.setdefault(code.source, k.name)
            if name == k.name:
                module.shaders[name] = code
            module.kernels[k.name] = name
            buffers = dict.fromkeys(v.buffer for v in (*k.reads(), *k.writes()))
            if code.groups[0] > 0:  # an empty iteration space dispatches nothing
                module.dispatched[s.entry].append(k.name)
                device_plan.steps.append(Launch(name, code.groups, code.workgroup_size,
                                                tuple(refs.ref(b) for b in buffers),
                                                code.shared_bytes))
        for key, buf in s.results.items():
            ref = refs.ref(buf)
            shape = graph.node(graph.results()[key]).shape
            device_plan.results[key] = (ref.arena, ref.offset, tuple(shape))
        module.plans[s.entry] = device_plan
    module.arena_sizes = {a: n for a, (_, _, n) in storage.regions.items()}
    for name, code in module.shaders.items():
        code.source = f"// {name}: shader of model `{graph.name}`, generated by ferrograd " \
                      f"{__version__}.\n{code.source}"
    module.source = "\n".join(f"// ==== shaders/{name}.wgsl\n{code.source}"
                              for name, code in module.shaders.items())
    return module
