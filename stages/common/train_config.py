"""``params.yaml``'s ``train`` section: the training settings and each model family's own
sub-section (``train.transformer``, ``train.rnn``, ``train.gbdt``), checked at load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from stages.common.config_base import StrictModel


class TransformerParams(StrictModel):
    """FT-Transformer (model: transformer): one token per feature, a few attention blocks."""

    d_token: int = Field(32, gt=0)  # width of each feature's token
    n_blocks: int = Field(2, gt=0)  # attention blocks
    n_heads: int = Field(4, gt=0)  # attention heads; must divide d_token
    ffn_factor: float = Field(2.0, gt=0)  # feed-forward width = ffn_factor x d_token

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerParams:
        if self.d_token % self.n_heads:
            raise ValueError(
                f"n_heads {self.n_heads} must divide d_token {self.d_token} "
                "(each head takes an equal share of the token)"
            )
        return self


class RnnParams(StrictModel):
    """Sequence model (model: rnn) for rows that are fixed-length windows of a series."""

    # steps per window: the row's feature columns are read as sequence_length steps of
    # n_features / sequence_length values each, in column order (step 0's columns first)
    sequence_length: int | None = Field(None, gt=0)
    cell: Literal["gru", "lstm", "transformer"] = "gru"  # the encoder over the steps
    hidden_size: int = Field(64, gt=0)  # state width (the transformer encoder's d_model)
    num_layers: int = Field(1, gt=0)  # stacked layers
    n_heads: int = Field(4, gt=0)  # cell transformer only; must divide hidden_size


class GbdtParams(StrictModel):
    """scikit-learn's HistGradientBoosting (model: gbdt), the strong tabular baseline.

    Boosting rounds are grouped into "epochs" of ``rounds_per_epoch`` so that early stopping
    (``train.patience``), the history and tuning's pruning read it like a network's curve.
    """

    learning_rate: float = Field(0.1, gt=0, le=1)  # shrinkage per boosting round
    rounds_per_epoch: int = Field(10, gt=0)  # rounds per history row; max = max_epochs x this
    max_leaf_nodes: int = Field(31, ge=2)  # leaves per tree
    min_samples_leaf: int = Field(20, gt=0)  # rows per leaf at least
    l2_regularization: float = Field(0.0, ge=0)  # on the leaf values
    max_bins: int = Field(255, ge=2, le=255)  # histogram bins per feature


class TrainParams(StrictModel):
    # mlp / transformer / gbdt for tables, cnn for images (set image_shape), rnn for rows that
    # are windows of a series (set rnn.sequence_length)
    model: Literal["mlp", "cnn", "transformer", "rnn", "gbdt"] = "mlp"
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])  # MLP layer widths
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # CNN conv channels
    # CNN input as [C, H, W], e.g. [1, 8, 8] (checked even when left out: a CNN needs it)
    image_shape: list[int] | None = Field(None, validate_default=True)
    dropout: float = Field(0.1, ge=0, lt=1)  # regularisation between layers
    lr: float = Field(1e-3, gt=0, le=10)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0)  # AdamW weight decay
    batch_size: int = Field(64, gt=0)  # training batch size
    max_epochs: int = Field(100, gt=0)  # upper bound; early stopping usually ends sooner
    patience: int = Field(10, gt=0)  # epochs without val-loss improvement before stopping
    optimizer: Literal["adamw", "sgd"] = "adamw"  # adamw suits most nets; sgd for tuned recipes
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum (ignored by adamw)
    lr_schedule: Literal["none", "cosine", "onecycle"] = "none"  # per-step schedule over the run
    max_grad_norm: float = Field(0.0, ge=0)  # clip the gradient norm to this; 0 = no clipping
    # on-device image augmentation (CNN only; off by default, all zeros/false = off)
    augment_crop_pad: int = Field(0, ge=0)  # random crop after zero-padding by this many pixels
    augment_flip: bool = False  # random horizontal flip (not for digits/text: it changes labels)
    augment_noise: float = Field(0.0, ge=0)  # std of gaussian noise added to the inputs
    augment_seed: int = 0  # its own RNG: augmentation never shifts the weight-init/batch order
    # auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a grad scaler and needs CUDA
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the network (pays off on GPU for long runs)
    channels_last: bool = True  # CNN on CUDA: NHWC memory layout for tensor-core convolutions
    # keep the training split as device tensors (no loader round trips) or stream Parquet
    # row groups through pinned memory; auto = on the device when it fits
    data_on_device: Literal["auto", "always", "never"] = "auto"
    device_memory_fraction: float = Field(0.5, gt=0, le=1)  # auto: data may take this share
    checkpoint_every_steps: int = Field(200, ge=0)  # resume checkpoint cadence; 0 = epoch ends
    # DDP processes (torchrun); null = one per visible GPU (1 on CPU); batch_size is global
    nproc: int | None = Field(None, gt=0)
    # several machines (torchrun's c10d rendezvous): nodes in the job, each running nproc
    # processes; rdzv_endpoint is host:port of the rendezvous, reachable from every node
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
    transformer: TransformerParams = Field(default_factory=TransformerParams)
    rnn: RnnParams = Field(default_factory=RnnParams)
    gbdt: GbdtParams = Field(default_factory=GbdtParams)

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if not value or any(width <= 0 for width in value):
            raise ValueError("must be a non-empty list of positive integers")
        return value

    @field_validator("image_shape")
    @classmethod
    def _cnn_needs_shape(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if info.data.get("model") == "cnn" and (value is None or len(value) != 3):
            raise ValueError("model 'cnn' needs image_shape: [channels, height, width]")
        if value is not None and any(size <= 0 for size in value):
            raise ValueError(f"{value}: every size must be a positive integer")
        return value

    @field_validator("nproc")
    @classmethod
    def _batch_splits(cls, value: int | None, info: ValidationInfo) -> int | None:
        # batch_size is the global batch: each of the nproc DDP processes takes an equal share
        batch_size = info.data.get("batch_size")
        if value is not None and batch_size is not None and batch_size % value:
            raise ValueError(
                f"train.batch_size {batch_size} does not split over {value} processes: "
                f"use a multiple of {value}"
            )
        return value

    @model_validator(mode="after")
    def _augment_needs_cnn(self) -> TrainParams:
        if self.augments and self.model != "cnn":
            raise ValueError(
                "augment_crop_pad/augment_flip/augment_noise work on images: "
                "set model: cnn (or turn augmentation off)"
            )
        return self

    @model_validator(mode="after")
    def _family_settings(self) -> TrainParams:
        if self.model == "rnn":
            if self.rnn.sequence_length is None:
                raise ValueError(
                    "model 'rnn' needs rnn.sequence_length: the steps in each row's window"
                )
            if self.rnn.cell == "transformer" and self.rnn.hidden_size % self.rnn.n_heads:
                raise ValueError(
                    f"rnn.n_heads {self.rnn.n_heads} must divide rnn.hidden_size "
                    f"{self.rnn.hidden_size} (cell: transformer)"
                )
        if self.model == "gbdt" and (self.nproc or 1) > 1:
            raise ValueError("model 'gbdt' trains in one process: leave nproc unset (or 1)")
        return self

    @model_validator(mode="after")
    def _nodes(self) -> TrainParams:
        # several machines: torchrun's c10d rendezvous needs an address every node can reach
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"nnodes {self.nnodes} needs rdzv_endpoint: host:port of the machine that runs "
                "the train stage (it hosts the rendezvous), reachable from the other nodes"
            )
        if (
            self.rdzv_endpoint is not None
            and not 0 < int(self.rdzv_endpoint.rsplit(":")[1]) < 65536
        ):
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint}: the port must be 1-65535")
        if self.model == "gbdt" and self.nnodes > 1:
            raise ValueError("model 'gbdt' trains in one process: set nnodes: 1")
        processes = self.nnodes * (self.nproc or 1)
        if self.nnodes > 1 and self.batch_size % processes:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over {self.nnodes} nodes x "
                f"{self.nproc or 1} processes: use a multiple of {processes}"
            )
        return self

    @property
    def augments(self) -> bool:
        return bool(self.augment_crop_pad or self.augment_flip or self.augment_noise)
