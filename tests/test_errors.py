"""Errors a user can make in a model, and what ferrograd tells them.

Every tracing error must point at the user's own file:line. The line numbers are
found from marker comments (``# <-- name``) in this file, so the tests survive
edits above them.
"""

from pathlib import Path

import numpy as np
import pytest

import ferrograd as fg

HERE = __file__  # the file name Python compiled this module from, as nodes record it
LINES = Path(HERE).read_text().splitlines()


def line_of(marker: str) -> int:
    """The line number of the one line that ends with ``# <-- marker``."""
    hits = [i + 1 for i, line in enumerate(LINES) if line.rstrip().endswith(f"# <-- {marker}")]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def where(marker: str) -> str:
    return f"{HERE}:{line_of(marker)}"


def raises_at(exc: type[Exception], marker: str, fn, *args, **kwargs) -> str:
    """Call fn, expect ``exc`` whose message starts with this file and the marked line."""
    with pytest.raises(exc) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert msg.startswith(where(marker) + ": "), msg
    assert err.value.src == where(marker)
    assert isinstance(err.value, fg.FerrogradError)
    return msg


# ---- Python control flow on traced values ----------------------------------------------------


def test_if_on_a_tensor_is_a_trace_error_at_the_if():
    @fg.model
    def branchy(x: fg.f32["B", 3]):
        s = x.sum()
        if s > 0:  # <-- if
            return s
        return -s

    msg = raises_at(fg.TraceError, "if", fg.trace, branchy, B=2)
    assert "test_errors.py" in msg
    assert "static" in msg
    assert "fg.where" in msg


def test_while_and_boolean_operators_on_tensors_are_trace_errors():
    @fg.model
    def loop(x: fg.f32["B", 3]):
        while x.sum() > 0:  # <-- while
            x = x - 1.0
        return x.sum()

    @fg.model
    def both(x: fg.f32["B", 3]):
        m = (x > 0) and (x < 1)  # <-- and
        return fg.where(m, x, 0.0).sum()

    assert "fg.where" in raises_at(fg.TraceError, "while", fg.trace, loop, B=2)
    assert "fg.where" in raises_at(fg.TraceError, "and", fg.trace, both, B=2)


def test_the_fix_the_error_suggests_works():
    @fg.model
    def branchless(x: fg.f32["B", 3]):
        return fg.where(x > 0, x, -x).sum()

    x = np.array([[1.0, -2.0, 3.0]], np.float32)
    graph = fg.trace(branchless, B=1)
    assert float(fg.interpret(graph, {"x": x}, {})["loss"]) == 6.0


@pytest.mark.parametrize("convert", [
    "float", "int", "np.asarray", "index", "np.array",
])
def test_converting_a_traced_tensor_to_a_value_is_a_trace_error(convert):
    conversions = {
        "float": lambda t: float(t.sum()),  # <-- conv_float
        "int": lambda t: int(t.sum()),  # <-- conv_int
        "np.asarray": lambda t: np.asarray(t),  # <-- conv_np.asarray
        "np.array": lambda t: np.array(t) + 1,  # <-- conv_np.array
        "index": lambda t: [1, 2, 3][t.sum()],  # <-- conv_index
    }

    @fg.model
    def leaky(x: fg.f32["B", 3]):
        conversions[convert](x)
        return x.sum()

    msg = raises_at(fg.TraceError, f"conv_{convert}", fg.trace, leaky, B=2)
    assert "no value" in msg


# ---- shapes and dtypes -------------------------------------------------------------------


def test_broadcast_mismatch_is_a_shape_error_naming_op_shapes_and_line():
    @fg.model
    def bad_add(x: fg.f32[3, 4], y: fg.f32[5]):
        z = x * 2.0
        return (z + y).sum()  # <-- add

    msg = raises_at(fg.ShapeError, "add", fg.trace, bad_add)
    assert "add" in msg
    assert "(3, 4)" in msg and "(5,)" in msg


def test_matmul_with_wrong_inner_dims_is_a_shape_error():
    @fg.model
    def bad_matmul(x: fg.f32["B", 4]):
        w = fg.param("w", (5, 2))
        return (x @ w).sum()  # <-- matmul

    msg = raises_at(fg.ShapeError, "matmul", fg.trace, bad_matmul, B=3)
    assert "matmul" in msg
    assert "(3, 4)" in msg and "(5, 2)" in msg


