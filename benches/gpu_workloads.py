"""The GPU workloads of ANCHORS.md (the H200 table), each defined once as an
``@fg.model`` with its optimizer, its synthetic data and ANCHORS.md's numbers.

Details ANCHORS.md leaves open, chosen here (and stated in BENCHMARKS.md):

- ``ew``: y = gelu(x·1.7 − 0.3), exact-erf GELU, over 2^28 floats; a forward-only
  model (no params, no loss), so its "step" is one forward call;
- MLP rows: ``workloads.mlp`` (784-256-256-10, ReLU, cross-entropy), SGD lr 0.01;
- big MLP: 4096 inputs, three 4096-wide ReLU layers, a 10-way head (50.4 M params),
  cross-entropy, Adam lr 1e-3;
- CNN: ``workloads.cnn`` (1×28×28 input, two 3×3 convolutions with padding 1, ReLU,
  2×2 max-pool, linear head), SGD lr 0.01;
- transformer: the pre-norm block of ``workloads.transformer`` at d 512, 8 heads,
  ff 2048 (4·d), T 256, vocabulary 256, learned positions, Adam lr 1e-3.

Data are synthetic and fixed (one batch per workload), never zeros.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from common import Batch, Opt, image_data
from workloads import cnn, mlp

import ferrograd as fg

EW_N = 1 << 28  # 256 Mi floats: 1 GiB in, 1 GiB out
BIG_IN, BIG_WIDTH, BIG_DEPTH = 4096, 4096, 3


@dataclass(frozen=True)
class TransformerSize:
    vocab: int = 256
    context: int = 256
    dim: int = 512
    heads: int = 8
    ff: int = 2048


TSIZE = TransformerSize()


# ---- the models -------------------------------------------------------------------------


@fg.model
def ew(x: fg.f32["N"]):
    return {"y": fg.gelu(x * 1.7 - 0.3)}


@fg.model
def big_mlp(x: fg.f32["B", BIG_IN], y: fg.i32["B"]):
    h = x
    for i in range(BIG_DEPTH):
        h = fg.relu(fg.nn.linear(h, BIG_WIDTH, name=f"fc{i + 1}"))
    return fg.cross_entropy(fg.nn.linear(h, 10, name="head"), y)


def make_transformer(s: TransformerSize) -> fg.Model:
    causal = np.tril(np.ones((s.context, s.context), dtype=bool))
    hd = s.dim // s.heads

    def heads(t, batch: int):
        return t.reshape(batch, s.context, s.heads, hd).transpose(0, 2, 1, 3)

    @fg.model
    def transformer_gpu(ids: fg.i32["B", s.context], targets: fg.i32["B", s.context]):
        B = ids.shape[0]
        x = fg.nn.embedding(ids, s.vocab, s.dim, name="tok_emb")
        x = x + fg.param("pos_emb", (s.context, s.dim), init="normal")
        h = fg.nn.layer_norm(x, name="ln1")
        q = heads(fg.nn.linear(h, s.dim, name="attn.q"), B)
        k = heads(fg.nn.linear(h, s.dim, name="attn.k"), B)
        v = heads(fg.nn.linear(h, s.dim, name="attn.v"), B)
        scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))
        scores = fg.where(fg.constant(causal), scores, -1e9)
        att = (fg.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(
            B, s.context, s.dim)
        x = x + fg.nn.linear(att, s.dim, name="attn.out")
        h = fg.gelu(fg.nn.linear(fg.nn.layer_norm(x, name="ln2"), s.ff, name="mlp.up"))
        x = x + fg.nn.linear(h, s.dim, name="mlp.down")
        logits = fg.nn.linear(fg.nn.layer_norm(x, name="ln_f"), s.vocab, name="head")
        return fg.cross_entropy(logits.reshape(B * s.context, s.vocab),
                                targets.reshape(B * s.context))

    return transformer_gpu


transformer_gpu = make_transformer(TSIZE)


# ---- data ------------------------------------------------------------------------------


def ew_data(rng: np.random.Generator, n: int) -> Batch:
    return (rng.standard_normal(n, dtype=np.float32),)


def token_data(rng: np.random.Generator, n: int, s: TransformerSize = TSIZE) -> Batch:
    ids = rng.integers(0, s.vocab, size=(n, s.context + 1)).astype(np.int32)
    return np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])


# ---- flops -------------------------------------------------------------------------------


def _dense_flops(b: int, layers: list[tuple[int, int]]) -> float:
    """GEMM flops of a training step of a stack of dense layers: forward, weight
    gradients, and input gradients of every layer but the first."""
    f = sum(2 * b * i * o for i, o in layers)
    return 2 * f + (f - 2 * b * layers[0][0] * layers[0][1])


def _cnn_flops(b: int) -> float:
    conv1 = 2 * b * 28 * 28 * 16 * 9 * 1
    conv2 = 2 * b * 14 * 14 * 32 * 9 * 16
    head = 2 * b * 1568 * 10
    return 3 * (conv1 + conv2 + head) - conv1  # no input gradient of conv1


def _transformer_flops(b: int, s: TransformerSize = TSIZE) -> float:
    tokens = b * s.context
    dense = 2 * tokens * (4 * s.dim * s.dim + 2 * s.dim * s.ff + s.dim * s.vocab)
    attn = 2 * 2 * b * s.heads * s.context * s.context * (s.dim // s.heads)
    return 3 * (dense + attn)


# ---- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuReference:
    """ANCHORS.md's H200 row, ms per step (None where it gives none)."""

    torch: float | None
    torch_graph: float | None
    torch_compile: float | None
    jax: float | None
    goal: float | None  # ms; for ``ew`` the goal is a fraction of copy bandwidth
    goal_text: str


