"""Signature QA on real recorded training: regressions of reported misses, a false-positive
hunt on ordinary healthy setups that are not sample runs, and false-negative checks that
cause a pathology differently from its sample run.

Every run is a tiny model trained on CPU with the real Collector, recorded once per session
(on first use) and analyzed by the real engine.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import runlens
from runlens.context import Context
from runlens.signatures._curves import start_level
from runlens.signatures._layers import param_info

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sample_runs.common import (  # noqa: E402 (needs ROOT on sys.path)
    Data,
    fit,
    gaussian_mixture,
    mlp,
    smooth_regression,
)

CLASSES = 8
DIM = 16
SERIOUS = ("warning", "error")
ce = nn.functional.cross_entropy


def _cfg(**kw: object) -> dict[str, object]:
    return {"num_classes": CLASSES, "task": "classification", **kw}


def _mixture(seed: int, n: int = 2048) -> Data:
    return gaussian_mixture(n, 512, DIM, CLASSES, seed=seed, sep=1.0, clusters_per_class=2)


def _classifier(
    run_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    *,
    seed: int,
    steps: int,
    batch_size: int = 32,
    data: Data | None = None,
    **kw: object,
) -> None:
    fit(
        run_dir,
        model,
        opt,
        data if data is not None else _mixture(seed),
        steps=steps,
        batch_size=batch_size,
        loss_fn=ce,
        config=_cfg(batch_size=batch_size),
        seed=seed,
        **kw,  # type: ignore[arg-type]
    )


# -- reported problems -------------------------------------------------------------------


def blowup_regression(run_dir: Path) -> None:
    """MLP regression, Adam at lr 10: the loss jumps from ~0.5 to ~1e10 at step 1 and ends
    around 100, finite, never back near its start."""
    torch.manual_seed(0)
    model = mlp([DIM, 32, 32, 1])
    fit(
        run_dir,
        model,
        torch.optim.Adam(model.parameters(), lr=10.0),
        smooth_regression(2048, 256, DIM, seed=0),
        steps=100,
        batch_size=32,
        loss_fn=nn.functional.mse_loss,
        config={"task": "regression", "lr": 10.0},
        seed=0,
        classification=False,
    )


def blowup_classifier(run_dir: Path) -> None:
    """tanh MLP classifier, Adam at lr 10: from ln(8) at step 0 to ~100 and it stays there
    (saturated tanh units, huge logits), finite throughout."""
    torch.manual_seed(0)
    model = mlp([DIM, 32, 32, CLASSES], act=nn.Tanh)
    _classifier(run_dir, model, torch.optim.Adam(model.parameters(), lr=10.0), seed=0, steps=120)


def nested_frozen(run_dir: Path) -> None:
    """Sequential inside Sequential (parameter names like ``0.0.weight``), with the first
    Linear frozen by ``requires_grad=False``."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(DIM, 32), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Linear(32, 32), nn.ReLU())),
        nn.Linear(32, CLASSES),
    )
    model[0][0].requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _classifier(run_dir, model, opt, seed=3, steps=150)


def noisy_plateau(run_dir: Path) -> None:
    """A linear model on multi-blob classes with batches of 4: a plateau whose loss jumps
    from batch to batch (independent noise), not an oscillation."""
    torch.manual_seed(4)
    model = nn.Linear(DIM, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _classifier(run_dir, model, opt, seed=4, steps=300, batch_size=4)


# -- healthy setups that are not sample runs ---------------------------------------------


def adam_cosine(run_dir: Path) -> None:
    """3-layer MLP, Adam 1e-3 with a cosine schedule to 0."""
    torch.manual_seed(20)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    _classifier(run_dir, model, opt, seed=20, steps=300, scheduler=sched)


def sgd_step_decay(run_dir: Path) -> None:
    """MLP, SGD+momentum 0.9 at lr 0.05 (no warm-up), ×0.1 at steps 150 and 250."""
    torch.manual_seed(21)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [150, 250], gamma=0.1)
    _classifier(run_dir, model, opt, seed=21, steps=300, scheduler=sched)


