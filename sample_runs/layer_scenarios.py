"""Sample runs for the layer signatures: one run per layer-level problem, caused the way it
is caused in practice (a stray ``.detach()``, a negative bias init, a softmax before
``CrossEntropyLoss``, a learning rate of 1e-7...), plus healthy runs on real architectures
(convolutions with BatchNorm, a small transformer encoder) that must raise nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from sample_runs.common import (
    CLASSES,
    COLLECTOR_OPTIONS,
    DIM,
    Data,
    Scenario,
    classifier_config,
    classifier_data,
    fit,
    mlp,
    seeded,
)

ce = nn.functional.cross_entropy


def _scaled_init(model: nn.Module, gain: float) -> None:
    """Weights N(0, gain²/fan_in), biases 0 (Kaiming is gain √2 for ReLU)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, gain / math.sqrt(m.in_features))
                m.bias.zero_()


# -- healthy runs on real architectures ---------------------------------------------------


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """12×12 single-channel images: a class-specific pattern of two bright squares plus
    noise, shifted by up to 2 pixels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    pos = torch.randint(0, 8, (CLASSES, 2, 2), generator=torch.Generator().manual_seed(99))
    x = 0.5 * torch.randn(n, 1, 12, 12, generator=g)
    shift = torch.randint(-1, 2, (n, 2), generator=g)
    for i in range(n):  # data generation only, not the training loop
        for r, c in pos[y[i]]:
            r2, c2 = int(r + shift[i, 0]).__abs__() % 9, int(c + shift[i, 1]).__abs__() % 9
            x[i, 0, r2 : r2 + 3, c2 : c2 + 3] += 1.5
    return x, y


def healthy_cnn_bn(run_dir: Path) -> None:
    """Conv-BatchNorm-ReLU ×3 with pooling on synthetic 12×12 images, Adam 1e-3."""
    seeded(10)
    x, y = _images(2560, seed=10)
    data = Data(x[:2048], y[:2048], x[2048:], y[2048:])

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=32,
        loss_fn=ce,
        config=classifier_config(lr=1e-3, arch="cnn-bn"),
        seed=10,
        val_every=20,
    )


class _TinyTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h.mean(dim=1)))


def healthy_transformer(run_dir: Path) -> None:
    """2-layer pre-norm TransformerEncoder classifying token sequences (label = the most
    frequent of the first 8 tokens), AdamW 1e-3."""
    seeded(11)
    g = torch.Generator().manual_seed(11)
    vocab, length, n = 16, 12, 3072
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    counts = nn.functional.one_hot(tokens, vocab)[..., :CLASSES].sum(1).float()
    labels = (counts + 0.01 * torch.arange(CLASSES)).argmax(1)  # ties: deterministic
    data = Data(tokens[:2560], labels[:2560], tokens[2560:], labels[2560:])
    model = _TinyTransformer(vocab, 32, length)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=32,
        loss_fn=ce,
        config=classifier_config(lr=1e-3, arch="transformer"),
        seed=11,
        val_every=20,
    )


# -- one run per layer problem --------------------------------------------------------------


class _IRNN(nn.Module):
    """A ReLU RNN with identity-initialized recurrent weights (Le et al. 2015, "IRNN")."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(hidden))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.zero_()
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def exploding_gradients(run_dir: Path) -> None:
    """ReLU RNN (identity recurrent init) over 40-step sequences, SGD+momentum at lr 0.01
    without gradient clipping: the recurrent weights grow past 1 and the gradient norm
    jumps by ~10 orders of magnitude and stays there (Pascanu et al. 2013)."""
    seeded(20)
    g = torch.Generator().manual_seed(20)
    x = torch.rand(3072, 40, 2, generator=g)
    y = x[..., :1].sum(1) / 10  # the (scaled) sum of the first input channel
    data = Data(x[:2560], y[:2560], x[2560:], y[2560:])
    model = _IRNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=150,
        batch_size=64,
        loss_fn=nn.functional.mse_loss,
        config={"task": "regression", "lr": 0.01, "clip": None},
        seed=20,
        classification=False,
    )


def vanishing_gradients(run_dir: Path) -> None:
    """12-layer sigmoid MLP with default init and SGD: the gradient shrinks ~4× per layer
    on its way back, so the first layers get ~1e-6 of the last layers' gradient."""
    seeded(21)
    data = classifier_data(21)
    model = mlp([DIM] + [32] * 11 + [CLASSES], act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=0.1, act="sigmoid", depth=12),
        seed=21,
    )


