"""ControlNet block samples part by part, on the torch side: forward hooks that hand each block's
sample to a part sink as soon as the ControlNet has computed it, and the sequence a transformer
indexes for a batch whose items' samples may still be arriving (lego_worker.parts)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lego_worker.backend import Item, PartSink
from lego_worker.batch_io import split, to_tensor
from lego_worker.parts import ArrivingParts

# (output name, the ControlNet's blocks, the zero-initialised projection of each block's sample)
BlockStream = tuple[str, torch.nn.ModuleList, torch.nn.ModuleList]


class _ItemSink:
    """A batch's sink, for a call that runs the batch's item `item` alone."""

    def __init__(self, sink: PartSink, item: int) -> None:
        self._sink, self._item = sink, item

    def announce(self, item: int, output: str, total: int) -> None:
        self._sink.announce(self._item, output, total)

    def part(self, item: int, output: str, index: int, part: np.ndarray) -> None:
        self._sink.part(self._item, output, index, part)


def for_item(sink: PartSink | None, item: int) -> PartSink | None:
    return None if sink is None else _ItemSink(sink, item)


def _hand_over(
    output: str, index: int, projection: torch.nn.Module, scale: float, sizes: list[int], sink: PartSink
) -> Any:
    """The forward hook of block `index`: its sample projected and scaled, split per item, to `sink`."""

    def hook(_: torch.nn.Module, __: Any, result: Any) -> None:
        hidden = result[1] if isinstance(result, tuple) else result  # (text, image) or image alone
        with torch.no_grad():
            sample = projection(hidden) * scale
        for item, part in enumerate(split(sample, sizes)):
            sink.part(item, output, index, part)

    return hook


@contextlib.contextmanager
def streaming_blocks(
    streams: list[BlockStream], scale: float, sizes: list[int], sink: PartSink | None
) -> Iterator[None]:
    """While a ControlNet call runs, block k's sample, projected and scaled as the model's forward
    does after its loop (`controlnet_blocks[k](hidden) * conditioning_scale`), goes to `sink` split
    per item: the same values the call returns, earlier. How many come is said first."""
    if sink is None:
        yield
        return
    hooks = []
    for output, blocks, projections in streams:
        for item in range(len(sizes)):
            sink.announce(item, output, len(blocks))
        for index, (block, projection) in enumerate(zip(blocks, projections, strict=True)):
            hook = _hand_over(output, index, projection, scale, sizes, sink)
            hooks.append(block.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in hooks:
            handle.remove()


class _Stacked:
    """A whole (B, N, ...) input seen as its N parts."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = np.asarray(array)

    def __len__(self) -> int:
        return int(self._array.shape[1])

    def __getitem__(self, index: int) -> np.ndarray:
        return self._array[:, index]


class BatchedParts:
    """What a transformer indexes for a batch's block samples: part k is every item's part k
    concatenated on the batch dimension, made the first time it is asked for (waiting, for an item
    whose samples still arrive, for that part only)."""

    def __init__(self, items: list[Item], name: str, device: torch.device) -> None:
        self._sources = [
            item[name] if isinstance(item[name], ArrivingParts) else _Stacked(item[name]) for item in items
        ]
        self._device = device
        self._made: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._sources[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self._made:
            parts = [to_tensor(source[index], self._device) for source in self._sources]
            self._made[index] = torch.cat(parts)
        return self._made[index]
