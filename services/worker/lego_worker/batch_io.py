"""Moving a batch's items in and out of torch: numpy arrays in, one concatenated tensor per input,
numpy arrays out split back per item (the batch dimension is the first one)."""

from __future__ import annotations

import numpy as np
import torch

from lego_worker.backend import Item


def to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def split(batched: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    return [part.detach().cpu().numpy() for part in torch.split(batched, sizes)]


def concat(items: list[Item], name: str, device: torch.device) -> torch.Tensor:
    return torch.cat([to_tensor(item[name], device) for item in items])


def batch_timestep(items: list[Item], sizes: list[int], device: torch.device) -> torch.Tensor:
    """One scalar timestep when every item has the same (as a pipeline passes it), else one per row."""
    timesteps = [to_tensor(item["timestep"], device) for item in items]
    if all(torch.equal(t, timesteps[0]) for t in timesteps):
        return timesteps[0]
    return torch.cat([t.reshape(1).expand(n) for t, n in zip(timesteps, sizes, strict=True)])


def uniform(items: list[Item], name: str) -> bool:
    """Whether every item's `name` has the same shape (else the batch runs item by item)."""
    return len({np.shape(item[name])[1:] for item in items}) == 1