def _blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10×10 single-channel images: a class-specific 3×3 blob position plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    rows, cols = (y // 4) * 4 + 1, (y % 4) * 2 + 1
    x = 0.6 * torch.randn(n, 1, 10, 10, generator=g)
    r = torch.arange(10)
    mask = ((r[None, :] - rows[:, None]).abs() <= 1)[:, :, None] & (
        (r[None, :] - cols[:, None]).abs() <= 1
    )[:, None, :]
    return x + 1.5 * mask[:, None].float(), y


def cnn_bn_dropout(run_dir: Path) -> None:
    """Conv-BN-ReLU ×2 with pooling and dropout 0.3 before the head, Adam 2e-3."""
    torch.manual_seed(22)
    x, y = _blob_images(2304, seed=22)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(16, CLASSES),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = Data(x[:2048], y[:2048], x[2048:], y[2048:])
    _classifier(run_dir, model, opt, seed=22, steps=150, data=data, val_every=15)


class _SeqClassifier(nn.Module):
    """Embedding → LSTM → last hidden state → Linear."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


def lstm_sequence(run_dir: Path) -> None:
    """LSTM classifying token sequences by their first token (it must carry it across 10
    steps), Adam 3e-3."""
    torch.manual_seed(23)
    g = torch.Generator().manual_seed(23)
    tokens = torch.randint(0, CLASSES, (2560, 10), generator=g)
    labels = tokens[:, 0].clone()
    data = Data(tokens[:2048], labels[:2048], tokens[2048:], labels[2048:])
    model = _SeqClassifier(CLASSES, 24)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    _classifier(run_dir, model, opt, seed=23, steps=200, data=data)


class _Transformer(nn.Module):
    def __init__(self, vocab: int, d: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=2 * d, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(dim=1))


def transformer_warmup(run_dir: Path) -> None:
    """2-layer pre-norm transformer with dropout; AdamW 2e-3 with 40 steps of linear
    warm-up then cosine decay. Label: the token that appears most often."""
    torch.manual_seed(24)
    g = torch.Generator().manual_seed(24)
    tokens = torch.randint(0, CLASSES, (2560, 10), generator=g)
    counts = nn.functional.one_hot(tokens, CLASSES).sum(1).float()
    labels = (counts + 0.01 * torch.arange(CLASSES)).argmax(1)
    data = Data(tokens[:2048], labels[:2048], tokens[2048:], labels[2048:])
    model = _Transformer(CLASSES, 24, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < 40:
            return (step + 1) / 40
        return 0.5 * (1 + math.cos(math.pi * (step - 40) / 160))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    _classifier(run_dir, model, opt, seed=24, steps=200, data=data, scheduler=sched)


class _TiedLM(nn.Module):
    """Next-token model whose output layer shares the embedding matrix (weight tying)."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Sequential(nn.Linear(2 * d, d), nn.Tanh())
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(self.embed(ctx).flatten(1)))


def weight_tied(run_dir: Path) -> None:
    """Predict the next token of a noisy rule (next = a + b mod V) from the two previous
    tokens with a tied embedding/output matrix, Adam 3e-3."""
    torch.manual_seed(25)
    g = torch.Generator().manual_seed(25)
    vocab = CLASSES
    ctx = torch.randint(0, vocab, (2560, 2), generator=g)
    nxt = (ctx[:, 0] + ctx[:, 1]) % vocab
    noisy = torch.rand(2560, generator=g) < 0.1
    nxt = torch.where(noisy, torch.randint(0, vocab, (2560,), generator=g), nxt)
    data = Data(ctx[:2048], nxt[:2048], ctx[2048:], nxt[2048:])
    model = _TiedLM(vocab, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    _classifier(run_dir, model, opt, seed=25, steps=250, data=data)


# -- pathologies caused differently from their sample runs --------------------------------


def lr_ramp_divergence(run_dir: Path) -> None:
    """A scheduler bug: ExponentialLR with gamma 1.04 (meant 0.96). The loss first falls,
    then the growing LR drives it back up."""
    torch.manual_seed(30)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.04)
    _classifier(run_dir, model, opt, seed=30, steps=200, scheduler=sched)


def wrong_params_flat(run_dir: Path) -> None:
    """The optimizer is built on a deep copy of the model (a refactoring bug): the trained
    model never changes, at a normal LR."""
    torch.manual_seed(31)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.Adam(copy.deepcopy(model).parameters(), lr=1e-3)
    _classifier(run_dir, model, opt, seed=31, steps=150)


def corrupt_batch_nan(run_dir: Path) -> None:
    """One corrupt batch with a NaN feature at step 60 (a bad record, not an overflow)."""
    torch.manual_seed(32)
    model = mlp([DIM, 64, 64, CLASSES])

    def hook(step: int, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        if step == 60:
            x = x.clone()
            x[3, 5] = float("nan")
        return x, y

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _classifier(run_dir, model, opt, seed=32, steps=100, batch_hook=hook)


def momentum_oscillation(run_dir: Path) -> None:
    """SGD with momentum 0.99 (meant 0.9) at lr 0.02 — not a too-high LR, as in the
    sample: the heavy ball overshoots and the loss swings over several steps at a time,
    without improving."""
    torch.manual_seed(40)
    model = mlp([DIM, 64, 64, CLASSES])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.99)
    _classifier(run_dir, model, opt, seed=40, steps=300)


