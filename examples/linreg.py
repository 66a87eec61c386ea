"""Linear regression by full-batch gradient descent.

Synthetic data y = X w* + b* + noise; the model learns w and b with plain SGD
on the mean squared error, then we compare them with the true w* and b*.

    python examples/linreg.py
    python examples/linreg.py --steps 50 --samples 200 --features 4
"""

import argparse
import time

import numpy as np

import ferrograd as fg


def make_data(n: int, d: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_true = rng.normal(size=(d, 1)).astype(np.float32)
    b_true = rng.normal(size=(1,)).astype(np.float32)
    y = x @ w_true + b_true + noise * rng.normal(size=(n, 1)).astype(np.float32)
    return x, y.astype(np.float32), w_true, b_true


@fg.model
def linreg(x: fg.f32["N", "D"], y: fg.f32["N", 1]):
    w = fg.param("w", (x.shape[1], 1), init="zeros")
    b = fg.param("b", (1,), init="zeros")
    return fg.mse(x @ w + b, y)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--backend", default="cpu", help="cpu (compiled Rust) or numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    x, y, w_true, b_true = make_data(args.samples, args.features, args.noise, args.seed)

    # The whole data set is one batch, so N is bound to the number of samples.
    start = time.perf_counter()
    step = fg.compile(linreg, optimizer=fg.optim.SGD(lr=args.lr), backend=args.backend,
                      N=args.samples, D=args.features, seed=args.seed)

    first_loss = None
    for i in range(1, args.steps + 1):
        loss = step(x, y)  # the loss before this step's update
        if first_loss is None:
            first_loss = loss
        if i % args.log_every == 0 or i == 1:
            print(f"step {i:4d}  loss {loss:.4f}")

    final_loss = float(step.forward(x, y)["loss"])
    params = step.params
    # Noise has variance noise**2, so that is the best loss we can hope for.
    max_err = float(max(np.abs(params["w"] - w_true).max(), np.abs(params["b"] - b_true).max()))
    seconds = time.perf_counter() - start
    print(f"final  loss {final_loss:.5f} (noise floor {args.noise ** 2:.5f})  "
          f"max |w - w*| {max_err:.4f}  ({seconds:.1f} s)")
    return {"initial_loss": float(first_loss), "loss": final_loss,
            "max_weight_error": max_err, "seconds": seconds}


if __name__ == "__main__":
    main()
