"""The cache index (ferrograd.codegen.cache): a model whose module was built before
loads right after tracing, with the params and losses of a fresh build; anything
that changes the generated code misses; a damaged entry is a miss, never an error.

Tests that build use a fresh FERROGRAD_CACHE (the cargo target folder stays the
shared one, so a tiny model costs a second or two); the others need no Rust.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import ferrograd as fg
from ferrograd.codegen import cache
from ferrograd.codegen.build import target_dir
from ferrograd.codegen.interface import Interface
from ferrograd.dsl.init import init_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from catalog import MODELS

needs_rust = pytest.mark.skipif(shutil.which("cargo") is None, reason="needs a Rust toolchain")

# One model, defined in text so that a second process can define it identically.
MODEL = textwrap.dedent("""
    import numpy as np
    import ferrograd as fg

    @fg.model
    def net(x: fg.f32["B", 6], y: fg.i32["B"]):
        h = fg.tanh(fg.nn.linear(x, 8, name="fc1"))
        bias = fg.param("shift", (3,), init=np.arange(3, dtype=np.float32) / 10)
        return fg.cross_entropy(fg.nn.linear(h, 3, name="head") + bias, y)
""")


def define_model() -> fg.Model:
    namespace: dict = {}
    exec(MODEL, namespace)
    return namespace["net"]


def batch(b: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(b, 6)).astype(np.float32),
            rng.integers(0, 3, b).astype(np.int32))


def compile_net(lr: float = 1e-2, seed: int = 0, **kw) -> fg.Step:
    return fg.compile(define_model(), optimizer=fg.optim.Adam(lr=lr), seed=seed, B=5, **kw)


def losses(step: fg.Step, n: int = 3) -> list[float]:
    x, y = batch()
    return [step(x, y) for _ in range(n)]


def was_lowered(step: fg.Step) -> bool:
    """Whether the step's training graph was built (a hit never builds it)."""
    return "graph" in step.lowered.__dict__


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    shared_target = target_dir()  # before FERROGRAD_CACHE moves
    root = tmp_path_factory.mktemp("ferrograd-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FERROGRAD_CACHE", str(root))
        mp.setenv("CARGO_TARGET_DIR", str(shared_target))
        yield root


@pytest.fixture(scope="module")
def built(fresh_cache):
    """The model built once into the fresh cache: (step, its first losses)."""
    step = compile_net()
    assert was_lowered(step)
    return step, losses(step)


def load_entries(root: Path) -> list[Path]:
    return sorted((root / "index").glob("*.json"))


# ---- keys and interfaces, without building --------------------------------------------


def key_of(model=None, optimizer=None, backend="cpu", profile=False, level="v3", **dims):
    model = define_model() if model is None else model
    optimizer = fg.optim.Adam(lr=1e-2) if optimizer is None else optimizer
    low = fg.lower(model, optimizer=optimizer, backend=backend, **(dims or {"B": 5}))
    return cache.load_key("native", low.traced, low.optimizer, low.dims, low.backends,
                          profile, level)


def test_every_change_to_what_is_built_changes_the_key(monkeypatch):
    @fg.model
    def relu_net(x: fg.f32["B", 6], y: fg.i32["B"]):
        h = fg.relu(fg.nn.linear(x, 8, name="fc1"))
        bias = fg.param("shift", (3,), init=np.arange(3, dtype=np.float32) / 10)
        return fg.cross_entropy(fg.nn.linear(h, 3, name="head") + bias, y)

    base = key_of()
    assert base is not None and key_of() == base  # deterministic
    keys = {
        "model code": key_of(relu_net),
        "dims": key_of(B=6),
        "learning rate": key_of(optimizer=fg.optim.Adam(lr=2e-2)),
        "betas": key_of(optimizer=fg.optim.Adam(lr=1e-2, betas=(0.8, 0.999))),
        "optimizer": key_of(optimizer=fg.optim.AdamW(lr=1e-2)),
        "backend": key_of(backend=("cpu", "cuda")),
        "profiling": key_of(profile=True),
        "CPU level": key_of(level="v4"),
    }
    monkeypatch.setattr(cache, "__version__", "0.0.0-other")
    keys["ferrograd version"] = key_of()
    monkeypatch.undo()
    monkeypatch.setattr(cache, "compiler_digest", lambda: "another compiler")
    keys["compiler"] = key_of()
    monkeypatch.undo()
    monkeypatch.setattr(cache, "runtime_fingerprint", lambda: "another runtime")
    keys["runtime crate"] = key_of()
    monkeypatch.undo()
    assert key_of() == base
    same = [what for what, key in keys.items() if key == base]
    assert same == [], f"the key ignores {same}"
    assert len(set(keys.values())) == len(keys)


