"""A one-block causal transformer that learns to predict the next character of a text.

Everything is built from ferrograd primitives: token embeddings plus a learned
positional table, pre-norm multi-head causal self-attention (reshape,
transpose, @, softmax, and a lower-triangular mask), a GELU MLP, residual
connections and an output head. The training text is the opening of Lewis
Carroll's "Alice's Adventures in Wonderland" (1865, public domain), shipped in
examples/data/tiny_text.txt.

    python examples/transformer_lm.py
    python examples/transformer_lm.py --steps 100 --context 16 --dim 32
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np

import ferrograd as fg

TEXT = Path(__file__).parent / "data" / "tiny_text.txt"


def build_model(vocab: int, context: int, dim: int, heads: int):
    T, H, hd = context, heads, dim // heads
    causal = np.tril(np.ones((T, T), dtype=bool))  # position t may look at 0..t

    def split_heads(t, B):
        return t.reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)

    @fg.model
    def char_lm(ids: fg.i32["B", T], targets: fg.i32["B", T]):
        B = ids.shape[0]
        x = fg.nn.embedding(ids, vocab, dim, name="tok_emb")
        x = x + fg.param("pos_emb", (T, dim), init="normal")  # (B, T, dim)

        # Causal self-attention, pre-norm, with a residual connection.
        h = fg.nn.layer_norm(x, name="ln_attn")
        q = split_heads(fg.nn.linear(h, dim, name="attn.q"), B)
        k = split_heads(fg.nn.linear(h, dim, name="attn.k"), B)
        v = split_heads(fg.nn.linear(h, dim, name="attn.v"), B)
        scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hd))  # (B, H, T, T)
        scores = fg.where(fg.constant(causal), scores, -1e9)
        att = fg.softmax(scores, axis=-1) @ v  # (B, H, T, hd)
        att = att.transpose(0, 2, 1, 3).reshape(B, T, dim)
        x = x + fg.nn.linear(att, dim, name="attn.out")

        # Position-wise MLP, also pre-norm and residual.
        h = fg.nn.layer_norm(x, name="ln_mlp")
        h = fg.gelu(fg.nn.linear(h, 4 * dim, name="mlp.up"))
        x = x + fg.nn.linear(h, dim, name="mlp.down")

        logits = fg.nn.linear(fg.nn.layer_norm(x, name="ln_out"), vocab, name="head")
        # One classification per position: flatten (B, T, vocab) to (B*T, vocab).
        loss = fg.cross_entropy(logits.reshape(B * T, vocab), targets.reshape(B * T))
        return {"loss": loss, "logits": logits}

    return char_lm


def greedy_continue(step, prompt: np.ndarray, n_chars: int, batch_size: int) -> list[int]:
    """Extend prompt (context ids) by n_chars, always taking the most likely next char."""
    ids = list(prompt)
    context = len(prompt)
    dummy = np.zeros((batch_size, context), np.int32)  # forward wants targets too
    for _ in range(n_chars):
        window = np.array(ids[-context:], np.int32)
        batch = np.broadcast_to(window, (batch_size, context)).copy()
        logits = step.forward(batch, dummy)["logits"]
        ids.append(int(logits[0, -1].argmax()))
    return ids[context:]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--backend", default="cpu", help="cpu (compiled Rust) or numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--sample", type=int, default=120,
                        help="characters of greedy continuation to print at the end")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    text = TEXT.read_text()
    chars = sorted(set(text))
    to_id = {c: i for i, c in enumerate(chars)}
    data = np.array([to_id[c] for c in text], np.int32)
    vocab, T, B = len(chars), args.context, args.batch_size
    print(f"{len(text)} characters, vocabulary of {vocab}; "
          f"a uniform guess has loss log({vocab}) = {math.log(vocab):.3f}")

    start = time.perf_counter()
    model = build_model(vocab, T, args.dim, args.heads)
    step = fg.compile(model, optimizer=fg.optim.AdamW(lr=args.lr, weight_decay=0.01),
                      backend=args.backend, B=B, seed=args.seed)

    # Each example is a random window of T characters; the targets are the same
    # window shifted one character to the right.
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    for i in range(1, args.steps + 1):
        offsets = rng.integers(0, len(data) - T - 1, size=B)
        ids = np.stack([data[o:o + T] for o in offsets])
        targets = np.stack([data[o + 1:o + T + 1] for o in offsets])
        losses.append(step(ids, targets))
        if i % args.log_every == 0 or i == 1:
            print(f"step {i:4d}  loss {np.mean(losses[-args.log_every:]):.4f}")

    final_loss = float(np.mean(losses[-min(len(losses), 20):]))
    seconds = time.perf_counter() - start
    print(f"final  loss {final_loss:.4f} (started at {losses[0]:.4f})  "
          f"({args.steps} steps, {seconds:.1f} s)")

    if args.sample > 0:
        prompt = data[:T]
        continuation = greedy_continue(step, prompt, args.sample, B)
        print("greedy continuation of the opening words:")
        print("  " + "".join(chars[i] for i in prompt) + "|"
              + "".join(chars[i] for i in continuation))

    return {"initial_loss": losses[0], "loss": final_loss, "uniform_loss": math.log(vocab),
            "seconds": seconds}


if __name__ == "__main__":
    main()
