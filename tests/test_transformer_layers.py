"""Transformer layers in capture: any module by name, glob or type; multi-head attention recorded whole;
a warning for a recorded layer that is never called; what to use when ``timestepwise`` is too wide.

References: the attention output recomputed in numpy from the module's weights, and plain forward
hooks on the same calls reduced with numpy (tests/_frameworks.py).
"""

from __future__ import annotations

import collections
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _frameworks import assert_close, expected_table, table_of
from torch import nn

from capture import CaptureError, Recorder, discover_layers, open_run
from capture.layers import module_kind, primary_output, type_matcher


def encoder_layer(batch_first: bool) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)


def numpy_attention(mha: nn.MultiheadAttention, x: np.ndarray) -> np.ndarray:
    """Self-attention of ``x`` (B, T, E) from the module's weights, in float64 numpy."""
    w = mha.in_proj_weight.detach().double().numpy()
    b = mha.in_proj_bias.detach().double().numpy()
    e, heads = x.shape[-1], mha.num_heads
    q, k, v = (x @ w[i * e : (i + 1) * e].T + b[i * e : (i + 1) * e] for i in range(3))
    split = [a.reshape(*a.shape[:2], heads, e // heads).transpose(0, 2, 1, 3) for a in (q, k, v)]
    scores = split[0] @ split[1].transpose(0, 1, 3, 2) / np.sqrt(e // heads)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = (weights @ split[2]).transpose(0, 2, 1, 3).reshape(x.shape)
    out = mha.out_proj
    return context @ out.weight.detach().double().numpy().T + out.bias.detach().double().numpy()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-first"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-no-grad"])
def test_multihead_attention_is_recorded_whole_with_its_attention_output(tmp_path, batch_first, training):
    layer = encoder_layer(batch_first).train(training)
    assert list(discover_layers(layer)) == ["self_attn", "linear1", "linear2"]  # out_proj is never called
    x = torch.randn(4, 5, 8)
    with Recorder(layer, tmp_path / "run.zarr", mode="raw") as rec, torch.set_grad_enabled(training):
        layer(x if batch_first else x.transpose(0, 1))
        rec.end_epoch()
    stored = open_run(tmp_path / "run.zarr").ranks[0].raw("self_attn")[:]
    assert stored.shape == (4, 5, 8)  # samples first, whatever the module's layout
    # post-norm layer: the attention reads the layer's input itself
    np.testing.assert_allclose(
        stored, numpy_attention(layer.self_attn, x.double().numpy()), rtol=1e-5, atol=1e-6
    )


def test_out_proj_is_never_listed_and_naming_it_says_why(tmp_path):
    layer = encoder_layer(True)
    assert list(discover_layers(layer, layer_types=[nn.Linear])) == ["linear1", "linear2"]
    with pytest.raises(
        ValueError,
        match=r"layers: 'self_attn-out_proj' is never called: its parent 'self_attn' \(MultiheadAttention\) uses "
        r"its weights directly.*record 'self_attn' instead",
    ):
        Recorder(layer, tmp_path / "run.zarr", layers=["self_attn-out_proj"])


class Bypassing(nn.Module):
    """``inner`` is used through its weights, never called; ``aux`` is called in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.aux = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.inner.weight, self.inner.bias)
        if self.training:
            self.aux(h)
        return self.head(h)


def test_a_recorded_layer_never_called_in_an_epoch_gets_one_warning(tmp_path):
    net = Bypassing()
    with Recorder(net, tmp_path / "run.zarr", mode="gram") as rec:
        with pytest.warns(RuntimeWarning) as caught:
            net(torch.randn(4, 3))
            net.eval()
            net(torch.randn(4, 3))
            rec.end_epoch()
        (message,) = [str(w.message) for w in caught]
        assert "epoch 0: recorded layers never called in this epoch: 'inner';" in message
        assert "'aux'" not in message  # called in training only: a choice of the model, not a fault
        assert "uses the layer's weights directly" in message
        with warnings.catch_warnings():  # said once: later epochs are quiet, and so is a paused one
            warnings.simplefilter("error")
            net.train()
            net(torch.randn(4, 3))
            rec.end_epoch()
            rec.stop()
            rec.end_epoch()
    assert open_run(tmp_path / "run.zarr").layers == ["aux", "head"]


class TokenModel(nn.Module):
    """Embedding -> two TransformerEncoderLayers -> Linear, on token ids (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


def test_any_module_by_name_glob_or_type_is_recorded_as_hooks_see_it(tmp_path, hook_tape):
    model = TokenModel()
    names = ["emb", "enc-layers-*-self_attn", "enc-layers-?", "enc-layers-1-norm2"]
    rec = Recorder(
        model, tmp_path / "run.zarr", mode="both", layers=names, timeseries_methods=("timestepwise",)
    )
    chosen = ["emb", "enc-layers-0", "enc-layers-0-self_attn", "enc-layers-1", "enc-layers-1-self_attn"]
    assert sorted(rec.layer_names) == sorted([*chosen, "enc-layers-1-norm2"])
    by_type = discover_layers(model, layer_types=(nn.Embedding, "LayerNorm"))
    assert list(by_type) == ["emb", *[f"enc-layers-{i}-norm{j}" for i in (0, 1) for j in (1, 2)]]
    tape = hook_tape(rec.layers)
    ids = torch.randint(0, 20, (24, 6), generator=torch.Generator().manual_seed(1))
    epochs = []
    with rec:
        for _ in range(2):
            model.train()
            for batch in ids[:16].split(8):
                model(batch)
            model.eval()
            with torch.no_grad():
                model(ids[16:])
            epochs.append(list(tape.seen))
            tape.clear()
            rec.end_epoch()
    run = open_run(tmp_path / "run.zarr")
    assert [run.layer(n).type for n in ("emb", "enc-layers-0", "enc-layers-1-norm2")] == [
        "Embedding",
        "TransformerEncoderLayer",
        "LayerNorm",
    ]
    want = expected_table(epochs, rec.layer_names, "timestepwise")
    ts = ("timestepwise",)
    assert_close(table_of(tmp_path / "run.zarr", timeseries_methods=ts, source="gram"), want)
    assert_close(table_of(tmp_path / "run.zarr", timeseries_methods=ts, source="raw"), want)


def test_timestepwise_too_wide_says_what_to_use(tmp_path):
    net = nn.Linear(64, 64)
    rec = Recorder(net, tmp_path / "run.zarr", mode="gram", timeseries_methods=("timestepwise",))
    with pytest.raises(
        CaptureError,
        match=r"layer 'Linear': 'timestepwise' makes one column per position and feature, 256 x 64 = 16384 "
        r"columns.*limit 8192\); use timeseries_methods=\('tokenwise',\) \(one row per token\) or "
        r"\('last_timestep',\).*layers= / ignore=",
    ):
        net(torch.randn(2, 256, 64))
    rec.close()
    # tokenwise: 512 rows of 64 columns
    x = torch.randn(2, 256, 64)
    with Recorder(net, tmp_path / "tokens.zarr", mode="gram", timeseries_methods=("tokenwise",)) as rec:
        y = net(x).detach().double().numpy().reshape(-1, 64)
        rec.end_epoch()
    count, mean, m2 = open_run(tmp_path / "tokens.zarr").ranks[0].gram("Linear", "tokenwise").read(0)
    assert count == 512
    np.testing.assert_allclose(mean, y.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m2, (y - y.mean(0)).T @ (y - y.mean(0)), rtol=1e-10, atol=1e-12)


def test_library_types_match_by_name_without_importing_the_library():
    code = (
        "import sys\n"
        "from torch import nn\n"
        "from capture import discover_layers\n"
        "Conv1D = type('Conv1D', (nn.Module,), {'__module__': 'transformers.pytorch_utils'})\n"
        "net = nn.Sequential(nn.Linear(2, 2), Conv1D(), nn.LayerNorm(2))\n"
        "print(list(discover_layers(net)), list(discover_layers(net, layer_types=['LayerNorm'])))\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["['0', '1'] ['2']", "False"]
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(4, 3)
    assert module_kind(conv1d) == "dense" and type_matcher(["Conv1D"])(conv1d)


def test_type_matcher_refuses_what_is_not_a_module_type():
    with pytest.raises(TypeError, match=r"layer_types: item 1 \(3\) is neither a torch.nn.Module subclass"):
        type_matcher([nn.Linear, 3])
    with pytest.raises(TypeError, match=r"layer_types: item 0 \(<class 'int'>\)"):
        discover_layers(nn.Linear(2, 2), layer_types=[int])


def test_mapping_outputs_give_their_first_tensor():
    logits = torch.randn(2, 3)
    out = collections.OrderedDict(logits=logits, hidden=torch.randn(2, 4))
    assert primary_output(nn.Linear(1, 1), out) is logits
    assert primary_output(nn.Linear(1, 1), {"a": 1}) is None