def test_the_seed_is_not_part_of_the_key():
    one = fg.lower(define_model(), optimizer=fg.optim.Adam(lr=1e-2), seed=0, B=5)
    two = fg.lower(define_model(), optimizer=fg.optim.Adam(lr=1e-2), seed=7, B=5)
    keys = [cache.load_key("native", low.traced, low.optimizer, low.dims, low.backends,
                           False, "v3") for low in (one, two)]
    assert keys[0] == keys[1]


def test_an_optimizer_defined_elsewhere_has_no_load_key():
    class Halved(fg.optim.SGD):
        pass  # its update could be anything: the config does not show the code

    assert key_of(optimizer=Halved(lr=0.1)) is None


def test_compiler_digest_covers_ir_dsl_and_codegen():
    import ferrograd.codegen.cache as module

    digest = module.compiler_digest()
    assert len(digest) == 64 and digest == module.compiler_digest()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_interface_from_the_traced_graph_matches_the_training_graph(name):
    model, optimizer, dims = MODELS[name]()
    low = fg.lower(model, optimizer=optimizer, backend="numpy", seed=3, **dims)
    graph = low.graph
    iface = low.interface
    assert iface.graph is low.traced
    specs = {k: (graph.node(v).shape, graph.node(v).dtype) for k, v in graph.params.items()}
    assert list(iface.params.items()) == list(specs.items())
    assert list(iface.inputs) == list(graph.inputs)
    assert list(iface.outputs) == list(graph.outputs)
    assert set(iface.grads) == set(graph.grads) and set(iface.updates) == set(graph.updates)
    # Params come from the traced graph: the same values the training graph gives.
    a, b = init_params(low.traced, 3), init_params(graph, 3)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # And the interface survives its JSON form.
    again = Interface.from_json(low.traced, json.loads(json.dumps(iface.to_json())))
    assert again.state == iface.state and again.grads == iface.grads
    assert again.updates == iface.updates


def test_an_interface_for_another_model_does_not_load():
    low = fg.lower(define_model(), optimizer=fg.optim.Adam(lr=1e-2), B=5)
    data = low.interface.to_json()
    other = fg.lower(define_model(), optimizer=fg.optim.Adam(lr=1e-2), B=6)
    with pytest.raises(ValueError):
        Interface.from_json(other.traced, data)
    data["params"][0][1] = [7, 7]
    with pytest.raises(ValueError):
        Interface.from_json(low.traced, data)