def adam_lr_dead_relu(run_dir: Path) -> None:
    """Adam at lr 1 (not a bad bias init, as in the sample): the first steps push the
    last hidden ReLU layer's pre-activations negative for every input."""
    torch.manual_seed(34)
    model = mlp([DIM, 32, 32, CLASSES])
    _classifier(run_dir, model, torch.optim.Adam(model.parameters(), lr=1.0), seed=34, steps=120)


RECORDERS: dict[str, Callable[[Path], None]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        blowup_regression,
        blowup_classifier,
        nested_frozen,
        noisy_plateau,
        adam_cosine,
        sgd_step_decay,
        cnn_bn_dropout,
        lstm_sequence,
        transformer_warmup,
        weight_tied,
        lr_ramp_divergence,
        wrong_params_flat,
        corrupt_batch_nan,
        momentum_oscillation,
        adam_lr_dead_relu,
    )
}


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> run directory, recorded on first use (so -k runs only what it needs)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qa_runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            RECORDERS[name](root / name)
            done[name] = root / name
        return done[name]

    return get


@pytest.fixture(scope="session")
def report_of(recorded: Callable[[str], Path]) -> Callable[[str], runlens.Report]:
    cache: dict[str, runlens.Report] = {}

    def get(name: str) -> runlens.Report:
        if name not in cache:
            cache[name] = runlens.analyze(recorded(name))
        return cache[name]

    return get


def serious(report: runlens.Report) -> dict[str, runlens.Finding]:
    return {f.signature: f for f in report.findings if f.severity in SERIOUS}


def evidence(f: runlens.Finding, name: str) -> float:
    return next(e.value for e in f.evidence if e.name == name)


def raw_loss(path: Path) -> np.ndarray:
    s = runlens.load_run(path).scalar("train/loss")
    assert s is not None
    return s.values


# -- 1. a blow-up that stays is divergence -----------------------------------------------


@pytest.mark.parametrize("name", ["blowup-regression", "blowup-classifier"])
def test_blowup_and_stay_is_divergence(
    recorded: Callable[[str], Path], report_of: Callable[[str], runlens.Report], name: str
) -> None:
    raw = raw_loss(recorded(name))
    assert np.isfinite(raw).all(), "the loss must stay finite: this is not a NaN case"
    assert raw[1] > 30 * raw[0] and np.median(raw[-10:]) > 20 * raw[0]
    f = serious(report_of(name)).get("loss-divergence")
    assert f is not None and f.severity == "error"
    # Measured from the real start (step 0), and the rise placed at the blow-up.
    assert evidence(f, "best level") == pytest.approx(raw[0])
    assert f.steps is not None and f.steps[0] <= 2
    assert evidence(f, "late level") > 20 * raw[0]


# -- 2. the initial loss is the loss at the start, before any blow-up ---------------------


@pytest.mark.parametrize("name", ["blowup-classifier", "adam-lr-dead-relu"])
def test_initial_loss_is_taken_before_the_blowup(
    recorded: Callable[[str], Path], report_of: Callable[[str], runlens.Report], name: str
) -> None:
    path = recorded(name)
    raw = raw_loss(path)
    chance = math.log(CLASSES)
    # Step 0 is at chance level; step 1 already tens of times higher.
    assert raw[0] < 1.1 * chance and raw[1] > 20 * chance
    assert "bad-initial-loss" not in serious(report_of(name))
    ctx = Context(runlens.load_run(path))
    assert ctx.train_loss is not None
    assert start_level(ctx.train_loss) == pytest.approx(raw[0])


def test_initial_level_still_uses_several_points_when_there_is_no_blowup(
    recorded: Callable[[str], Path],
) -> None:
    """The blow-up cut must not reduce a noisy start to its first point: batches of 4 give
    a first loss far from the others, and the start is still a median of several."""
    path = recorded("noisy-plateau")
    raw = raw_loss(path)
    ctx = Context(runlens.load_run(path))
    assert ctx.train_loss is not None
    k = int(min(10, max(3, round(0.02 * raw.size))))
    assert start_level(ctx.train_loss) == pytest.approx(float(np.median(raw[:k])))


# -- 3. parameter names of nested models -------------------------------------------------


def _nested_numel_share() -> float:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(DIM, 32), nn.ReLU()),
        nn.Sequential(nn.Sequential(nn.Linear(32, 32), nn.ReLU())),
        nn.Linear(32, CLASSES),
    )
    frozen = sum(p.numel() for p in model[0].parameters())
    return frozen / sum(p.numel() for p in model.parameters())


