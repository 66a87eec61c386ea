"""Check the generated PTX on a real GPU against the NumPy interpreter.

Two halves, because the GPU machine has NumPy and CuPy but not ferrograd's
dependencies:

    python benches/gpu_ptx_check.py prepare OUTDIR   # here: render, draw, compute refs
    python3 benches/gpu_ptx_check.py run OUTDIR      # there: numpy + cupy only

``prepare`` writes, per case (every catalog example, the batched op table, 24
random graphs, a logic/casts model, a stress model of big and odd sizes and a
math-accuracy probe, exact and with fast math): the PTX for sm_80 and sm_90, the
launch plans as JSON, fresh random inputs, the initial params/state, and the
interpreter's results (forward outputs, gradients, the loss of two training
steps and the params and optimizer state after them).

``run`` loads each module with ``cupy.RawModule``, allocates the arenas, poisons
every temp (NaN, a bad int, 0xAB bytes) before each entry point, executes the
plans (every launch checked; GEMMs once through the fallback kernel and once
through cuBLAS via ``cupy.matmul`` on strided views), checks the error flag and
compares. It prints one line per case, target and GEMM mode (the worst relative
error), the probe's accuracy in ulps, and exits 1 on any mismatch.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-3  # elementwise, relative to the value ...
ATOL = 1e-4  # ... plus this, relative to the result's largest value ...
FLOOR = 1e-6  # ... plus this: a result that is exactly 0 in exact arithmetic (the key
# bias gradient of attention) is rounding noise of this size on both sides
TARGETS = ("sm_80", "sm_90")
ARENA_DTYPES = {"param": "f32", "state": "f32", "temp_f32": "f32", "temp_i32": "i32",
                "temp_bool": "bool", "const_f32": "f32", "const_i32": "i32",
                "const_bool": "bool", "flags_u32": "u32", "scratch_f32": "f32"}
NP_DTYPES = {"f32": np.float32, "i32": np.int32, "bool": np.uint8, "u32": np.uint32}


# ======================================================================================
# prepare (here, with ferrograd)
# ======================================================================================


def _cases() -> dict[str, Any]:
    for folder in (ROOT / "tests", ROOT / "examples", ROOT):  # this checkout's ferrograd
        sys.path.insert(0, str(folder))
    from catalog import MODELS
    from test_cpu_ops import all_rows, random_programs

    import ferrograd as fg

    cases: dict[str, Any] = {name: make for name, make in MODELS.items()}
    # Plain SGD, which no catalog model uses: the weight updates are the weight-gradient
    # GEMMs' own accumulation (alpha = -lr, beta = 1, C = the weight)
    cases["mlp_sgd"] = lambda: _with_optimizer(MODELS["mlp"], fg.optim.SGD(lr=0.1))
    cases["ops"] = lambda: (fg.model(all_rows), None, {})
    cases["random"] = lambda: (fg.model(random_programs(_random_batch())), None, {})
    cases["logic"] = lambda: (_logic_model(), None, {"N": 4096})
    cases["stress"] = lambda: (_stress_model(), fg.optim.Adam(lr=1e-3), {"B": 3, "T": 37})
    cases["probe"] = lambda: (_probe_model(), None, {"N": 1 << 16})
    cases["probe_fast"] = cases["probe"]  # the same, with fast_math=True: for the record
    return cases


def _with_optimizer(make: Any, optimizer: Any) -> tuple[Any, Any, dict[str, int]]:
    """A catalog entry's model and dims, trained with ``optimizer`` instead."""
    model, _, dims = make()
    return model, optimizer, dims


def _random_batch() -> list[Any]:
    """24 random programs (tests/test_random_graphs.py), drawn afresh."""
    import warnings

    from hypothesis import strategies as st
    from test_random_graphs import programs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .example() outside a test is fine here
        return st.lists(programs(), min_size=24, max_size=24).example()


def _logic_model() -> Any:
    import ferrograd as fg

    @fg.model
    def logic(x: fg.f32["N"], y: fg.f32["N"], m: fg.bool_["N"], k: fg.i32["N"]):
        pos = (x > 0) & m
        return {
            "where": fg.where(pos | (y < x), x * y, -x),
            "mask": ~pos | (x == y),
            "ints": fg.maximum(k * 3 - 7, k) + (x > y).astype("i32"),
            "cast": k.astype("f32") * x + m.astype("f32") - (x * 4).astype("i32").astype("f32"),
            "ne": (k != 2) & (x != y),
            "ge": (fg.minimum(k, 5) >= 2) | ((x <= y) & (x >= -1.0)),
            "nonzero": x.astype("bool"),
            "int_nonzero": k.astype("bool"),
        }

    return logic