def test_importing_ferrograd_loads_no_sympy_jinja2_or_networkx():
    code = ("import sys, ferrograd\n"
            "print(sorted(m for m in ('sympy', 'jinja2', 'safetensors', 'networkx')\n"
            "             if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---- hits and misses, building ------------------------------------------------------------


@needs_rust
def test_a_hit_gives_the_params_and_losses_of_a_miss(built, fresh_cache):
    first, first_losses = built
    assert len(load_entries(fresh_cache)) == 1
    again = compile_net()
    assert not was_lowered(again)  # loaded after tracing alone
    assert again.module is first.module
    fresh = compile_net()  # the built step's params were trained: compare with a new one
    for step in (again, fresh):
        params = step.params
        for name, value in init_params(step.lowered.traced, 0).items():
            np.testing.assert_array_equal(params[name], value)
    assert losses(again) == first_losses
    assert again.interface.state == first.interface.state
    assert again.interface.grads == first.interface.grads
    x, y = batch()
    assert set(again.forward(x, y)) == {"loss"}
    assert set(again.grads(x, y)) == set(first.interface.grads)
    # Another seed loads the same module with other params, as a build with it would.
    seeded = compile_net(seed=4)
    assert not was_lowered(seeded) and seeded.module is first.module
    expect = init_params(seeded.lowered.traced, 4)
    assert not np.array_equal(expect["fc1.weight"], fresh.params["fc1.weight"])
    for name, value in expect.items():
        np.testing.assert_array_equal(seeded.params[name], value)
    # What needs the training graph lowers it on demand.
    assert again.graph.updates and was_lowered(again)
    leftovers = [p.name for p in (fresh_cache / "index").iterdir()
                 if not p.name.endswith((".json", ".txt"))]
    assert leftovers == []


@needs_rust
def test_a_new_process_loads_without_lowering_sympy_or_networkx(built, fresh_cache):
    """A cached load imports none of the lowering (sympy, networkx, jinja2) nor of the
    build (maturin.py, subprocess)."""
    _, first_losses = built
    script = MODEL + textwrap.dedent("""
        import json, sys
        step = fg.compile(net, optimizer=fg.optim.Adam(lr=1e-2), seed=0, B=5)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(5, 6)).astype(np.float32)
        y = rng.integers(0, 3, 5).astype(np.int32)
        print(json.dumps({
            "lowered": "graph" in step.lowered.__dict__,
            "modules": sorted(m for m in ("sympy", "jinja2", "networkx", "subprocess",
                                          "ferrograd.codegen.maturin") if m in sys.modules),
            "losses": [step(x, y) for _ in range(3)],
        }))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"lowered": False, "modules": [], "losses": first_losses}


@needs_rust
def test_a_changed_optimizer_misses(built, fresh_cache):
    first, _ = built
    other = compile_net(lr=2e-2)
    assert was_lowered(other)
    assert other.module is not first.module
    assert len(load_entries(fresh_cache)) >= 2


@needs_rust
@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a dict", "other format",
                                    "other model", "bad state", "bad module name",
                                    "module gone"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(built, fresh_cache, damage):
    first, first_losses = built
    key = cache.load_key("native", first.lowered.traced, first.lowered.optimizer,
                         first.lowered.dims, first.lowered.backends, False,
                         _level())
    entry = fresh_cache / "index" / f"{key}.json"
    good = entry.read_text()
    data = json.loads(good)
    if damage == "garbage":
        entry.write_bytes(b"\x00\xff{not json")
    elif damage == "truncated":
        entry.write_text(good[: len(good) // 2])
    elif damage == "not a dict":
        entry.write_text("[1, 2, 3]")
    elif damage == "other format":
        entry.write_text(json.dumps({**data, "format": cache.FORMAT + 1}))
    elif damage == "other model":
        data["interface"]["params"][0][1] = [99, 99]
        entry.write_text(json.dumps(data))
    elif damage == "bad state":
        data["interface"]["state"][0][1] = [-1]
        entry.write_text(json.dumps(data))
    elif damage == "bad module name":
        entry.write_text(json.dumps({**data, "module": "../../evil"}))
    else:
        entry.write_text(json.dumps({**data, "module": "fg_net_000000000000"}))
    step = compile_net()
    assert was_lowered(step)  # a miss: lowered, then found through the build entry
    assert step.module is first.module
    assert losses(step) == first_losses
    assert json.loads(entry.read_text()) == json.loads(good)  # rewritten whole
    assert not was_lowered(compile_net())  # and a hit again


def _level() -> str:
    from ferrograd.codegen.cpu_level import build_level

    return build_level()
