"""CUDA graphs of whole draws: one capture per draw size, replayed for every later draw.

A small network's draw is hundreds of short kernels; issuing them from Python costs more than
running them. The engine's draw (sample the weights, generate the inputs, both branches forward,
loss, backward, mask-gradient reduction) reads its counters (seed, round, draw id), mask and
non-prunable tensors from device buffers that keep their addresses, so one captured graph per
draw size replays any draw: the engine rewrites the buffers, then replays.

The first draw of each size runs eagerly on the capture stream (it is a real draw, and it compiles
the kernels and warms the libraries up), then the same Python runs once more under capture, which
records the kernels without running them. If capture fails (a model that syncs with the host, say)
the graphs are switched off for the scorer, the reason is kept in ``error``, and draws run eagerly.
Graphs are keyed by what changes the captured work: the draw size, whether statistics are
gathered, and PyTorch's TF32 flags.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

__all__ = ["DrawGraphs"]


class DrawGraphs:
    """Captured draws of one engine on one CUDA device.

    Attributes:
        error: why capture was switched off (None while it works).
        captured: number of graphs captured so far.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.error: str | None = None
        self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, draw: Callable[[], None]) -> None:
        """Runs ``draw`` (the staged draw's work): by replaying its graph, capturing it the first time."""
        if self.error is not None:
            draw()
            return
        full_key = (key, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        graph = self._graphs.get(full_key)
        if graph is not None:
            graph.replay()
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            draw()  # the real draw, and the warm-up the capture needs
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # The outer stream context restores the caller's stream even when a failed capture leaves
        # the graph context's own stream context unexited.
        with torch.cuda.stream(self._stream):
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                    draw()
            except Exception as err:
                text = str(err).strip()
                self.error = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        if self.error is not None:
            torch.cuda.synchronize(self.device)
            return
        self._pool = graph.pool()
        self._graphs[full_key] = graph
