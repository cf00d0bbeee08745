"""capture.layers: which modules are recorded and what they are called, checked against delve 0.1.50."""

from __future__ import annotations

import csv
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from capture.layers import DEFAULT_LAYER_TYPES, discover_layers, module_kind, primary_output

# -- models and how to run them -------------------------------------------------------------------


class Blocks(nn.Module):
    """Attributes, a ModuleDict, a ModuleList, an LSTM and a container inside a container."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        )
        self.blocks = nn.ModuleDict({"a": nn.Linear(8, 4), "b": nn.Sequential(nn.Linear(4, 4), nn.Tanh())})
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(3, 3)])
        self.rnn = nn.LSTM(3, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        h = self.blocks["b"](self.blocks["a"](h))
        for head in self.heads:
            h = head(h)
        return self.rnn(h[:, None].repeat(1, 2, 1))[0]


def nested_sequential() -> tuple[Any, Callable[[Any], None]]:
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(2, 3, 1))),
        nn.Flatten(),
        nn.Sequential(nn.Linear(12, 5), nn.Sequential(nn.ReLU(), nn.Linear(5, 2))),
    )
    return net, lambda m: m(torch.randn(4, 1, 4, 4))


def module_dict_model() -> tuple[Any, Callable[[Any], None]]:
    return Blocks(), lambda m: m(torch.randn(4, 1, 4, 4))


def plain_list() -> tuple[Any, Callable[[Any], None]]:
    mods = [nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 2), nn.ReLU()), nn.ReLU(), nn.Conv2d(1, 2, 1)]

    def run(ms: list[nn.Module]) -> None:
        ms[1](ms[0](torch.randn(4, 3)))
        ms[3](torch.randn(4, 1, 2, 2))

    return mods, run


def list_with_colliding_containers() -> tuple[Any, Callable[[Any], None]]:
    # both containers name their leaf "0"; in delve the second one wins
    mods = [nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 2)), nn.LSTM(2, 2, batch_first=True)]

    def run(ms: list[nn.Module]) -> None:
        ms[2](ms[1](ms[0](torch.randn(4, 3)))[:, None])

    return mods, run


def named_modules() -> tuple[Any, Callable[[Any], None]]:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    net[0].name = "encoder"
    net[2][1].name = "logits"
    return net, lambda m: m(torch.randn(4, 3))


CASES = {
    "nested Sequential": nested_sequential,
    "ModuleDict and ModuleList": module_dict_model,
    "plain list": plain_list,
    "list with colliding names": list_with_colliding_containers,
    "modules with .name": named_modules,
}


def delve_layer_names(delve_tracker: Callable[..., Any], modules: Any, run: Callable[[Any], None]) -> tuple:
    """delve's names: the CSV columns after one train forward, and its ``layers`` dict."""
    tracker = delve_tracker(modules, save_to=["csv"], stats=["lsat"])
    run(modules)
    tracker.add_saturations()
    tracker.close()
    with open(tracker.savefile + ".csv", newline="") as f:
        header = next(csv.reader(f, delimiter=";"))
    prefix = "train-saturation_"
    columns = [c[len(prefix) :] for c in header if c.startswith(prefix)]
    return columns, tracker.layers


@pytest.mark.parametrize("case", list(CASES))
def test_names_match_delve(case, delve_tracker):
    modules, run = CASES[case]()
    # discover first: delve writes a ``.name`` attribute onto every module it tracks
    ours = discover_layers(modules)
    columns, delve_layers = delve_layer_names(delve_tracker, modules, run)
    assert list(ours) == columns
    # the same module objects, in the same order
    assert [id(m) for m in ours.values()] == [id(m) for m in delve_layers.values()]


def test_capture_records_more_types_named_by_the_same_rule():
    net = nn.Sequential(
        nn.Conv1d(1, 2, 3),
        nn.Sequential(nn.GRU(2, 2), nn.RNN(2, 2)),
        nn.Conv3d(1, 1, 1),
        nn.ConvTranspose2d(1, 1, 1),
    )
    assert list(discover_layers(net)) == ["0", "1-0", "1-1", "2", "3"]
    assert list(discover_layers([nn.GRU(2, 2), nn.Conv1d(1, 1, 1)])) == ["Module-0-GRU", "Module-1-Conv1d"]
    assert list(discover_layers({"enc": nn.Sequential(nn.Linear(2, 2)), "head": nn.Linear(2, 2)})) == [
        "enc-0",
        "head",
    ]
    assert all(issubclass(t, nn.Module) for t in DEFAULT_LAYER_TYPES)


def test_layers_ignore_and_filter():
    net = Blocks()
    assert list(discover_layers(net, layers=["blocks-*"])) == ["blocks-a", "blocks-b-0"]
    # an exact name may pick a module that is not recorded by default (here an activation)
    assert list(discover_layers(net, layers=["heads-1", "features-1"])) == ["features-1", "heads-1"]
    assert list(discover_layers(net, ignore=["features-*", "rnn"])) == [
        "blocks-a",
        "blocks-b-0",
        "heads-0",
        "heads-1",
    ]
    kept = discover_layers(net, layer_filter=lambda d: {k: v for k, v in d.items() if k.startswith("heads")})
    assert list(kept) == ["heads-0", "heads-1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"layers": ["decoder-*"]},
            r"layers: 'decoder-\*' matches no layer; recordable layers are: features-0",
        ),
        ({"ignore": ["nothing"]}, "ignore: 'nothing' matches no layer"),
        ({"ignore": ["*"]}, "no layer to record"),
        ({"layer_filter": lambda d: {}}, "no layer to record"),
    ],
)
def test_bad_selection_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        discover_layers(Blocks(), **kwargs)


def test_bad_module_list_raises():
    with pytest.raises(TypeError, match="item 1 is a str"):
        discover_layers([nn.Linear(2, 2), "conv"])
    with pytest.raises(ValueError, match="no layer to record"):
        discover_layers(nn.Sequential(nn.ReLU(), nn.Tanh()))


def test_module_kind():
    assert module_kind(nn.Conv1d(1, 1, 1)) == "conv" and module_kind(nn.ConvTranspose3d(1, 1, 1)) == "conv"
    assert module_kind(nn.LSTM(1, 1)) == "recurrent" and module_kind(nn.GRU(1, 1)) == "recurrent"
    assert module_kind(nn.Linear(1, 1)) == "dense" and module_kind(nn.ReLU()) == "other"


def test_primary_output_is_samples_first():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2)  # (T, B, U)
    lstm = nn.LSTM(2, 4)
    out = lstm(x)
    got = primary_output(lstm, out)
    np.testing.assert_array_equal(got.detach().numpy(), out[0].detach().numpy().transpose(1, 0, 2))
    gru = nn.GRU(2, 4, batch_first=True)
    out = gru(x)
    assert primary_output(gru, out) is out[0]
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 4, 2])
    out = lstm(packed)
    np.testing.assert_array_equal(primary_output(lstm, out).detach().numpy(), out[0].data.detach().numpy())
    lin = nn.Linear(2, 2)
    assert primary_output(lin, ([torch.ones(1)], 3))[0] == 1
    assert primary_output(lin, {"a": 1}) is None