def _stress_model() -> Any:
    """Sizes that reach every reduction mode, GEMM edge tiles, strided views, long
    gathers and a stride-2 padded conv, with a loss so that gradients cover them too."""
    import ferrograd as fg

    @fg.model
    def stress(x: fg.f32["B", "T", 700], ids: fg.i32["B", "T"], img: fg.f32["B", 3, 11, 9]):
        h = x + fg.nn.embedding(ids, 600, 700, name="emb")
        rows = h.sum(axis=2)  # a warp per row
        cols = h.max(axis=(0, 1))  # strided rows
        total = (h * h).mean()  # one block over everything
        y = fg.nn.linear(h, 45, name="proj")  # edge tiles: 111 x 45 x 700
        gram = fg.softmax(y @ y.transpose(0, 2, 1) * 0.01, axis=-1)  # batched, transposed
        tall = fg.param("tall", (40, 2100), init="normal")
        col_sums = (tall * tall).sum(axis=0)  # a thread per row: 2100 strided rows
        z = fg.relu(fg.nn.conv2d(img, 4, 3, stride=2, padding=1, name="conv"))
        z = fg.nn.conv2d(z, 5, 2, stride=2, padding=1, name="conv2")  # input grad, stride 2
        both = fg.concat([y[:, ::2, :], y[:, 1::2, :] * 2.0], axis=1)
        loss = (rows.mean() + cols.mean() + total + (gram * gram).sum() + col_sums.mean() * 1e-3
                + z.mean() + fg.layer_norm(both).mean() + both.sum() * 1e-3)
        return {"loss": loss, "cols": cols, "gram": gram, "z": z}

    return stress


PROBE = {  # output -> (input, function of float64 values, error bound in ulps)
    "exp": ("a", np.exp, 4.0),
    "log": ("b", np.log, 4.0),
    "log1p": ("c", np.log1p, 4.0),
    "tanh": ("d", np.tanh, 4.0),
    "erf": ("d", None, 4.0),
    "sin": ("e", np.sin, 4.0),
    "cos": ("e", np.cos, 4.0),
    "sqrt": ("b", np.sqrt, 0.5),
    "pow": ("f", lambda v: v ** 1.7, 32.0),  # about (|y log2 x| + 4) * 2^-22 relative
}


def _probe_model() -> Any:
    import ferrograd as fg

    @fg.model
    def probe(a: fg.f32["N"], b: fg.f32["N"], c: fg.f32["N"], d: fg.f32["N"],
              e: fg.f32["N"], f: fg.f32["N"]):
        return {"exp": fg.exp(a), "log": fg.log(b), "log1p": fg.log1p(c), "tanh": fg.tanh(d),
                "erf": fg.erf(d), "sin": fg.sin(e), "cos": fg.cos(e), "sqrt": fg.sqrt(b),
                "pow": f ** 1.7}

    return probe


def _probe_inputs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    def mix(*parts: np.ndarray) -> np.ndarray:
        v = np.concatenate(parts)
        return rng.permutation(np.resize(v, n)).astype(np.float32)

    q = n // 4
    return {
        "a": mix(rng.uniform(-87, 88, 2 * q), rng.uniform(-2, 2, q), rng.normal(0, 1e-3, q)),
        "b": mix(np.exp(rng.uniform(np.log(1e-30), np.log(1e30), 2 * q)),
                 rng.uniform(0.4, 2.5, 2 * q)),
        "c": mix(rng.uniform(-0.999, 3, 2 * q), rng.normal(0, 1e-4, q),
                 np.exp(rng.uniform(-5, np.log(1e6), q))),
        "d": mix(rng.uniform(-10, 10, 2 * q), rng.uniform(-1.2, 1.2, q), rng.normal(0, 1e-3, q)),
        "e": mix(rng.uniform(-1e4, 1e4, 2 * q), rng.uniform(-7, 7, 2 * q)),
        "f": mix(np.exp(rng.uniform(np.log(0.01), np.log(100), n))),
    }


