"""A small convolutional network on scikit-learn's 8x8 digits, as (N, 1, 8, 8) images.

    conv 3x3 (8 channels) -> relu -> max-pool 2  -> (8, 4, 4)
    conv 3x3 (16 channels) -> relu -> avg-pool 2 -> (16, 2, 2)
    flatten -> linear -> 10 classes

    python examples/cnn.py
    python examples/cnn.py --epochs 2 --channels 4
"""

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ferrograd as fg


def load_data(seed: int):
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def build_model(channels: int):
    @fg.model
    def cnn(x: fg.f32["B", 1, 8, 8], y: fg.i32["B"]):
        h = fg.relu(fg.nn.conv2d(x, channels, 3, padding=1))  # weight (channels, 1, 3, 3)
        h = fg.max_pool2d(h, 2)
        h = fg.relu(fg.nn.conv2d(h, 2 * channels, 3, padding=1))
        h = fg.avg_pool2d(h, 2)
        h = h.reshape(h.shape[0], -1)  # flatten (B, C, 2, 2) -> (B, 4C)
        logits = fg.nn.linear(h, 10, name="head")
        return {"loss": fg.cross_entropy(logits, y), "logits": logits}

    return cnn


def batches(x, y, batch_size: int, rng: np.random.Generator):
    """Shuffled minibatches of exactly batch_size; the last partial batch is dropped."""
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def accuracy(step, x, y, batch_size: int) -> float:
    """Accuracy over all of x, in batches of batch_size; the last one is zero-padded."""
    correct = 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        n = len(xb)
        if n < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(batch_size - n, yb.dtype)])
        logits = step.forward(xb, yb)["logits"]
        correct += int((logits[:n].argmax(axis=1) == y[i:i + n]).sum())
    return correct / len(x)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many steps (default: run all epochs)")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--backend", default="cpu", help="cpu (compiled Rust) or numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = load_data(args.seed)
    rng = np.random.default_rng(args.seed)

    start = time.perf_counter()
    step = fg.compile(build_model(args.channels), optimizer=fg.optim.Adam(lr=args.lr),
                      backend=args.backend, B=args.batch_size, seed=args.seed)

    losses: list[float] = []
    done = False
    for _epoch in range(args.epochs):
        for xb, yb in batches(x_train, y_train, args.batch_size, rng):
            losses.append(step(xb, yb))
            i = len(losses)
            if i % args.log_every == 0 or i == 1:
                print(f"step {i:4d}  loss {np.mean(losses[-args.log_every:]):.4f}")
            if args.steps is not None and i >= args.steps:
                done = True
                break
        if done:
            break

    train_acc = accuracy(step, x_train, y_train, args.batch_size)
    test_acc = accuracy(step, x_test, y_test, args.batch_size)
    final_loss = float(np.mean(losses[-min(len(losses), 20):]))
    seconds = time.perf_counter() - start
    print(f"final  loss {final_loss:.4f}  train acc {train_acc:.2%}  test acc {test_acc:.2%}  "
          f"({len(losses)} steps, {seconds:.1f} s)")
    return {"initial_loss": losses[0], "loss": final_loss, "train_accuracy": train_acc,
            "test_accuracy": test_acc, "steps": len(losses), "seconds": seconds}


if __name__ == "__main__":
    main()
