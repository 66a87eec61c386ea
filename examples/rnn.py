"""An Elman RNN, unrolled over time at trace time, learns a majority vote over bits.

Each example is a sequence of T random bits, fed in as -1/+1 one step at a
time; the label says whether +1 won (T is odd, so there are no ties). To get
it right the network has to keep a running count in its hidden state.

The recurrence is an ordinary Python loop over x[:, t, :]. The loop runs once,
while the model is traced, and leaves T copies of the cell in the graph: a
static unroll, so the compiled step has no loop and no Python in it.

    python examples/rnn.py
    python examples/rnn.py --steps 150 --length 7 --hidden 8
"""

import argparse
import time

import numpy as np

import ferrograd as fg


def build_model(length: int, hidden: int):
    @fg.model
    def rnn(x: fg.f32["B", length, 1], y: fg.i32["B"]):
        w_xh = fg.param("cell.w_xh", (1, hidden), init="xavier")
        w_hh = fg.param("cell.w_hh", (hidden, hidden), init="xavier")
        b_h = fg.param("cell.b_h", (hidden,), init="zeros")

        h = None  # the initial state is zero, so step 0 has no recurrent term
        for t in range(length):
            pre = x[:, t, :] @ w_xh + b_h
            if h is not None:
                pre = pre + h @ w_hh
            h = fg.tanh(pre)

        logits = fg.nn.linear(h, 2, name="head")
        return {"loss": fg.cross_entropy(logits, y), "logits": logits}

    return rnn


def make_batch(rng: np.random.Generator, batch_size: int, length: int):
    bits = rng.choice(np.array([-1.0, 1.0], np.float32), size=(batch_size, length, 1))
    labels = (bits.sum(axis=(1, 2)) > 0).astype(np.int32)
    return bits, labels


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--backend", default="cpu", help="cpu (compiled Rust) or numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=15, help="sequence length (odd)")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    if args.length % 2 == 0:
        parser.error("--length must be odd, so that a majority always exists")

    start = time.perf_counter()
    step = fg.compile(build_model(args.length, args.hidden),
                      optimizer=fg.optim.Adam(lr=args.lr),
                      backend=args.backend, B=args.batch_size, seed=args.seed)

    # Fresh random sequences every step: there is no fixed training set to overfit.
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    for i in range(1, args.steps + 1):
        losses.append(step(*make_batch(rng, args.batch_size, args.length)))
        if i % args.log_every == 0 or i == 1:
            print(f"step {i:4d}  loss {np.mean(losses[-args.log_every:]):.4f}")

    # Accuracy on sequences the network has never seen.
    correct, n_eval = 0, 0
    for _ in range(10):
        x, y = make_batch(rng, args.batch_size, args.length)
        logits = step.forward(x, y)["logits"]
        correct += int((logits.argmax(axis=1) == y).sum())
        n_eval += len(y)
    accuracy = correct / n_eval
    final_loss = float(np.mean(losses[-min(len(losses), 20):]))
    seconds = time.perf_counter() - start
    print(f"final  loss {final_loss:.4f}  accuracy on new sequences {accuracy:.2%}  "
          f"({args.steps} steps, {seconds:.1f} s)")
    return {"initial_loss": losses[0], "loss": final_loss, "accuracy": accuracy,
            "seconds": seconds}


if __name__ == "__main__":
    main()
