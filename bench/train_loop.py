"""Training throughput: the train stage's loop against a bare PyTorch loop and Lightning.

Same network (``model.nets.build_network``), same synthetic data already in tensors on
the device, same AdamW settings, batch size, epochs and per-epoch validation pass; each variant
starts from the same initial weights. Targets (issue 4): stage / bare >= 0.95 and
stage / Lightning >= 1.0 in samples per second.

    python -m bench.train_loop                 # MLP 50k x 64 and CNN 32x32, CPU or CUDA
    python -m bench.train_loop --cases mlp --repeats 7

On CUDA the CNN's samples/s is also turned into a fraction of the GPU's bf16 peak, from the
FLOPs of one training step (forward + backward) counted on the model.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common

NAME = "train_loop"
TARGETS = {"stage/bare": 0.95, "stage/lightning": 1.0}  # minimum samples/s ratios
VARIANTS = {  # what each variant is (also the --variants choices)
    "stage": "stages.train.loop.train_model as the stage runs it (resume checkpoints, SIGTERM)",
    "stage-nockpt": "the same without resume checkpoints (diagnosis)",
    "bare": "a minimal PyTorch loop: same steps and per-epoch validation, nothing else",
    "lightning": "pytorch_lightning.Trainer.fit, no logger/checkpoints/progress bar",
}


@dataclass(frozen=True)
class Case:
    """One model + data size to benchmark."""

    name: str
    params: Any  # stages.common.config.TrainParams
    n_features: int
    n_classes: int
    n_train: int
    n_val: int


def val_rows(n_train: int) -> int:
    """Validation rows for ``n_train`` training rows, in the pipeline's proportion (16:64)."""
    return max(1, n_train // 4)


def make_cases(args: argparse.Namespace) -> list[Case]:
    """The MLP (tabular rows) and CNN (square one-channel images) cases asked for."""
    from stages.common.config import TrainParams

    common = {
        "batch_size": args.batch_size,
        "max_epochs": args.epochs,
        "patience": args.epochs,
    }  # patience = epochs: early stopping never ends a run
    cases = []
    if "mlp" in args.cases:
        cases.append(
            Case(
                "mlp",
                TrainParams(model="mlp", **common),
                args.features,
                args.classes,
                args.rows,
                val_rows(args.rows),
            )
        )
    if "cnn" in args.cases:
        side = args.image_size
        cases.append(
            Case(
                "cnn",
                TrainParams(model="cnn", image_shape=[1, side, side], **common),
                side * side,
                args.classes,
                args.cnn_rows,
                val_rows(args.cnn_rows),
            )
        )
    return cases


def make_data(case: Case, device: Any, seed: int) -> Any:
    """Synthetic float32 rows with labels from a random linear map, on ``device``."""
    import torch

    from stages.train.batches import TrainData

    gen = torch.Generator().manual_seed(seed)
    n = case.n_train + case.n_val
    X = torch.randn(n, case.n_features, generator=gen)
    y = (X @ torch.randn(case.n_features, case.n_classes, generator=gen)).argmax(dim=1)
    X, y = X.to(device), y.to(device)
    return TrainData(X[: case.n_train], y[: case.n_train], X[case.n_train :], y[case.n_train :])


def fresh_network(case: Case, device: Any, seed: int) -> Any:
    """The stage's network with the stage's seeding (same initial weights every call)."""
    from model.nets import build_network
    from stages.train.loop import seed_torch

    seed_torch(seed, device)
    return build_network(case.params, case.n_features, case.n_classes).to(device)


# ----------------------------------------------------------------------------- the variants


def train_bare(network: Any, data: Any, params: Any, device: Any, seed: int) -> float:
    """A minimal PyTorch loop doing the same work as the stage; returns the last val loss."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(
        network.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda"  # the stage's precision: bf16 autocast on CUDA only
    n, val_loss = len(data.X_train), math.nan
    for _ in range(params.max_epochs):
        network.train()
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, params.batch_size):
            idx = order[start : start + params.batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = F.cross_entropy(network(data.X_train[idx]).float(), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        network.eval()
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
        ):
            val_loss = F.cross_entropy(network(data.X_val).float(), data.y_val).item()
    return val_loss


def _batches_dataset(X: Any, y: Any, batch_size: int, seed: int) -> Any:
    """An iterable of shuffled (x, y) batches sliced from device tensors: the fastest data
    path Lightning can be given (no per-sample Dataset.__getitem__ and collate)."""
    import torch

    class Batches(torch.utils.data.IterableDataset):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def __len__(self) -> int:
            return math.ceil(len(X) / batch_size)

        def __iter__(self) -> Iterator[tuple[Any, Any]]:
            order = torch.randperm(len(X), generator=self.generator).to(X.device)
            for start in range(0, len(X), batch_size):
                idx = order[start : start + batch_size]
                yield X[idx], y[idx]

    return Batches()


def prepare_lightning(
    network: Any, data: Any, params: Any, device: Any, seed: int
) -> Callable[[], Any]:
    """A Lightning Trainer (no logger, checkpoints or progress bar) ready to ``fit``."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F

    for name in ("pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no "GPU available: ..." banners

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.network(x).float(), y)

        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.network(x).float(), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(
                self.parameters(), lr=params.lr, weight_decay=params.weight_decay
            )

    cuda = device.type == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        max_epochs=params.max_epochs,
        precision="bf16-mixed" if cuda else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    train_loader = torch.utils.data.DataLoader(
        _batches_dataset(data.X_train, data.y_train, params.batch_size, seed), batch_size=None
    )
    val_loader = torch.utils.data.DataLoader([(data.X_val, data.y_val)], batch_size=None)
    module = Classifier()

    def fit() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "does not have many workers": by design here
            trainer.fit(module, train_loader, val_loader)

    return fit


def prepare_stage(
    case: Case,
    data: Any,
    device: Any,
    seed: int,
    resume_root: Path | None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> Callable[[], Any]:
    """``train_model`` called as the stage calls it: resume checkpoints written to a store
    under ``resume_root`` (every ``checkpoint_every_steps`` and each epoch) and SIGTERM
    handled; ``resume_root=None`` leaves checkpoints out (to measure what they cost)."""
    from stages.train.checkpoint import GracefulStop, ResumeStore
    from stages.train.loop import train_model

    network = fresh_network(case, device, seed)
    store = ResumeStore(resume_root, f"{case.name}{seed:011d}"[-16:]) if resume_root else None

    def fit() -> None:
        with GracefulStop() as stop:
            train_model(network, data, case.params, device, seed, on_epoch, store=store, stop=stop)
        if store is not None:
            store.clear()  # as the stage does after a finished run

    return fit


def make_variants(
    case: Case, data: Any, device: Any, seed: int, names: Sequence[str], resume_root: Path
) -> dict[str, common.Variant]:
    """The variants in ``names``, each prepared untimed from the same initial weights."""

    def bare() -> Callable[[], Any]:
        network = fresh_network(case, device, seed)
        return lambda: train_bare(network, data, case.params, device, seed)

    makers: dict[str, common.Variant] = {
        "stage": lambda: prepare_stage(case, data, device, seed, resume_root),
        "stage-nockpt": lambda: prepare_stage(case, data, device, seed, None),
        "bare": bare,
        "lightning": lambda: prepare_lightning(
            fresh_network(case, device, seed), data, case.params, device, seed
        ),
    }
    return {name: makers[name] for name in names}


# ----------------------------------------------------------------------------- measuring


def count_step_flops(case: Case, device: Any) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted on the model."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    network = fresh_network(case, device, 0)
    x = torch.randn(case.params.batch_size, case.n_features, device=device)
    y = torch.zeros(case.params.batch_size, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(network(x), y).backward()
    return counter.get_total_flops() / case.params.batch_size


def measure_case(case: Case, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Time every variant of one case; samples/s, paired ratios and the targets."""
    data = make_data(case, device, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as resume_root:
        variants = make_variants(case, data, device, args.seed, args.variants, Path(resume_root))
        seconds = common.measure_interleaved(
            variants, args.repeats, args.warmup, device, args.clock
        )
    samples = case.n_train * case.params.max_epochs
    result: dict[str, Any] = {
        "model": case.name,
        "n_train": case.n_train,
        "n_val": case.n_val,
        "n_features": case.n_features,
        "n_classes": case.n_classes,
        "batch_size": case.params.batch_size,
        "epochs": case.params.max_epochs,
        "train_params": case.params.model_dump(mode="json"),
        "seconds": {name: common.summarize(values) for name, values in seconds.items()},
        "samples_per_s": {
            name: common.summarize([samples / s for s in values])
            for name, values in seconds.items()
        },
        "ratios": {},
    }
    for baseline in [name for name in seconds if name != "stage"]:
        key = f"stage/{baseline}"
        ratio = common.ratio_stats(seconds[baseline], seconds["stage"])
        target = TARGETS.get(key)  # stage/stage-nockpt is a diagnosis: no target
        result["ratios"][key] = {
            **ratio,
            "target": target,
            "met": None if target is None else ratio["median"] >= target,
        }
    flops = count_step_flops(case, device)
    achieved = flops * result["samples_per_s"]["stage"]["median"]
    result["flops"] = {"per_sample_train_step": flops, "stage_flop_per_s": achieved}
    if device.type == "cuda":
        import torch

        peak = common.peak_bf16_flops(torch.cuda.get_device_name())
        result["flops"]["peak_bf16"] = peak
        result["flops"]["fraction_of_peak"] = achieved / peak if peak else None
    return result


def format_report(cases: Sequence[dict[str, Any]]) -> str:
    """Samples/s per variant and the ratios against the targets, one block per case."""
    rows = []
    for case in cases:
        for name, sps in case["samples_per_s"].items():
            rows.append(
                [
                    case["model"],
                    name,
                    round(sps["median"]),
                    f"{sps['spread']:.1%}",
                    round(sps["max"]),
                    "",
                ]
            )
        for key, ratio in case["ratios"].items():
            verdict = {
                True: f">= {ratio['target']} met",
                False: f">= {ratio['target']} NOT met",
                None: "",
            }[ratio["met"]]
            rows.append(
                [
                    case["model"],
                    key,
                    f"{ratio['median']:.3f}",
                    f"{ratio['min']:.3f}..{ratio['max']:.3f}",
                    f"{ratio['of_min']:.3f}",
                    verdict,
                ]
            )
        fraction = case["flops"].get("fraction_of_peak")
        if fraction is not None:
            rows.append([case["model"], "stage % of bf16 peak", f"{fraction:.2%}", "", "", ""])
    header = [
        "model",
        "variant / ratio",
        "median samples/s | ratio",
        "spread",
        "best run",
        "target (on the median)",
    ]
    return common.format_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (sizes default to a few seconds per run on a 2-core CPU)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_loop",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--rows", type=int, default=50_000, help="MLP training rows")
    parser.add_argument("--features", type=int, default=64, help="MLP input features")
    parser.add_argument("--cnn-rows", type=int, default=6_000, help="CNN training images")
    parser.add_argument("--image-size", type=int, default=32, help="CNN image side (1 channel)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the stage's default")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["stage", "bare", "lightning"],
        choices=list(VARIANTS),
        help="what to time; the ratios are stage / each other variant",
    )
    parser.add_argument(
        "--no-lightning",
        dest="variants",
        action="store_const",
        const=["stage", "bare"],
        help="shorthand for --variants stage bare",
    )
    common.add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``<results-dir>/train_loop.json``."""
    args = build_parser().parse_args(argv)
    device = common.prepare_run(args)
    if "stage" not in args.variants:
        args.variants = ["stage", *args.variants]
    if "lightning" in args.variants:
        try:
            import pytorch_lightning  # noqa: F401
        except ImportError:
            print(
                "pytorch_lightning is not installed: run `make bench-setup` "
                "(or pass --no-lightning)",
                file=sys.stderr,
            )
            return 2
    load_before = common.load_average()
    cases = [measure_case(case, args, device) for case in make_cases(args)]
    payload = {
        "machine": common.describe_machine(device),
        "load_before": load_before,
        "load_after": common.load_average(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "clock": args.clock,
        "threads": args.threads,
        "variants": {name: VARIANTS[name] for name in args.variants},
        "cases": cases,
    }
    path = common.write_result(NAME, payload, args.results_dir)
    print(format_report(cases))
    print(
        f"\nmachine: {payload['machine']['cpu']} ({payload['machine']['cpu_count']} cores, "
        f"{payload['machine']['torch_threads']} torch threads), device {device}; "
        f"load {load_before} -> {payload['load_after']}; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