def test_shape_errors_inside_helpers_point_at_the_users_line():
    def block(h):
        return fg.nn.linear(h, 4) @ fg.param("v", (3, 1))  # <-- helper

    @fg.model
    def nested(x: fg.f32["B", 2]):
        return block(x).sum()

    msg = raises_at(fg.ShapeError, "helper", fg.trace, nested, B=2)
    assert "(2, 4)" in msg and "(3, 1)" in msg


@pytest.mark.parametrize("case", ["reshape", "index", "cross_entropy"])
def test_other_shape_errors_point_at_the_line(case):
    @fg.model
    def bad(x: fg.f32["B", 4], y: fg.i32["B"]):
        if case == "reshape":
            return x.reshape(3, 3).sum()  # <-- reshape
        if case == "index":
            return x[:, 7].sum()  # <-- index
        return fg.cross_entropy(x, y[:1])  # <-- cross_entropy

    msg = raises_at(fg.ShapeError, case, fg.trace, bad, B=2)
    assert "(2, 4)" in msg or "7" in msg


def test_dtype_mismatch_is_a_dtype_error():
    @fg.model
    def mixed(x: fg.f32["B", 3], k: fg.i32["B", 3]):
        return (x + k).sum()

    with pytest.raises(fg.DTypeError) as err:
        fg.trace(mixed, B=2)
    msg = str(err.value)
    assert "add" in msg and "f32" in msg and "i32" in msg
    assert "astype" in msg
    assert not isinstance(err.value, fg.ShapeError)


def test_dtype_mismatch_names_the_users_line():
    @fg.model
    def mixed(x: fg.f32["B", 3], k: fg.i32["B", 3]):
        return (x + k).sum()  # <-- dtype

    raises_at(fg.DTypeError, "dtype", fg.trace, mixed, B=2)


def test_wrong_dtypes_for_an_op_are_dtype_errors():
    @fg.model
    def int_matmul(x: fg.i32["B", 3]):
        return (x @ x.T).astype(fg.f32).sum()

    @fg.model
    def float_mask(x: fg.f32["B", 3]):
        return fg.where(x, x, 0.0).sum()

    @fg.model
    def float_labels(x: fg.f32["B", 3], y: fg.f32["B"]):
        return fg.embedding(x, y).sum()

    for m, words in ((int_matmul, ["matmul", "i32"]), (float_mask, ["where", "bool"]),
                     (float_labels, ["i32", "f32"])):
        with pytest.raises(fg.DTypeError) as err:
            fg.trace(m, B=2)
        assert all(w in str(err.value) for w in words), str(err.value)


# ---- dims, annotations, params, outputs -------------------------------------------------------


# Errors about the model as a whole point at its first line, the decorator.
@fg.model  # <-- needs_b
def needs_b(x: fg.f32["B", 4]):
    return x.sum()


def test_unbound_dim_is_a_trace_error():
    msg = raises_at(fg.TraceError, "needs_b", fg.trace, needs_b)
    assert "'B'" in msg and "B=<int>" in msg and "'x'" in msg
    with pytest.raises(fg.TraceError, match="'B'"):
        fg.compile(needs_b, backend="numpy")


def test_unknown_and_bad_dim_values_are_trace_errors():
    msg = raises_at(fg.TraceError, "needs_b", fg.trace, needs_b, B=2, N=3)
    assert "'N'" in msg and "'B'" in msg
    for bad in (0, -1, 2.5, True):
        with pytest.raises(fg.TraceError, match="positive int"):
            fg.trace(needs_b, B=bad)


def test_missing_annotation_is_a_trace_error_at_decoration():
    def unannotated(x: fg.f32["B", 3], y):  # <-- unannotated
        return x.sum()

    msg = raises_at(fg.TraceError, "unannotated", fg.model, unannotated)
    assert "'y'" in msg and "annotation" in msg

    def wrong_annotation(x: np.ndarray):
        return x.sum()

    with pytest.raises(fg.TraceError, match="'x'"):
        fg.model(wrong_annotation)

    def star_args(*xs: fg.f32[3]):
        return xs[0].sum()

    with pytest.raises(fg.TraceError, match=r"\*args"):
        fg.model(star_args)


def test_bad_dims_in_an_annotation_are_trace_errors():
    with pytest.raises(fg.TraceError, match="dim"):
        fg.f32["B", -1]
    with pytest.raises(fg.TraceError, match="dim"):
        fg.f32["not an identifier"]


