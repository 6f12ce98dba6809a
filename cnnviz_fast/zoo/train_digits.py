"""Train the zoo's digits CNN from scratch on scikit-learn's digits (CPU, about a minute).

    python -m cnnviz_fast.zoo.train_digits [--out PATH] [--epochs 40] [--seed 0]

Writes the state dict (float32, loadable with ``torch.load(weights_only=True)``) and
prints its SHA-256 and the test accuracy; the shipped weights were made with the defaults.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .architectures import DigitsCNN
from .data import DIGITS_NORMALIZE, digits

WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_cnn.pt"


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (±3 px), rotations (±12°) and scales (0.9–1.1): digits are small, so
    the network must not memorise positions."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * (12 * torch.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (3 / 16)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(int((model(DIGITS_NORMALIZE(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train(epochs: int = 40, seed: int = 0, batch_size: int = 64, lr: float = 2e-3) -> DigitsCNN:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = digits("train")
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            inputs = DIGITS_NORMALIZE(augment(x_train[idx], generator))
            loss = F.cross_entropy(model(inputs), y_train[idx], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train(args.epochs, args.seed)
    x_test, y_test = digits("test")
    print(f"trained in {time.perf_counter() - start:.0f} s; test accuracy {accuracy(model, x_test, y_test):.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"wrote {args.out} sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
