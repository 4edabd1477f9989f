"""The compress methods' pure parts on tiny networks: structured pruning removes exactly the
weakest units (the pruned network computes what the full one computes with them zeroed), the
gate's verdicts both ways, the choice, the soft targets, the fitting loop's determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.nets import build_network, load_network
from stages.common.config import CompressParams
from stages.compress import distill, fit, gate, prune
from stages.compress.measure import Measurement

MLP = {"model": "mlp", "hidden_sizes": [8, 6], "dropout": 0.0}
CNN = {"model": "cnn", "channels": [4, 6], "image_shape": [1, 8, 8], "dropout": 0.0}


def _zero_removed(module: torch.nn.Module, fraction: float) -> torch.nn.Module:
    """The full network with the units pruning removes zeroed (weights in, bias, and weights
    out: those only ever multiply a 0): after a ReLU they output 0, so it must compute exactly
    what the pruned network computes."""
    layers = prune._chain(module)
    with torch.no_grad():
        for layer, after in zip(layers[:-1], layers[1:], strict=True):
            keep = prune.kept_units(layer.weight, fraction)
            removed = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            removed[keep] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
            after.weight[:, removed] = 0
    return module


@pytest.mark.parametrize(
    ("spec", "n_features", "field", "widths"),
    [
        (MLP, 5, "hidden_sizes", [4, 3]),
        (CNN, 64, "channels", [2, 3]),
    ],
)
def test_pruning_removes_the_weakest_units_and_nothing_else(
    tmp_path: Path, spec: dict, n_features: int, field: str, widths: list[int]
) -> None:
    torch.manual_seed(0)
    full = build_network(spec, n_features, 3).eval()
    rows = torch.randn(7, n_features)

    pruned, new_spec = prune.prune_network(full, spec, n_features, 3, fraction=0.5)

    assert new_spec[field] == widths and spec[field] != widths  # the parent's params untouched
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(rows), _zero_removed(full, 0.5)(rows))
    # saved like train's model.pt, it loads as the smaller architecture
    result = fit.FitResult(0, 0.0, 0)
    torch.save(fit.checkpoint(pruned, new_spec, n_features, 3, result, {}), tmp_path / "m.pt")
    loaded, meta = load_network(tmp_path / "m.pt")
    assert meta["train_params"][field] == widths
    with torch.no_grad():
        torch.testing.assert_close(loaded(rows), pruned(rows))


def test_kept_units_are_the_largest_l1_norms_in_their_order() -> None:
    weight = torch.tensor([[1.0, 1.0], [0.1, 0.0], [-3.0, 0.0], [0.5, 0.5]])
    assert prune.kept_units(weight, 0.5).tolist() == [0, 2]
    assert prune.kept_units(weight, 0.99).tolist() == [2]  # at least one unit stays


def test_only_mlp_and_cnn_are_pruned_and_only_networks_quantized() -> None:
    from stages.compress.quantize import quantizable_reason

    assert prune.prunable_reason("mlp") is None and prune.prunable_reason("cnn") is None
    assert "attention heads" in prune.prunable_reason("transformer")
    assert "the parent is 'gbdt'" in prune.prunable_reason("gbdt")
    assert "no ONNX export" in quantizable_reason("gbdt")
    assert "ensemble" in quantizable_reason("ensemble")
    # onnxruntime has an int8 LSTM, no int8 GRU: a GRU (rnn's default cell) is skipped
    lstm = {"model": "rnn", "rnn": {"cell": "lstm", "sequence_length": 5}}
    assert quantizable_reason("rnn", lstm) is None
    assert quantizable_reason("rnn", {**lstm, "rnn": {"cell": "transformer"}}) is None
    for gru in ({**lstm, "rnn": {"cell": "gru"}}, {"model": "rnn"}):
        reason = quantizable_reason("rnn", gru)
        assert "GRU" in reason and "train.rnn.cell: lstm" in reason


def _measured(accuracy: float, size: int, row_ms: float) -> Measurement:
    return Measurement(
        "m", "0" * 64, "mlp", {"accuracy": accuracy, "log_loss": 1 - accuracy}, size, row_ms, 1.0
    )


PARENT = _measured(0.90, 30_000, 1.0)
CP = CompressParams(max_relative_drop=0.01, min_speedup=1.5, min_size_ratio=3.0)


def test_the_gate_passes_a_small_enough_loss_with_either_gain() -> None:
    smaller = gate.judge(PARENT, _measured(0.895, 9_000, 1.0), CP)  # 3.3x smaller only
    faster = gate.judge(PARENT, _measured(0.90, 29_000, 0.5), CP)  # 2x faster only
    better = gate.judge(PARENT, _measured(0.93, 5_000, 1.0), CP)

    assert smaller["status"] == faster["status"] == better["status"] == "passed"
    assert smaller["relative_drop"] == pytest.approx(0.005 / 0.9)
    assert better["relative_drop"] < 0  # reported signed; the gate counts it as no loss
    assert (
        "relative drop +0.56%" in smaller["reason"] and "3.33x smaller (>= 3x)" in smaller["reason"]
    )
    assert (
        faster["speedup"] == pytest.approx(2.0)
        and "2.00x faster per row (>= 1.5x)" in faster["reason"]
    )


def test_the_gate_fails_a_loss_too_large_or_a_gain_too_small() -> None:
    lossy = gate.judge(PARENT, _measured(0.88, 1_000, 0.1), CP)
    same = gate.judge(PARENT, _measured(0.90, 20_000, 0.9), CP)

    assert lossy["status"] == "failed" and lossy["reason"].startswith("loses too much: accuracy")
    assert same["status"] == "failed" and same["reason"].startswith("gains too little: 1.11x")
    assert "1.50x smaller (< 3x)" in same["reason"]


def test_a_drop_of_exactly_the_allowed_share_passes() -> None:
    parent = _measured(1.0, 30_000, 1.0)
    at_limit = gate.judge(parent, _measured(0.99, 9_000, 1.0), CP)  # 1% in floating point
    past_it = gate.judge(parent, _measured(0.9899, 9_000, 1.0), CP)

    assert gate.relative_drop(1.0, 0.99, "accuracy") > 0.01  # 0.010000000000000009
    assert at_limit["status"] == "passed", at_limit["reason"]
    assert past_it["status"] == "failed" and past_it["reason"].startswith("loses too much")


def test_a_lower_is_better_metric_counts_a_rise_as_the_loss() -> None:
    assert gate.relative_drop(0.2, 0.3, "log_loss") == pytest.approx(0.5)
    assert gate.relative_drop(0.2, 0.1, "log_loss") == pytest.approx(-0.5)
    assert gate.relative_drop(0.8, 0.6, "accuracy") == pytest.approx(0.25)


def test_choose_takes_the_best_metric_then_the_smallest_file() -> None:
    def c(status: str, accuracy: float, size: int) -> dict:
        return {
            "status": status,
            "metrics": {"accuracy": accuracy, "log_loss": 1 - accuracy},
            "size_bytes": size,
        }

    candidates = {
        "prune": c("passed", 0.95, 9_000),
        "quantize": c("passed", 0.95, 7_000),
        "distill": c("failed", 0.99, 1_000),
    }
    assert gate.choose(candidates, "accuracy") == "quantize"
    assert gate.choose({**candidates, "prune": c("passed", 0.96, 9_000)}, "log_loss") == "prune"
    assert gate.choose({"distill": c("failed", 0.9, 1)}, "accuracy") is None


def test_soft_targets_are_the_softmax_of_the_log_probabilities_over_t() -> None:
    proba = np.array([[0.9, 0.1, 0.0], [1 / 3, 1 / 3, 1 / 3]])

    soft = distill.soft_targets(proba, temperature=2.0)

    np.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-6)
    expected = np.sqrt([0.9, 0.1, distill.PROBA_FLOOR])  # p^(1/T), renormalised
    np.testing.assert_allclose(soft[0], expected / expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(soft[1], 1 / 3, rtol=1e-6)
    assert distill.soft_targets(proba, 1.0)[0, 0] == pytest.approx(0.9, rel=1e-5)


def test_the_student_reads_images_when_the_parent_does() -> None:
    assert distill.student_params(CNN, [16], [5])["model"] == "cnn"
    student = distill.student_params({"model": "gbdt"}, [7], [5])
    assert (student["model"], student["hidden_sizes"]) == ("mlp", [7])


def test_fitting_is_deterministic_and_keeps_the_best_epoch() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    config = fit.FitConfig(8, 3, 0.05, 0.0, 16, seed=1, device=torch.device("cpu"))

    deterministic_kernels = []

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        deterministic_kernels.append(torch.are_deterministic_algorithms_enabled())
        return fit.label_loss(logits, labels)

    def fitted() -> tuple[torch.nn.Module, fit.FitResult]:
        torch.manual_seed(0)
        net = build_network(MLP, 4, 2)
        return net, fit.fit_network(net, (X[:60], y[:60]), (X[60:], y[60:]), loss, config)

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        (a, ra), (b, rb) = fitted(), fitted()
        # train's rule on the CPU: deterministic kernels while fitting, the setting restored
        assert all(deterministic_kernels) and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)

    assert ra == rb and ra.best_epoch > 0 and not a.training
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    untouched = build_network(MLP, 4, 2)
    none = fit.fit_network(
        untouched,
        (X, y),
        (X, y),
        fit.label_loss,
        fit.FitConfig(0, 3, 0.05, 0.0, 16, 1, torch.device("cpu")),
    )
    assert (none.best_epoch, none.epochs_run) == (0, 0)  # no epochs: the weights as they came