def test_nested_model_parameter_names_match_the_layer_rows(
    recorded: Callable[[str], Path],
) -> None:
    run = runlens.load_run(recorded("nested-frozen"))
    rows = set(run.layer_names)
    assert {"0.0.weight", "1.0.0.weight", "2.weight"} <= rows
    info = param_info(Context(run))
    assert set(info) == rows  # no "0.0.0.0.weight"
    assert info["1.0.0.weight"].shape == (32, 32) and info["0.0.weight"].requires_grad is False


def test_frozen_layer_in_a_nested_model_reports_requires_grad_and_share(
    report_of: Callable[[str], runlens.Report],
) -> None:
    # Freezing by requires_grad=False is deliberate far more often than not: info.
    assert "frozen-layer" not in serious(report_of("nested-frozen"))
    (f,) = [f for f in report_of("nested-frozen").findings if f.signature == "frozen-layer"]
    assert f.severity == "info" and set(f.layers) == {"0.0.weight", "0.0.bias"}
    assert "requires_grad=False" in f.summary and f.confidence == pytest.approx(0.6)
    assert evidence(f, "share of parameter elements frozen") == pytest.approx(_nested_numel_share())


def test_layer_names_from_run_json_when_there_are_no_weight_rows(tmp_path: Path) -> None:
    """Without weight rows Run.layer_names falls back to run.json, which the collector
    writes with full names: they must not get the module path prepended again."""
    from runlens_collect import Collector

    torch.manual_seed(5)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Collector(model, opt, run_dir=str(tmp_path / "r"), kinds=("grad",)) as col:
        for _ in range(3):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step(loss=loss)
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert any(p["name"] == "0.0.weight" for m in meta["model"]["modules"] for p in m["params"])
    run = runlens.load_run(tmp_path / "r")
    assert run.layer_matrix("weight", "norm") is None
    assert run.layer_names == tuple(n for n, _ in model.named_parameters())


# -- 4. oscillation needs multi-step swings, not just a wide noisy band --------------------


def test_noisy_plateau_is_not_an_oscillation(
    recorded: Callable[[str], Path], report_of: Callable[[str], runlens.Report]
) -> None:
    assert "loss-oscillation" not in serious(report_of("noisy-plateau"))
    # The band alone would have called it one: without the variance-ratio gate it fires.
    r = runlens.analyze(
        recorded("noisy-plateau"),
        runlens.AnalyzeOptions(
            only=("loss-oscillation",),
            overrides={"loss-oscillation": {"min_variance_ratio": 0.0}},
        ),
    )
    f = serious(r)["loss-oscillation"]
    assert evidence(f, "variance ratio (5-step)") < 1.2


# -- false-positive hunt: ordinary healthy setups -----------------------------------------

HEALTHY = (
    "adam-cosine",
    "sgd-step-decay",
    "cnn-bn-dropout",
    "lstm-sequence",
    "transformer-warmup",
    "weight-tied",
)


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_setups_raise_nothing(report_of: Callable[[str], runlens.Report], name: str):
    r = report_of(name)
    got = {s: f.summary for s, f in serious(r).items()}
    assert not got, f"{name}: {got}"
    assert r.summary.final_train_loss is not None
    assert r.summary.final_train_loss < 0.9 * math.log(CLASSES)  # it did learn


# -- false-negative checks: the pathology caused another way -----------------------------


@pytest.mark.parametrize(
    ("name", "signature", "severity"),
    [
        ("lr-ramp-divergence", "loss-divergence", "error"),
        ("wrong-params-flat", "loss-flat", "error"),
        ("corrupt-batch-nan", "nan-inf", "error"),
        ("momentum-oscillation", "loss-oscillation", "warning"),
        ("adam-lr-dead-relu", "dead-relu", "error"),
        ("blowup-regression", "exploding-gradients", "error"),
    ],
)
def test_pathology_caused_differently_is_found(
    report_of: Callable[[str], runlens.Report], name: str, signature: str, severity: str
) -> None:
    found = serious(report_of(name))
    assert signature in found, f"{name}: expected {signature}, got {sorted(found)}"
    assert found[signature].severity == severity


def test_corrupt_batch_nan_is_placed_at_the_batch_and_first_layer(
    report_of: Callable[[str], runlens.Report],
) -> None:
    f = serious(report_of("corrupt-batch-nan"))["nan-inf"]
    assert f.steps is not None and f.steps[0] == 60
    assert "`0`" in f.summary  # the first Linear's output is the first non-finite tensor


def test_growing_lr_is_not_treated_as_a_warmup(recorded: Callable[[str], Path]) -> None:
    """ExponentialLR(gamma > 1) peaks at the last step; a warm-up can cover at most half
    the run, or every sustained-behaviour signature would see nothing."""
    ctx = Context(runlens.load_run(recorded("lr-ramp-divergence")))
    assert ctx.steps is not None
    first, last = ctx.steps
    assert ctx.transient_end <= first + (last - first) // 2