def _feed(graph: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, nid in graph.inputs.items():
        node = graph.node(nid)
        if node.dtype == "i32":
            out[name] = rng.integers(0, graph.index_bounds.get(name, 4), node.shape,
                                     dtype=np.int32)
        elif node.dtype == "bool":
            out[name] = rng.random(node.shape) < 0.5
        else:
            out[name] = rng.normal(size=node.shape).astype(np.float32)
    return out


def _plan_json(plan: Any) -> dict[str, Any]:
    def arg(a: Any) -> dict[str, Any]:
        if hasattr(a, "arena"):
            return {"arena": a.arena, "offset": a.offset}
        return {"scalar": a.kind, "value": a.value}

    def launch(s: Any) -> dict[str, Any]:
        return {"kernel": s.kernel, "grid": list(s.grid), "block": list(s.block),
                "shared": s.shared_bytes, "args": [arg(a) for a in s.args]}

    steps = []
    for s in plan.steps:
        if hasattr(s, "kernel"):
            steps.append({"launch": launch(s)})
        else:
            steps.append({"gemm": {
                "batch": s.batch, "m": s.m, "n": s.n, "k": s.k,
                "a": arg(s.a), "a_strides": list(s.a_strides),
                "b": arg(s.b), "b_strides": list(s.b_strides),
                "c": arg(s.c), "c_strides": list(s.c_strides),
                "bias": arg(s.bias) if s.bias is not None else None, "relu": s.relu,
                "outer": s.outer, "outer_strides": list(s.outer_strides),
                "alpha": s.alpha, "beta": s.beta, "fallback": launch(s.fallback)}})
    return {"steps": steps, "results": {k: [a, o, list(sh)] for k, (a, o, sh) in
                                        plan.results.items()}}


def prepare(outdir: Path, only: list[str]) -> None:
    cases = _cases()
    from ferrograd.codegen.step import NumpyStep
    from ferrograd.dsl.init import init_params
    from ferrograd.ir.optim import init_state

    seed = int(time.time() * 1000) % (2**31)
    print(f"fresh inputs: seed {seed}")
    rng = np.random.default_rng(seed)
    outdir.mkdir(parents=True, exist_ok=True)
    import ferrograd as fg

    for name, make in cases.items():
        if only and name not in only:
            continue
        t0 = time.time()
        model, optimizer, dims = make()
        lw = fg.lower(model, optimizer=optimizer, backend="cpu", seed=3, **dims)
        case = outdir / name
        case.mkdir(exist_ok=True)
        fast = name.endswith("_fast")
        modules = {t: lw.device_module("ptx", target=t, fast_math=fast) for t in TARGETS}
        for t, m in modules.items():
            (case / f"module_{t}.ptx").write_text(m.source)
        module = modules["sm_80"]
        g = lw.graph
        params, state = init_params(g, 3), init_state(g)
        ref = NumpyStep(lw, params, state)
        arrays: dict[str, np.ndarray] = {}
        for arena, data in module.consts.items():
            arrays[f"const:{arena}"] = np.frombuffer(data, NP_DTYPES[ARENA_DTYPES[arena]])
        layout = _layout(lw)
        arrays["init:param"], arrays["init:state"] = _pack(layout, module, params, state)
        probe = name.startswith("probe")
        feeds = [_probe_inputs(rng, dims["N"]) if probe else _feed(g, rng)
                 for _ in range(3 if g.updates else 1)]
        for i, feed in enumerate(feeds):
            for k, v in feed.items():
                arrays[f"feed{i}:{k}"] = v
        checks: dict[str, Any] = {"forward": {f"out:{k}": v for k, v in
                                              ref.forward(**feeds[0]).items()}}
        if g.grads:
            checks["grads"] = {f"grad:{k}": v for k, v in ref.grads(**feeds[0]).items()}
        if g.updates:
            checks["train"] = {"loss1": np.float32(ref(**feeds[1])),
                               "loss2": np.float32(ref(**feeds[2]))}
            p, s = _pack(layout, module, ref.params, ref.state)
            checks["train"]["param"], checks["train"]["state"] = p, s
        for entry, values in checks.items():
            for k, v in values.items():
                arrays[f"ref:{entry}:{k}"] = np.asarray(v)
        if probe:
            for out, (inp, fn, _) in PROBE.items():
                x = feeds[0][inp].astype(np.float64)
                arrays[f"exact:out:{out}"] = _erf64(x) if fn is None else fn(x)
        gathered = {k.ids.buffer.removeprefix("input_") for sched in lw.schedules
                    for k in sched.kernels if k.kind == "gather"}
        bounds = {k: b for k, b in g.index_bounds.items() if k in gathered}
        meta = {"arenas": module.arena_sizes, "layout": layout, "index_bounds": bounds,
                "fast_math": fast,
                "plans": {k: _plan_json(p) for k, p in module.plans.items()},
                "entries": list(checks), "inputs": list(g.inputs),
                "probe": {k: float("inf") if fast else v[2] for k, v in PROBE.items()}
                if probe else {}}
        (case / "plan.json").write_text(json.dumps(meta))
        np.savez_compressed(case / "data.npz", **arrays)
        print(f"  {name}: {len(module.plans)} entry points, "
              f"{sum(len(p.steps) for p in module.plans.values())} steps, "
              f"{module.source.count('.entry')} kernels ({time.time() - t0:.1f}s)")


def _erf64(x: np.ndarray) -> np.ndarray:
    import math

    return np.array([math.erf(v) for v in x.ravel()]).reshape(x.shape)


def _layout(lw: Any) -> list[dict[str, Any]]:
    from ferrograd.codegen.schedule import safe_name

    out = []
    g = lw.graph
    for name, nid in g.persistent().items():
        kind = "param" if name in g.params else "state"
        buf = f"{kind}_{safe_name(name)}"
        _, off, size = lw.memory_plan.persistent[buf]
        out.append({"name": name, "arena": kind, "offset": off, "size": size,
                    "shape": list(g.node(nid).shape)})
    return out


def _pack(layout: list[dict[str, Any]], module: Any, params: dict[str, np.ndarray],
          state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    arenas = {k: np.zeros(module.arena_sizes[k], np.float32) for k in ("param", "state")}
    for item in layout:
        src = params if item["arena"] == "param" else state
        arenas[item["arena"]][item["offset"]:item["offset"] + item["size"]] = \
            np.asarray(src[item["name"]], np.float32).ravel()
    return arenas["param"], arenas["state"]


# ======================================================================================
# run (on the GPU machine: numpy + cupy only)
# ======================================================================================


class Device:
    """Arenas of one case on the GPU, and the plan executor."""

    def __init__(self, cp: Any, case: Path, target: str, meta: dict[str, Any],
                 data: Any) -> None:
        self.cp, self.meta, self.data = cp, meta, data
        self.module = cp.RawModule(path=str(case / f"module_{target}.ptx"))
        self.arenas: dict[str, Any] = {}
        for arena, size in meta["arenas"].items():
            if arena.startswith("input:"):
                dtype = data[f"feed0:{arena[6:]}"].dtype
                dtype = np.uint8 if dtype == np.bool_ else dtype
            else:
                dtype = NP_DTYPES[ARENA_DTYPES[arena]]
            self.arenas[arena] = cp.zeros(max(size, 1), dtype)
        for arena in ("const_f32", "const_i32", "const_bool"):
            values = data[f"const:{arena}"]
            if values.size:
                self.arenas[arena][:values.size] = cp.asarray(values)
        self.functions: dict[str, Any] = {}

    def reset(self) -> None:
        for arena in ("param", "state"):
            values = self.data[f"init:{arena}"]
            if values.size:
                self.arenas[arena][:values.size] = self.cp.asarray(values)

    def poison(self) -> None:
        self.arenas["temp_f32"].fill(np.nan)
        if "scratch_f32" in self.arenas:  # a partial no kernel wrote shows as NaN
            self.arenas["scratch_f32"].fill(np.nan)
        self.arenas["temp_i32"].fill(-123456789)
        self.arenas["temp_bool"].fill(0xAB)
        if "flags_u32" in self.arenas:
            self.arenas["flags_u32"].fill(0)

    def feed(self, i: int) -> None:
        for name in self.meta["inputs"]:
            v = self.data[f"feed{i}:{name}"]
            self.arenas[f"input:{name}"][:] = self.cp.asarray(
                v.astype(np.uint8) if v.dtype == np.bool_ else v).ravel()

    def pointer(self, ref: dict[str, Any]) -> int:
        arr = self.arenas[ref["arena"]]
        return int(arr.data.ptr) + ref["offset"] * arr.itemsize

    def launch(self, spec: dict[str, Any]) -> None:
        name = spec["kernel"]
        if name not in self.functions:
            self.functions[name] = self.module.get_function(name)
        args = []
        for a in spec["args"]:
            if "arena" in a:
                args.append(np.uint64(self.pointer(a)))
            else:
                args.append({"u32": np.uint32, "s32": np.int32, "f32": np.float32}[a["scalar"]](
                    a["value"]))
        self.functions[name](tuple(spec["grid"]), tuple(spec["block"]), tuple(args),
                             shared_mem=spec["shared"])

    def gemm(self, g: dict[str, Any]) -> None:
        cp = self.cp

        def view(ref: dict[str, Any], strides: list[int], shape: tuple[int, ...]) -> Any:
            arr = self.arenas[ref["arena"]]
            base = arr[ref["offset"]:]
            return cp.lib.stride_tricks.as_strided(base, shape, tuple(4 * s for s in strides))

        outer, (a_so, b_so, c_so) = g.get("outer", 1), g.get("outer_strides", [0, 0, 0])
        a = view(g["a"], [a_so, *g["a_strides"]], (outer, g["batch"], g["m"], g["k"]))
        b = view(g["b"], [b_so, *g["b_strides"]], (outer, g["batch"], g["k"], g["n"]))
        c = view(g["c"], [c_so, *g["c_strides"]], (outer, g["batch"], g["m"], g["n"]))
        product = g.get("alpha", 1.0) * cp.matmul(a, b)
        if g.get("beta", 0.0) != 0:  # accumulates into C (SGD's in-place update)
            product += g["beta"] * c
        if g.get("bias") is not None:  # the GEMM's epilogue
            product += view(g["bias"], [0, 0, 0, 1], (1, 1, 1, g["n"]))
            if g["relu"]:
                product = cp.maximum(product, 0)
        c[...] = product

    def run(self, entry: str, gemm_mode: str) -> None:
        cp = self.cp
        for step in self.meta["plans"][entry]["steps"]:
            label = step["launch"]["kernel"] if "launch" in step else "gemm"
            try:
                if "launch" in step:
                    self.launch(step["launch"])
                elif gemm_mode == "fallback":
                    self.launch(step["gemm"]["fallback"])
                else:
                    self.gemm(step["gemm"])
                cp.cuda.runtime.deviceSynchronize()
            except Exception as err:
                raise RuntimeError(f"{entry}: {label} failed: {err}") from err
        if "flags_u32" in self.arenas and int(self.arenas["flags_u32"][0]):
            raise RuntimeError(f"{entry}: the error flag is set (an id out of range)")

    def result(self, entry: str, key: str) -> np.ndarray:
        arena, offset, shape = self.meta["plans"][entry]["results"][key]
        n = int(np.prod(shape)) if shape else 1
        return self.cp.asnumpy(self.arenas[arena][offset:offset + n]).reshape(shape)


def compare(got: np.ndarray, want: np.ndarray) -> tuple[float, bool]:
    """(normwise relative error max|got - want| / max(|want|, FLOOR), within tolerance);
    NaN where exactly the reference has NaN, ints and bools equal."""
    want = np.asarray(want)
    if want.dtype.kind in "biu":
        same = np.array_equal(got.astype(want.dtype) if want.dtype != np.bool_ else got != 0,
                              want)
        return (0.0 if same else 1.0), same
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    if np.isnan(got).any() != np.isnan(want).any() or not np.array_equal(np.isnan(got),
                                                                          np.isnan(want)):
        return float("nan"), False
    ok = ~np.isnan(want)
    scale = float(np.max(np.abs(want[ok]), initial=0.0))
    diff = np.abs(got[ok] - want[ok])
    err = float(np.max(diff, initial=0.0)) / max(scale, FLOOR)
    within = bool(np.all(diff <= FLOOR + ATOL * scale + RTOL * np.abs(want[ok])))
    return err, within


def _check_case(cp: Any, case: Path, target: str, mode: str, report: list[str]) -> bool:
    meta = json.loads((case / "plan.json").read_text())
    data = np.load(case / "data.npz")
    dev = Device(cp, case, target, meta, data)
    worst: tuple[float, str] = (0.0, "")
    ok = True
    shown = 0

    def check(label: str, got: np.ndarray, want: np.ndarray) -> None:
        nonlocal worst, ok, shown
        err, within = compare(got, want)
        if not within:
            ok = False
            shown += 1
            if shown <= 4:
                report.append(f"    MISMATCH {case.name} {target} {mode} {label}: "
                              f"rel err {err:.3g}")
        if not err <= worst[0]:
            worst = (err, label)

    dev.reset()
    for entry in ("forward", "grads"):
        if entry not in meta["entries"]:
            continue
        dev.poison()
        dev.feed(0)
        dev.run(entry, mode)
        for key in meta["plans"][entry]["results"]:
            if not meta["fast_math"]:  # fast math is measured by the probe only
                check(f"{entry} {key}", dev.result(entry, key), data[f"ref:{entry}:{key}"])
        n = data["init:param"].size
        check(f"{entry} leaves params", cp.asnumpy(dev.arenas["param"][:n]), data["init:param"])
    if "train" in meta["entries"]:
        for i in (1, 2):
            dev.poison()
            dev.feed(i)
            dev.run("train", mode)
            check(f"train loss {i}", dev.result("train", "out:loss"),
                  data[f"ref:train:loss{i}"])
        for item in meta["layout"]:
            got = cp.asnumpy(dev.arenas[item["arena"]][item["offset"]:
                                                      item["offset"] + item["size"]])
            want = data[f"ref:train:{item['arena']}"][item["offset"]:item["offset"] + item["size"]]
            check(f"after 2 steps {item['arena']} {item['name']}", got, want)
    for name, bound in meta["index_bounds"].items():
        ok &= _bad_ids_raise_the_flag(dev, name, bound, report)
    if meta["probe"] and mode == "fallback":
        ok &= _probe_report(dev, meta, data, report)
    report.append(f"  {case.name:12s} {target} gemm={mode:8s} worst rel err {worst[0]:.2e} "
                  f"({worst[1]}) {'ok' if ok else 'FAIL'}")
    return ok


def _bad_ids_raise_the_flag(dev: Device, name: str, bound: int, report: list[str]) -> bool:
    """An id out of range sets the error flag (and reads nothing out of bounds)."""
    dev.poison()
    dev.feed(0)
    dev.arenas[f"input:{name}"][0] = bound
    try:
        dev.run("forward", "fallback")
    except RuntimeError as err:
        if "error flag" in str(err):
            return True
        raise
    report.append(f"    MISMATCH id {bound} in input {name!r} did not set the error flag")
    return False


def _probe_report(dev: Device, meta: dict[str, Any], data: Any, report: list[str]) -> bool:
    """Accuracy of each function against float64, in ulps of the exact value."""
    ok = True
    for out, bound in meta["probe"].items():
        got = dev.result("forward", f"out:{out}").astype(np.float64)
        exact = data[f"exact:out:{out}"]
        spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        finite = np.isfinite(exact) & (np.abs(exact) < 3e38)
        ulps = np.abs(got - exact)[finite] / spacing[finite]
        worst = float(np.max(ulps, initial=0.0))
        bad = int(np.sum(np.isnan(got[finite])))
        within = worst <= bound and not bad
        ok &= within
        report.append(f"    probe {out:6s} max {worst:8.2f} ulp (bound {bound}), "
                      f"NaN {bad}{'' if within else '  <-- over'}")
    return ok


def run(outdir: Path, only: list[str]) -> int:
    import cupy as cp

    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"cupy {cp.__version__}")
    names = sorted(p.parent.name for p in outdir.glob("*/plan.json"))
    report: list[str] = []
    failed = 0
    t0 = time.time()
    for name in names:
        if only and name not in only:
            continue
        for target in TARGETS:
            for mode in ("fallback", "cublas"):
                try:
                    if not _check_case(cp, outdir / name, target, mode, report):
                        failed += 1
                except Exception as err:  # one broken case must not hide the others
                    failed += 1
                    report.append(f"  {name:12s} {target} gemm={mode:8s} ERROR {err}")
                print(report[-1], flush=True)
    print(f"\n{len(report)} lines, {failed} failing runs, {time.time() - t0:.1f}s")
    print("\n".join(line for line in report if "MISMATCH" in line or "probe" in line
                    or "ERROR" in line or "FAIL" in line))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] not in ("prepare", "run"):
        print(__doc__)
        return 2
    outdir, only = Path(argv[2]), argv[3:]
    if argv[1] == "prepare":
        prepare(outdir, only)
        return 0
    return run(outdir, only)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