def test_a_param_created_twice_names_both_lines():
    @fg.model
    def twice(x: fg.f32["B", 3]):
        w = fg.param("w", (3,))  # <-- first
        w2 = fg.param("w", (3,))  # <-- second
        return (x * w * w2).sum()

    msg = raises_at(fg.TraceError, "second", fg.trace, twice, B=2)
    assert "'w'" in msg and "twice" in msg
    assert where("first") in msg


def test_two_layers_with_one_name_name_the_clashing_param():
    @fg.model
    def clash(x: fg.f32["B", 3]):
        h = fg.nn.linear(x, 3, name="layer")
        return fg.nn.linear(h, 3, name="layer").sum()  # <-- clash

    msg = raises_at(fg.TraceError, "clash", fg.trace, clash, B=2)
    assert "'layer.weight'" in msg


@pytest.mark.parametrize("case", ["vector", "int", "dict"])
def test_a_loss_that_is_not_a_float_scalar_is_a_trace_error(case):
    @fg.model
    def not_scalar(x: fg.f32["B", 3], k: fg.i32["B"]):
        if case == "vector":
            return x.sum(-1)  # <-- loss_vector
        if case == "int":
            return k.sum()  # <-- loss_int
        return {"loss": x * 2.0, "other": x}  # <-- loss_dict

    msg = raises_at(fg.TraceError, f"loss_{case}", fg.trace, not_scalar, B=2)
    assert "scalar" in msg and ".mean()" in msg
    want = {"vector": "(2,)", "int": "i32", "dict": "(2, 3)"}[case]
    assert want in msg


def test_outputs_must_be_tensors_of_the_model():
    @fg.model
    def returns_number(x: fg.f32["B", 3]):
        return {"loss": x.sum(), "n": 3.0}

    @fg.model
    def returns_nothing(x: fg.f32["B", 3]):
        return {}

    @fg.model
    def bad_name(x: fg.f32["B", 3]):
        return {"loss": x.sum(), "grad:x": x}

    with pytest.raises(fg.TraceError, match="'n'"):
        fg.trace(returns_number, B=2)
    with pytest.raises(fg.TraceError, match="empty"):
        fg.trace(returns_nothing, B=2)
    with pytest.raises(fg.TraceError, match="grad:x"):
        fg.trace(bad_name, B=2)


def test_dsl_functions_outside_a_model_are_trace_errors():
    with pytest.raises(fg.TraceError, match="inside") as err:
        fg.param("w", (3,))  # <-- outside
    assert err.value.src == where("outside")
    with pytest.raises(fg.TraceError, match=r"fg\.compile"):
        needs_b(np.zeros((2, 4), np.float32))
    with pytest.raises(fg.TraceError, match=r"@fg\.model"):
        fg.compile(lambda x: x, backend="numpy")


def test_numpy_arrays_must_be_wrapped_in_fg_constant():
    @fg.model
    def raw(x: fg.f32["B", 3]):
        return fg.exp(np.ones(3)).sum() + x.sum()  # <-- raw

    msg = raises_at(fg.TraceError, "raw", fg.trace, raw, B=2)
    assert "fg.constant" in msg


@pytest.mark.parametrize("init", [
    "zeros", "ones", "normal", "uniform", "kaiming", "xavier",
])
def test_every_documented_initializer_traces(init):
    @fg.model
    def initialized(x: fg.f32["B", 3]):
        return (x @ fg.param("w", (3, 2), init=init)).sum()

    graph = fg.trace(initialized, B=2)
    value = fg.init_params(graph, seed=0)["w"]
    assert value.shape == (3, 2) and value.dtype == np.float32


def test_bad_param_arguments_are_trace_errors():
    @fg.model
    def bad_init(x: fg.f32["B", 3]):
        return (x * fg.param("w", (3,), init="gaussian")).sum()  # <-- init

    @fg.model
    def bad_init_value(x: fg.f32["B", 3]):
        return (x * fg.param("w", (3,), init=np.ones(4))).sum()  # <-- init_value

    @fg.model
    def int_param(x: fg.f32["B", 3]):
        return (x * fg.param("w", (3,), dtype="i32")).sum()  # <-- int_param

    assert "'gaussian'" in raises_at(fg.TraceError, "init", fg.trace, bad_init, B=2)
    assert "(4,)" in raises_at(fg.TraceError, "init_value", fg.trace, bad_init_value, B=2)
    assert "float" in raises_at(fg.TraceError, "int_param", fg.trace, int_param, B=2)
