"""Accuracy of the ANN and of the SNN at every timestep, in one pass over the data."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import analog_mode
from convert.network import SpikingModel
from models.distributed import all_reduce


@torch.no_grad()
def evaluate(snn: SpikingModel, loader: Iterable, timesteps: int, progress: bool = True,
             reference: Optional[nn.Module] = None) -> Dict:
    """top-1 / top-5 accuracy (%) of the ANN, and of the SNN after each t = 1..T, plus agreement with the ANN.

    Under torchrun ``loader`` holds this rank's share of the images; the counts are summed over ranks.
    The ANN is ``reference`` or else the SNN's own network in analog mode, which computes the ANN
    exactly (for a fine-tuned SNN: the ANN with the fine-tuned weights)."""
    device = next(snn.parameters()).device
    n = 0
    ann_top1 = ann_top5 = 0
    top1 = torch.zeros(timesteps, dtype=torch.long)
    top5 = torch.zeros(timesteps, dtype=torch.long)
    agree = torch.zeros(timesteps, dtype=torch.long)
    for images, labels in tqdm(loader, desc=f"evaluating T={timesteps}", unit="batch", disable=not progress, leave=False):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if reference is not None:
            ref = reference(images)
        else:
            with analog_mode(snn.net, exact=True):
                ref = snn.net(images)
        per_step = snn.simulate(images, timesteps)  # [T, B, classes]
        k = min(5, ref.shape[-1])
        ann_pred = ref.argmax(-1)
        ann_top1 += int((ann_pred == labels).sum())
        ann_top5 += int((ref.topk(k, -1).indices == labels[:, None]).any(-1).sum())
        pred = per_step.argmax(-1)
        top1 += (pred == labels).sum(-1).cpu()
        top5 += (per_step.topk(k, -1).indices == labels[None, :, None]).any(-1).sum(-1).cpu()
        agree += (pred == ann_pred).sum(-1).cpu()
        n += len(labels)
    counts = all_reduce(torch.cat([torch.tensor([n, ann_top1, ann_top5]), top1, top5, agree]))  # torchrun: all ranks
    n, ann_top1, ann_top5 = (int(c) for c in counts[:3])
    top1, top5, agree = counts[3:].split(timesteps)
    if n == 0:
        raise ValueError("the evaluation data holds no images")
    pct = lambda c: (100.0 * c.double() / n).tolist()  # noqa: E731
    return {"images": n, "ann_top1": 100.0 * ann_top1 / n, "ann_top5": 100.0 * ann_top5 / n,
            "top1": pct(top1), "top5": pct(top5), "agreement": pct(agree)}
