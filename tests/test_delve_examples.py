"""delve's documented usage runs unchanged but for the import line.

Each example is kept as source text with an ``{IMPORT}`` placeholder and run twice in a fresh
working folder: once with ``from delve import SaturationTracker`` and once with
``from pipelines import SaturationTracker``. Both must run and write the same files and CSV
columns. The examples follow delve's documentation (the regression demo of its gallery with
``stats=["lsat", "lsat_eval"]``, a ``torch.nn.ModuleDict`` of layers, and the README's
CIFAR-10 training loop with ``add_scalar`` and ``save_to="plotcsv"``); only their sizes are
cut down (fake data, a few steps) so that each runs in about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("delve")
pytest.importorskip("tqdm")

IMPORTS = {
    "delve": "from delve import SaturationTracker",
    "pipelines": "from pipelines import SaturationTracker",
}

# delve's gallery example "Extract layer saturation": a two-layer regression net, its layers given
# as a list, stats=["lsat", "lsat_eval"], add_saturations() after every optimiser step.
REGRESSION = """
import torch
from tqdm import trange

{IMPORT}


class TwoLayerNet(torch.nn.Module):
    def __init__(self, D_in, H, D_out):
        super(TwoLayerNet, self).__init__()
        self.linear1 = torch.nn.Linear(D_in, H)
        self.linear2 = torch.nn.Linear(H, D_out)

    def forward(self, x):
        h_relu = self.linear1(x).clamp(min=0)
        return self.linear2(h_relu)


device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
torch.manual_seed(1)

for h in [3, 32]:
    N, D_in, H, D_out = 64, 40, h, 10
    x = torch.randn(N, D_in)
    y = torch.randn(N, D_out)
    model = TwoLayerNet(D_in, H, D_out)
    x, y, model = x.to(device), y.to(device), model.to(device)

    layers = [model.linear1, model.linear2]
    stats = SaturationTracker("regression/h{}".format(h), save_to="plotcsv", modules=layers,
                              device=device, stats=["lsat", "lsat_eval"])

    loss_fn = torch.nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    steps_iter = trange(2, desc="steps", leave=True, position=0)
    for _ in steps_iter:
        y_pred = model(x)
        loss = loss_fn(y_pred, y)
        steps_iter.set_description("loss=%g" % loss.data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats.add_saturations()
    stats.close()
    steps_iter.close()
"""

# A model given as a torch.nn.ModuleDict: layers are found recursively and named by their path.
MODULE_DICT = """
import torch
from torch import nn

{IMPORT}

torch.manual_seed(0)
model = nn.ModuleDict({
    "encoder": nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
    "decoder": nn.Linear(4, 8),
})
tracker = SaturationTracker("moduledict", save_to=["csv", "npy"], modules=model, device="cpu",
                            stats=["lsat", "idim", "trc"])
optimizer = torch.optim.Adam(model.parameters())
data = torch.randn(48, 8)
for epoch in range(2):
    model.train()
    for batch in data.split(16):
        optimizer.zero_grad()
        loss = ((model["decoder"](model["encoder"](batch)) - batch) ** 2).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model["decoder"](model["encoder"](data))
    tracker.add_scalar("loss", loss.item())
    tracker.add_saturations()
tracker.close()
"""

# The README's demo: a classifier trained on CIFAR-10 with a train loop, an eval loop, two
# add_scalar calls and add_saturations() per epoch. A small VGG-like net on fake 16 x 16 images.
CIFAR = """
import torch
from torch.cuda import is_available
from torch.nn import CrossEntropyLoss
from torch.optim import Adam
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

{IMPORT}

device = "cuda:0" if is_available() else "cpu"
torch.manual_seed(0)
train_data = TensorDataset(torch.rand(32, 3, 16, 16), torch.randint(0, 10, (32,)))
test_data = TensorDataset(torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,)))
train_loader = DataLoader(train_data, batch_size=8, shuffle=True)
test_loader = DataLoader(test_data, batch_size=8, shuffle=False)