class _DetachedMLP(nn.Module):
    """A 3-layer MLP whose forward has a stray ``.detach()`` after the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, 64)
        self.hidden = nn.Linear(64, 64)
        self.out = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x)).detach()  # the bug: cuts `inp` off the graph
        return self.out(torch.relu(self.hidden(h)))


def frozen_layer(run_dir: Path) -> None:
    """MLP with a stray .detach(): `inp.weight`/`inp.bias` never get a gradient."""
    seeded(22)
    data = classifier_data(22)
    model = _DetachedMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=150,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=1e-3),
        seed=22,
    )


def dead_relu(run_dir: Path) -> None:
    """ReLU MLP whose first-layer biases are initialized at -2.5 (inputs have std ~1.4):
    most first-layer units never fire for any input, and never recover."""
    seeded(23)
    data = classifier_data(23)
    model = mlp([DIM, 64, 64, CLASSES])
    with torch.no_grad():
        model[0].bias.fill_(-2.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=1e-3, bias_init=-2.5),
        seed=23,
    )


def saturated_activations(run_dir: Path) -> None:
    """tanh MLP on inputs scaled ×20 (no normalization): pre-activations are huge and
    most outputs sit at ±1."""
    seeded(24)
    data = classifier_data(24)
    data = Data(data.x * 20, data.y, data.xv * 20, data.yv)
    model = mlp([DIM, 64, 64, 64, CLASSES], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=0.01, act="tanh", input_scale=20),
        seed=24,
    )


def activation_explosion(run_dir: Path) -> None:
    """10-layer ReLU MLP without normalization, init gain 4 (Kaiming is 1.41), small Adam
    LR: every layer multiplies the activation scale by ~2.8."""
    seeded(25)
    data = classifier_data(25)
    model = mlp([DIM] + [64] * 9 + [CLASSES])
    _scaled_init(model, 4.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=150,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=1e-4, init_gain=4.0),
        seed=25,
    )


def tiny_updates(run_dir: Path) -> None:
    """A healthy MLP trained with Adam at lr 1e-7 (a typo for 1e-3)."""
    seeded(26)
    data = classifier_data(26)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-7)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=1e-7),
        seed=26,
    )


def large_updates(run_dir: Path) -> None:
    """A healthy MLP trained with plain SGD at lr 2.0 (a copy-paste from an Adadelta
    example): every step changes the weights by ~10% of their norm."""
    seeded(27)
    data = classifier_data(27)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=200,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=2.0),
        seed=27,
    )


def logits_as_probabilities(run_dir: Path) -> None:
    """MLP ending in nn.Softmax, trained with CrossEntropyLoss (softmax applied twice)."""
    seeded(28)
    data = classifier_data(28, sep=2.0)
    model = nn.Sequential(mlp([DIM, 64, 64, CLASSES]), nn.Softmax(dim=1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(
        run_dir,
        model,
        opt,
        data,
        steps=300,
        batch_size=64,
        loss_fn=ce,
        config=classifier_config(lr=3e-3),
        seed=28,
    )


class _SlowDataset(torch.utils.data.Dataset):
    """Items that take 2 ms each to "decode" (a sleep standing in for slow I/O)."""

    def __init__(self, data: Data) -> None:
        self.x, self.y = data.x, data.y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(0.002)
        return self.x[i], self.y[i]


def input_bound(run_dir: Path) -> None:
    """Small MLP fed by a DataLoader (num_workers=0) over a dataset whose __getitem__
    sleeps 2 ms: ~16 ms per batch waiting vs well under 1 ms of compute."""
    from runlens_collect import Collector

    seeded(29)
    data = classifier_data(29)
    loader = torch.utils.data.DataLoader(
        _SlowDataset(data),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(29),
    )
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with Collector(
        model,
        opt,
        run_dir=str(run_dir),
        config=classifier_config(lr=1e-3, num_workers=0),
        **COLLECTOR_OPTIONS,
    ) as col:
        for step, (xb, yb) in enumerate(loader):
            loss = ce(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
            if step + 1 >= 80:
                break


SCENARIOS: list[Scenario] = [
    Scenario("healthy-cnn-bn", healthy_cnn_bn.__doc__ or "", (), healthy_cnn_bn),
    Scenario("healthy-transformer", healthy_transformer.__doc__ or "", (), healthy_transformer),
    Scenario(
        "exploding-gradients",
        exploding_gradients.__doc__ or "",
        ("exploding-gradients",),
        exploding_gradients,
    ),
    Scenario(
        "vanishing-gradients",
        vanishing_gradients.__doc__ or "",
        ("vanishing-gradients",),
        vanishing_gradients,
    ),
    Scenario("frozen-layer", frozen_layer.__doc__ or "", ("frozen-layer",), frozen_layer),
    Scenario("dead-relu", dead_relu.__doc__ or "", ("dead-relu",), dead_relu),
    Scenario(
        "saturated-activations",
        saturated_activations.__doc__ or "",
        ("saturated-activations",),
        saturated_activations,
    ),
    Scenario(
        "activation-explosion",
        activation_explosion.__doc__ or "",
        ("activation-explosion",),
        activation_explosion,
    ),
    Scenario("tiny-updates", tiny_updates.__doc__ or "", ("tiny-updates",), tiny_updates),
    Scenario("large-updates", large_updates.__doc__ or "", ("large-updates",), large_updates),
    Scenario(
        "logits-as-probabilities",
        logits_as_probabilities.__doc__ or "",
        ("logits-as-probabilities",),
        logits_as_probabilities,
    ),
    Scenario("input-bound", input_bound.__doc__ or "", ("input-bound",), input_bound),
]