@dataclass(frozen=True)
class GpuWorkload:
    key: str
    title: str
    model: fg.Model
    arch: str  # anchor implementation: ew, mlp, big_mlp, cnn, transformer
    opt: Opt | None  # None: forward only
    dims: dict[str, int]
    make_data: Callable[[np.random.Generator], Batch]
    ref: GpuReference
    flops: float | None = None
    bytes_min: float | None = None  # fewest bytes a step must move (ew: read + write)

    def data(self, seed: int = 0) -> Batch:
        return self.make_data(np.random.default_rng(seed))


_MLP = [(784, 256), (256, 256), (256, 10)]
_BIG = [(BIG_IN, BIG_WIDTH)] + [(BIG_WIDTH, BIG_WIDTH)] * (BIG_DEPTH - 1) + [(BIG_WIDTH, 10)]

GPU_WORKLOADS: list[GpuWorkload] = [
    GpuWorkload("ew", "fused y = gelu(x·1.7 − 0.3), 256M floats", ew, "ew", None,
                {"N": EW_N}, lambda r: ew_data(r, EW_N),
                GpuReference(1.55, None, 0.575, None, None, "≥ 90% of copy BW"),
                bytes_min=2 * 4 * EW_N),
    GpuWorkload("mlp128", "MLP 784-256-256-10 b128, SGD", mlp, "mlp", Opt("sgd", 0.01),
                {"B": 128}, lambda r: image_data(r, 128, (784,)),
                GpuReference(1.288, 0.106, 1.052, 0.062, 0.040, "≤ 0.040 ms"),
                flops=_dense_flops(128, _MLP)),
    GpuWorkload("mlp8192", "MLP b8192, SGD", mlp, "mlp", Opt("sgd", 0.01),
                {"B": 8192}, lambda r: image_data(r, 8192, (784,)),
                GpuReference(1.166, 0.397, 1.067, 0.334, 0.30, "≤ 0.30 ms"),
                flops=_dense_flops(8192, _MLP)),
    GpuWorkload("bigmlp", "MLP 4096×3 + head, b4096, Adam (50M params)", big_mlp, "big_mlp",
                Opt("adam", 1e-3), {"B": 4096}, lambda r: image_data(r, 4096, (BIG_IN,)),
                GpuReference(23.2, 23.2, 22.6, 22.0, 22.5, "≤ 22.5 ms"),
                flops=_dense_flops(4096, _BIG)),
    GpuWorkload("cnn256", "CNN (conv3x3 16, pool, conv3x3 32, pool, linear) b256, SGD", cnn,
                "cnn", Opt("sgd", 0.01), {"B": 256}, lambda r: image_data(r, 256, (1, 28, 28)),
                GpuReference(1.425, 0.377, 0.878, 0.364, 0.30, "≤ 0.30 ms"),
                flops=_cnn_flops(256)),
    GpuWorkload("transformer", "transformer d512 h8 T256 b32, Adam", transformer_gpu,
                "transformer", Opt("adam", 1e-3), {"B": 32}, lambda r: token_data(r, 32),
                GpuReference(5.09, 5.05, 4.57, 5.08, 4.5, "≤ 4.5 ms"),
                flops=_transformer_flops(32)),
]

GPU_BY_KEY = {w.key: w for w in GPU_WORKLOADS}


def fg_optimizer(opt: Opt | None) -> fg.optim.SGD | fg.optim.Adam | None:
    if opt is None:
        return None
    if opt.kind == "sgd":
        return fg.optim.SGD(lr=opt.lr)
    return fg.optim.Adam(lr=opt.lr, betas=opt.betas, eps=opt.eps)