model = torch.nn.Sequential(
    torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
    ),
    torch.nn.Flatten(),
    torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)),
).to(device)
optimizer = Adam(params=model.parameters())
criterion = CrossEntropyLoss().to(device)

tracker = SaturationTracker("my_experiment", save_to="plotcsv", modules=model, device=device)

for epoch in range(2):
    model.train()
    for (images, labels) in tqdm(train_loader):
        images, labels = images.to(device), labels.to(device)
        prediction = model(images)
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.amp.autocast():
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()

    total = 0
    test_loss = 0
    correct = 0
    model.eval()
    for (images, labels) in tqdm(test_loader):
        images, labels = images.to(device), labels.to(device)
        outputs = model(images)
        loss = criterion(outputs, labels)
        _, predicted = torch.max(outputs.data, 1)
        total += labels.size(0)
        correct += torch.sum((predicted == labels)).item()
        test_loss += loss.item()

    tracker.add_scalar("accuracy", correct / total)
    tracker.add_scalar("loss", test_loss / total)
    tracker.add_saturations()

tracker.close()
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(source: str, package: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    folder.mkdir()
    monkeypatch.chdir(folder)
    namespace: dict[str, object] = {"__name__": f"example_{package}"}
    code = compile(source.replace("{IMPORT}", IMPORTS[package]), f"<example {package}>", "exec")
    exec(code, namespace)  # noqa: S102 - the example under test
    return namespace


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _both(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for package in IMPORTS:
        _run(source, package, tmp_path / package, monkeypatch)
    return tmp_path / "delve", tmp_path / "pipelines"


def _columns(path: Path) -> list[str]:
    return list(pd.read_csv(path, sep=";", index_col=0).columns)


def test_regression_demo(tmp_path, monkeypatch):
    theirs, ours = _both(REGRESSION, tmp_path, monkeypatch)
    # delve also saves empty plots of the eval phase, which this example never runs
    assert _files(ours) == {f for f in _files(theirs) if "_lsat_eval_" not in f}
    for h in (3, 32):
        csv = ours / "regression" / f"h{h}.csv"
        assert _columns(csv) == _columns(theirs / "regression" / f"h{h}.csv")
        table = pd.read_csv(csv, sep=";", index_col=0)
        assert list(table.columns) == ["train-saturation_Module-0-Linear", "train-saturation_Module-1-Linear"]
        assert len(table) == 2 and table.map(lambda v: 0 < v <= 1).all().all()
        assert (ours / "regression" / f"h{h}_lsat_train_epoch_1.png").exists()


def test_module_dict(tmp_path, monkeypatch):
    theirs, ours = _both(MODULE_DICT, tmp_path, monkeypatch)
    assert _files(ours) == _files(theirs)
    columns = _columns(ours / "moduledict.csv")
    assert columns == _columns(theirs / "moduledict.csv")
    assert columns[:2] == ["loss", "train-saturation_encoder-0"]
    assert {c.rsplit("_", 1)[1] for c in columns[1:]} == {"encoder-0", "encoder-2", "decoder"}


# delve's README example (run verbatim) uses torch.cuda.amp.autocast, deprecated in torch and
# disabled without CUDA: torch warns about both.
@pytest.mark.filterwarnings(
    r"ignore:`torch.cuda.amp.autocast\(args...\)` is deprecated:FutureWarning",
    "ignore:CUDA is not available or torch_xla is imported. Disabling autocast:UserWarning",
)
def test_cifar_training_loop(tmp_path, monkeypatch):
    theirs, ours = _both(CIFAR, tmp_path, monkeypatch)
    assert _files(ours) == _files(theirs)
    columns = _columns(ours / "my_experiment.csv")
    assert columns == _columns(theirs / "my_experiment.csv")
    layers = ["0-0", "0-3", "2-0", "2-2"]
    assert columns == ["accuracy", "loss"] + [
        f"{p}-saturation_{layer}" for p in ("train", "eval") for layer in layers
    ]
    assert os.path.isdir(ours / "my_experiment")
