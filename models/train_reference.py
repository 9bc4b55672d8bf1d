"""Train a Fashion-MNIST reference model (models.zoo.FMNIST_MODELS; default the embedded ``vit_fmnist``).

    python -m models.train_reference [--model vit_fmnist] [--epochs 40] [--out models/assets/<model>.safetensors]

Recipe: AdamW (lr 2e-3, weight decay 0.05, batch 128), one warm-up epoch then
cosine decay, cross-entropy, random horizontal flip and (``--crop``) a random
translation of up to 2 pixels per image, seed 0, float32 on the CPU. ``--bundle-subset`` instead writes the 1,000 + 1,000
image subset that ships with the package (first images of each split).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.data import BUNDLED_FMNIST, DEBIAN_FMNIST, _fmnist_folder, fashion_mnist, read_idx, FMNIST_FILES
from models.files import replacing
from models.zoo import ASSETS, FMNIST_MODELS


def augment(x: torch.Tensor, gen: torch.Generator, crop: bool) -> torch.Tensor:
    """Random horizontal flip; with ``crop``, a random shift of up to 2 pixels per image (zero-padded)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if not crop:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dy = torch.randint(0, 5, (n,), generator=gen)
    dx = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 4)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return x.gather(3, cols)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train(name: str, epochs: int, out: Path, seed: int = 0, crop: bool = False, batch: int = 128,
          lr: float = 2e-3) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_set = fashion_mnist("train").dataset
    test_set = fashion_mnist("test").dataset
    xtr, ytr = train_set.tensors
    xte, yte = test_set.tensors
    cls, kwargs = FMNIST_MODELS[name]
    model = cls(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = len(xtr) // batch
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    start = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(augment(xtr[idx], gen, crop)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  test top-1 {accuracy(model, xte, yte):.2f}%  "
              f"{time.time() - start:.0f}s", flush=True)
    from safetensors.torch import save_file
    with replacing(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    print(f"wrote {out}: test top-1 {accuracy(model, xte, yte):.2f}% after {time.time() - start:.0f}s")


def bundle_subset(n: int = 1000) -> None:
    """Write the first ``n`` train and test images of the Debian copy as uint8 safetensors."""
    from safetensors.torch import save_file
    folder = _fmnist_folder(DEBIAN_FMNIST)
    if folder is None:
        raise SystemExit(f"Fashion-MNIST files not found in {DEBIAN_FMNIST}: apt-get install dataset-fashion-mnist")
    tensors = {}
    for split, (img, lbl) in FMNIST_FILES.items():
        tensors[f"{split}_images"] = torch.from_numpy(read_idx(folder / f"{img}.gz")[:n].copy())
        tensors[f"{split}_labels"] = torch.from_numpy(read_idx(folder / f"{lbl}.gz")[:n].astype("int64"))
    save_file(tensors, str(BUNDLED_FMNIST))
    print(f"wrote {BUNDLED_FMNIST}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_fmnist", choices=sorted(FMNIST_MODELS))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default models/assets/<model>.safetensors")
    parser.add_argument("--crop", action="store_true", help="also translate images by up to 2 pixels")
    parser.add_argument("--bundle-subset", action="store_true")
    args = parser.parse_args()
    if args.bundle_subset:
        bundle_subset()
    else:
        train(args.model, args.epochs, args.out or ASSETS / f"{args.model}.safetensors", args.seed, args.crop)


if __name__ == "__main__":
    main()
