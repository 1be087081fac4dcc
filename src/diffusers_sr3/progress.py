"""Honest progress for upscaling: network evaluations of every tile and step, with an ETA from the first second.

One evaluation of a large photo takes seconds on a CPU, so counting whole steps leaves the bar blank for a long
time. [`UpscaleProgress`] counts (image, tile) crops through the network, and for an [`SR3UNet2DModel`] advances
inside each evaluation too: forward hooks on the UNet's blocks add each block's share of the evaluation's
convolution work as it finishes, so the bar moves, and tqdm's rate and ETA exist, a fraction of a second after the
start. Networks without blocks (an ONNX Runtime session) advance once per evaluation. Detail mode's windows
([`diffusers_sr3.detail_windows.WindowedNetwork`]) count too, as the crops their pixels would fill.

Every progress bar of the commands and the training scripts takes [`bar_options`]: on a terminal tqdm's own
redrawing, in a log (a file, a pipe, CI) one state every `LOG_REFRESH_SECONDS`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

if TYPE_CHECKING:
    import torch

# A bar written to a log instead of a terminal shows its state at most this often (and its first and last): tqdm
# redraws up to 10 times a second, each redraw a new copy of the bar in a file (a 300-step training run wrote 415 of
# them, 39 kB; a million steps would write over 100 MB), where a terminal keeps one line.
LOG_REFRESH_SECONDS = 30.0


def bar_options(file: Optional[Any] = None) -> Dict[str, Any]:
    """tqdm options for a progress bar written to `file` (default: sys.stderr): none on a terminal or in a notebook
    (whose bars are widgets); elsewhere a state at most every `LOG_REFRESH_SECONDS`. tqdm's own `TQDM_MININTERVAL`
    environment variable, when set, wins (and `TQDM_MINITERS`)."""
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed: not a terminal
        terminal = False
    notebook = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
    # Without ipywidgets a notebook's bars are text on the kernel's stream, which says it is no terminal but shows
    # each redraw in place of the last, as a terminal does.
    kernel_stream = getattr(sys.modules.get("ipykernel.iostream"), "OutStream", None)
    notebook = notebook or (kernel_stream is not None and isinstance(stream, kernel_stream))
    if terminal or notebook:
        return {}
    # A fixed miniters of 0: the clock alone decides. tqdm's own adapts it to the rate, and its monitor thread then
    # redraws a bar whose last state is older than maxinterval (10 s), and the next update redraws it again: with
    # TQDM_MININTERVAL=60 too (states at 0, 60, 80, 120, 140 s). tqdm's environment variables, where set, choose
    # instead of these options (an argument would override them).
    options = {"mininterval": LOG_REFRESH_SECONDS, "miniters": 0}
    return {name: value for name, value in options.items() if f"TQDM_{name.upper()}" not in os.environ}


def block_shares(network: Any) -> List[Tuple[torch.nn.Module, float]]:
    """`(block, share)` for every ResNet/attention block of an SR3 UNet; the shares sum to 1.

    A block's share is its convolution and attention-projection weight count divided by the pixels of its level
    relative to the first (a level down has 4x fewer pixels): its multiply-adds up to a common factor. Networks
    that are not SR3 UNets give an empty list. A backend's stand-in that runs the UNet itself (`AutocastUNet`,
    the bf16 backend) gives the blocks of the UNet it wraps.
    """
    import torch

    network = getattr(network, "unet", network)
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
    """A tqdm bar over the network evaluations of one upscaling call (`steps x crops` units, plus the windows').

    Pass it as `progress=` to `tiled_super_resolve` (or `TiledNetwork`); the tiled network enters
    `evaluation(count)` around every network call with its number of (image, tile) crops, and detail mode's windows
    around each batch of windows with the crops' worth of pixels in it (a fraction).

    Args:
        network: the network that runs (hooks are placed on its blocks when it is an SR3 UNet, or a backend's
            stand-in for one).
        steps: evaluations per crop (refinement steps).
        crops_per_step: (image, tile) crops per step.
        description: the bar's label (e.g. the file name).
        disable: no bar at all (`--quiet`).
        window_crops: detail mode's windows in each windowed evaluation, in crops
            ([`diffusers_sr3.detail_windows.window_crops_per_step`]); 0 without windows.
        windowed_steps: how many of the `steps` evaluations, the last ones, run windows (below strength 1 the
            fidelity answer's evaluations come first and run whole).
        **tqdm_kwargs: passed to tqdm (`position`, `leave`, `file`, ...).
    """

    def __init__(
        self,
        network: Any,
        steps: int,
        crops_per_step: int,
        description: str = "upscaling",
        disable: bool = False,
        window_crops: Union[int, Fraction] = 0,
        windowed_steps: int = 0,
        **tqdm_kwargs: Any,
    ):
        from tqdm.auto import tqdm

        if not 0 <= windowed_steps <= steps:
            raise ValueError(f"windowed_steps must lie in 0-{steps}, got {windowed_steps}")
        self.steps = steps
        self.crops_per_step = crops_per_step
        self.window_crops = window_crops if windowed_steps else 0
        self.windowed_steps = windowed_steps if window_crops else 0
        # Exact (a Fraction with windows), so the windows' fractional counts add up to it with no rounding left.
        self.total = steps * crops_per_step + self.windowed_steps * self.window_crops
        self.done = 0
        self._count = 0
        self.bar = tqdm(
            total=float(self.total),
            desc=description,
            unit="tile-step",
            disable=disable,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
            postfix=self._postfix(),
            **{**bar_options(tqdm_kwargs.get("file")), **tqdm_kwargs},
        )
        self._handles = []
        if not disable:
            for block, share in block_shares(network):
                self._handles.append(block.register_forward_hook(self._hook(share)))

    def _hook(self, share: float):
        def advance(module, inputs, output):
            if self._count:
                # Never past the end of this evaluation (the shares' floating-point sum can exceed 1 slightly).
                self.bar.update(max(0.0, min(share * self._count, self.done + self._count - self.bar.n)))

        return advance

    def _postfix(self) -> str:
        """The evaluation in progress (the last one once all are done): `step i/N`, and its tile or its windows."""
        # The first `steps - windowed_steps` evaluations hold `crops_per_step` crops each, the others their windows too.
        crops, plain = max(1, self.crops_per_step), self.steps - self.windowed_steps
        done = min(self.done, self.total)
        if done < plain * crops or not self.windowed_steps:
            index = min(int(done // crops), self.steps - 1)
            offset = done - index * crops
        else:
            per_step = crops + self.window_crops
            windowed = min(int((done - plain * crops) // per_step), self.windowed_steps - 1)
            index = plain + windowed
            offset = done - plain * crops - windowed * per_step
        postfix = f"step {index + 1}/{self.steps}"
        if offset >= crops and self.windowed_steps:
            postfix += ", windows"
        elif self.crops_per_step > 1:
            postfix += f", tile {min(int(offset), crops - 1) + 1}/{self.crops_per_step}"
        return postfix

    @contextlib.contextmanager
    def evaluation(self, count: Union[int, Fraction]) -> Iterator[None]:
        """Around one network call on `count` crops (a fraction for windows): advances by `count` when it ends (in
        block shares during)."""
        self._count = count
        try:
            yield
        finally:
            self._count = 0
            self.done += count
            # Snap to the exact count: block shares are floating point, and other networks have no blocks.
            self.bar.n = float(min(self.done, self.total))
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            # Shown as tqdm shows an update: at most every `mininterval` (a log's bar would show every evaluation).
            self.bar.update(0)

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
    [`diffusers_sr3.tiling.crops_per_step`], plus in detail mode with windows the windowed evaluations x
    [`diffusers_sr3.detail_windows.window_crops_per_step`]. Unlike a step callback it also counts the tiles of a
    step, the orientations of a self-ensemble and the windows (in crops' worth of pixels: a fraction where it is
    not whole).
    """

    def __init__(self, report: Callable[[Tuple[int, int]], Any], total: Union[int, Fraction]):
        self.report = report
        # Reported as plain numbers (a UI serializes them): windows can make the total a whole Fraction.
        self.total = int(total) if total == int(total) else float(total)
        self.done = 0

    @contextlib.contextmanager
    def evaluation(self, count: Union[int, Fraction]) -> Iterator[None]:
        """Around one network call on `count` crops."""
        yield
        self.done += count
        done = min(self.done, self.total)
        self.report((int(done) if done == int(done) else float(done), self.total))


__all__ = ["EvaluationCounter", "UpscaleProgress", "block_shares"]
