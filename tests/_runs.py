"""Small run stores for the pipelines' tests (imported by test_sweep.py, test_compare.py, test_pipelines_cli.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from capture import Recorder


class TinyNet(nn.Module):
    """Conv2d(1->4) on ``(B, 1, 8, 8)`` -> Linear(256->6) -> Linear(6->3); ``extra`` adds Linear(3->3)."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.out = nn.Linear(6, 3)
        self.extra = nn.Linear(3, 3) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))
        return self.extra(h) if self.extra is not None else h


def make_run(
    path: Path, seed: int, mode: str = "raw", epochs: int = 2, extra: bool = False, **kwargs: object
) -> Path:
    """A run store of :class:`TinyNet` on random inputs: 3 train batches and 1 eval batch per epoch."""
    torch.manual_seed(seed)
    net = TinyNet(extra)
    x = torch.randn(48, 1, 8, 8)
    with Recorder(net, path, mode=mode, **kwargs) as rec:
        for epoch in range(epochs):
            net.train()
            for batch in x.split(16):
                net(batch)
            net.eval()
            with torch.no_grad():
                net(x[:20])
            rec.add_scalar("accuracy", 0.5 + 0.125 * epoch + 0.0625 * seed)
            rec.end_epoch()
    return path
