"""XOR with a 2-4-1 network: tanh hidden layer, sigmoid output, SGD with momentum.

The four points of XOR are not linearly separable, so the hidden layer has to
learn a useful representation before the output can get them all right.

    python examples/xor.py
    python examples/xor.py --steps 200 --seed 3
"""

import argparse
import time

import numpy as np

import ferrograd as fg

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
Y = np.array([[0], [1], [1], [0]], dtype=np.float32)


@fg.model
def xor_net(x: fg.f32[4, 2], y: fg.f32[4, 1]):
    h = fg.tanh(fg.nn.linear(x, 4, name="hidden"))
    p = fg.sigmoid(fg.nn.linear(h, 1, name="out"))
    return {"loss": fg.binary_cross_entropy(p, y), "probs": p}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--backend", default="cpu", help="cpu (compiled Rust) or numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    step = fg.compile(xor_net, optimizer=fg.optim.SGD(lr=args.lr, momentum=args.momentum),
                      backend=args.backend, seed=args.seed)

    first_loss = None
    for i in range(1, args.steps + 1):
        loss = step(X, Y)
        if first_loss is None:
            first_loss = loss
        if i % args.log_every == 0 or i == 1:
            print(f"step {i:4d}  loss {loss:.4f}")

    out = step.forward(X, Y)
    probs = out["probs"].reshape(-1)
    accuracy = float(np.mean((probs > 0.5) == (Y.reshape(-1) > 0.5)))
    seconds = time.perf_counter() - start
    for point, p in zip(X, probs, strict=True):
        print(f"  xor({int(point[0])}, {int(point[1])}) -> {p:.3f}")
    print(f"final  loss {float(out['loss']):.4f}  accuracy {accuracy:.0%}  ({seconds:.1f} s)")
    return {"initial_loss": float(first_loss), "loss": float(out["loss"]),
            "accuracy": accuracy, "seconds": seconds}


if __name__ == "__main__":
    main()
