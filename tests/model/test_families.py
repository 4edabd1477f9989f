"""The transformer and sequence networks: shapes, how a row is read as steps, checkpoints
(also ones written before these families existed) and their ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.errors import ConfigError
from model.nets import (
    FTTransformer,
    SequenceNet,
    build_network,
    load_network,
    predict_proba,
    sequence_steps,
    unlike_steps,
)
from stages.common.config import TrainParams

SPECS = {
    "transformer": TrainParams(model="transformer", transformer={"d_token": 8, "n_heads": 2}),
    "gru": TrainParams(model="rnn", rnn={"sequence_length": 3, "cell": "gru", "hidden_size": 8}),
    "lstm": TrainParams(
        model="rnn", rnn={"sequence_length": 3, "cell": "lstm", "hidden_size": 8, "num_layers": 2}
    ),
    "attention": TrainParams(
        model="rnn",
        rnn={"sequence_length": 3, "cell": "transformer", "hidden_size": 8, "n_heads": 2},
    ),
}


@pytest.mark.parametrize("family", SPECS)
def test_families_map_flat_rows_to_class_logits(family: str) -> None:
    torch.manual_seed(0)
    network = build_network(SPECS[family], n_features=6, n_classes=4)

    assert network(torch.randn(5, 6)).shape == (5, 4)
    assert predict_proba(network, np.zeros((0, 6), np.float32), torch.device("cpu")).shape == (0, 4)
    # the head's linear layer is the state's last weight (what tests zero to fake a version)
    last = [k for k in network.state_dict() if k.endswith(".weight")][-1]
    assert network.state_dict()[last].shape == (4, network.head[-1].in_features)


def test_builds_the_family_with_its_section() -> None:
    assert isinstance(build_network(SPECS["transformer"], 6, 2), FTTransformer)
    net = build_network(SPECS["lstm"], 6, 2)
    assert isinstance(net, SequenceNet)
    assert (net.sequence_length, net.step_features) == (3, 2)
    assert isinstance(net.encoder, torch.nn.LSTM) and net.encoder.num_layers == 2


def test_sequence_net_reads_a_row_step_by_step_step_zero_first() -> None:
    torch.manual_seed(0)
    net = build_network(SPECS["gru"], n_features=6, n_classes=2).eval()
    row = torch.randn(1, 6)  # (a0, b0, a1, b1, a2, b2): steps of two values
    steps = row.reshape(1, 3, 2)

    with torch.no_grad():
        out, _ = net.encoder(steps)
        assert torch.equal(net(row), net.head(out[:, -1]))
        # the state after the last step depends on the step order
        assert not torch.allclose(net(row), net(steps.flip(1).reshape(1, 6)))


def test_ft_transformer_output_does_not_depend_on_batch_company() -> None:
    torch.manual_seed(0)
    net = build_network(SPECS["transformer"], n_features=5, n_classes=3).eval()
    rows = torch.randn(4, 5)

    with torch.no_grad():
        alone = torch.cat([net(rows[i : i + 1]) for i in range(4)])
        assert torch.allclose(net(rows), alone, atol=1e-6)  # attention mixes features, not rows


def test_rnn_columns_must_split_into_equal_steps() -> None:
    with pytest.raises(ConfigError, match="7 columns do not split"):
        build_network(SPECS["gru"], n_features=7, n_classes=2)
    with pytest.raises(ConfigError, match=r"\(a, b, c, d, e\) do not split into 2 steps"):
        sequence_steps(["a", "b", "c", "d", "e"], 2)


def test_sequence_steps_group_columns_and_spot_unlike_steps() -> None:
    columns = ["rain_d0", "temp_d0", "rain_d1", "temp_d1", "rain_d2", "temp_d2"]

    steps = sequence_steps(columns, 3)

    assert steps == [["rain_d0", "temp_d0"], ["rain_d1", "temp_d1"], ["rain_d2", "temp_d2"]]
    assert unlike_steps(steps) == []
    # a one-hot column moved behind the numeric ones (what the preprocessor does to text)
    moved = ["rain_d0", "rain_d1", "rain_d2", "sky_d0_sun", "sky_d1_sun", "sky_d2_sun"]
    assert unlike_steps(sequence_steps(moved, 3)) == [1, 2]


def test_family_without_its_section_and_gbdt_are_config_errors() -> None:
    spec = SPECS["transformer"].model_dump(mode="json")
    del spec["transformer"]
    with pytest.raises(ConfigError, match=r"needs the train\.transformer section"):
        build_network(spec, 4, 2)
    with pytest.raises(ConfigError, match="'gbdt' is no network"):
        build_network(TrainParams(model="gbdt"), 4, 2)


@pytest.mark.parametrize("family", ["mlp", *SPECS])
def test_checkpoints_load_back_the_same_network(family: str, tmp_path: Path) -> None:
    spec = SPECS.get(family, TrainParams()).model_dump(mode="json")
    if family == "mlp":  # a checkpoint from before the families: no nested sections at all
        spec = {k: v for k, v in spec.items() if k not in ("transformer", "rnn", "gbdt")}
    torch.manual_seed(1)
    network = build_network(spec, 6, 3).eval()
    torch.save(
        {"state_dict": network.state_dict(), "train_params": spec, "n_features": 6, "n_classes": 3},
        tmp_path / "model.pt",
    )

    loaded, checkpoint = load_network(tmp_path / "model.pt")

    rows = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(rows), network(rows))
    assert type(loaded) is type(network) and checkpoint["train_params"]["model"] == spec["model"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["transformer", "gru", "lstm"])
def test_families_export_to_onnx_and_int8(family: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    from stages.export.onnx import export_onnx, quantize_int8

    torch.manual_seed(0)
    network = build_network(SPECS[family], n_features=6, n_classes=3).eval()
    export_onnx(network, 6, tmp_path / "model.onnx")
    quantize_int8(tmp_path / "model.onnx", tmp_path / "model.int8.onnx")
    rows = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)  # batch is dynamic
    expected = predict_proba(network, rows, torch.device("cpu"))

    for file, tolerance in (("model.onnx", 1e-5), ("model.int8.onnx", 0.5)):
        session = ort.InferenceSession(str(tmp_path / file))
        (proba,) = session.run(None, {session.get_inputs()[0].name: rows})
        assert proba.shape == (7, 3) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
        assert np.abs(proba - expected).max() < tolerance
