"""Honest progress for upscaling: network evaluations of every tile and step, with an ETA from the first second.

One evaluation of a large photo takes seconds on a CPU, so counting whole steps leaves the bar blank for a long
time. [`UpscaleProgress`] counts (image, tile) crops through the network, and for an [`SR3UNet2DModel`] advances
inside each evaluation too: forward hooks on the UNet's blocks add each block's share of the evaluation's
convolution work as it finishes, so the bar moves, and tqdm's rate and ETA exist, a fraction of a second after the
start. Networks without blocks (an ONNX Runtime session) advance once per evaluation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Tuple

import torch


def block_shares(network: Any) -> List[Tuple[torch.nn.Module, float]]:
    """`(block, share)` for every ResNet/attention block of an SR3 UNet; the shares sum to 1.

    A block's share is its convolution and attention-projection weight count divided by the pixels of its level
    relative to the first (a level down has 4x fewer pixels): its multiply-adds up to a common factor. Networks
    that are not SR3 UNets give an empty list.
    """
    down_levels = getattr(network, "down_levels", None)
    up_levels = getattr(network, "up_levels", None)
    mid_blocks = getattr(network, "mid_blocks", None)
    if down_levels is None or up_levels is None or mid_blocks is None:
        return []
    levels = len(down_levels)
    placed = []
    for level, down in enumerate(down_levels):
        placed += [(block, level) for block in down.blocks]
    placed += [(block, levels - 1) for block in mid_blocks]
    for index, up in enumerate(up_levels):
        placed += [(block, levels - 1 - index) for block in up.blocks]
    costs = []
    for block, level in placed:
        weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Conv2d))
        costs.append(weights / 4**level)
    total = sum(costs) or 1.0
    return [(block, cost / total) for (block, _), cost in zip(placed, costs)]


class UpscaleProgress:
    """A tqdm bar over the network evaluations of one upscaling call (`steps x crops` units).

    Pass it as `progress=` to `tiled_super_resolve` (or `TiledNetwork`); the tiled network enters
    `evaluation(count)` around every network call with its number of (image, tile) crops.

    Args:
        network: the network that runs (hooks are placed on its blocks when it is an SR3 UNet).
        steps: evaluations per crop (refinement steps).
        crops_per_step: (image, tile) crops per step.
        description: the bar's label (e.g. the file name).
        disable: no bar at all (`--quiet`).
        **tqdm_kwargs: passed to tqdm (`position`, `leave`, `file`, ...).
    """

    def __init__(
        self,
        network: Any,
        steps: int,
        crops_per_step: int,
        description: str = "upscaling",
        disable: bool = False,
        **tqdm_kwargs: Any,
    ):
        from tqdm.auto import tqdm

        self.steps = steps
        self.crops_per_step = crops_per_step
        self.total = steps * crops_per_step
        self.done = 0
        self.bar = tqdm(
            total=self.total,
            desc=description,
            unit="tile-step",
            disable=disable,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
            **tqdm_kwargs,
        )
        self._count = 0
        self._handles = []
        if not disable:
            for block, share in block_shares(network):
                self._handles.append(block.register_forward_hook(self._hook(share)))
        self._describe()

    def _hook(self, share: float):
        def advance(module, inputs, output):
            if self._count:
                # Never past the end of this evaluation (the shares' floating-point sum can exceed 1 slightly).
                self.bar.update(max(0.0, min(share * self._count, self.done + self._count - self.bar.n)))

        return advance

    def _describe(self) -> None:
        # The evaluation in progress (the last one once all are done).
        position = min(self.done, self.total - 1)
        step = position // max(1, self.crops_per_step) + 1
        tile = position % max(1, self.crops_per_step) + 1
        postfix = f"step {step}/{self.steps}"
        if self.crops_per_step > 1:
            postfix += f", tile {tile}/{self.crops_per_step}"
        self.bar.set_postfix_str(postfix, refresh=True)

    @contextlib.contextmanager
    def evaluation(self, count: int) -> Iterator[None]:
        """Around one network call on `count` crops: advances by `count` when it ends (in block shares during)."""
        self._count = count
        try:
            yield
        finally:
            self._count = 0
            self.done += count
            # Snap to the exact count: block shares are floating point, and other networks have no blocks.
            self.bar.n = min(self.done, self.total)
            self._describe()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.bar.close()

    def __enter__(self) -> UpscaleProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class EvaluationCounter:
    """Reports `(crops done, crops in total)` to `report` after every network evaluation: progress for a UI.

    Pass it as `progress=` to `tiled_super_resolve` (or `TiledNetwork`), with `total` = evaluations per crop x
    [`diffusers_sr3.tiling.crops_per_step`]. Unlike a step callback it also counts the tiles of a step and the
    orientations of a self-ensemble.
    """

    def __init__(self, report: Callable[[Tuple[int, int]], Any], total: int):
        self.report = report
        self.total = total
        self.done = 0

    @contextlib.contextmanager
    def evaluation(self, count: int) -> Iterator[None]:
        """Around one network call on `count` crops."""
        yield
        self.done += count
        self.report((min(self.done, self.total), self.total))


__all__ = ["EvaluationCounter", "UpscaleProgress", "block_shares"]
