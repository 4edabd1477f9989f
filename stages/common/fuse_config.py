"""``params.yaml``'s ``ensemble`` and ``compress`` sections: fusing several models into one, and
shrinking the model for deployment, each behind a gate. Checked at load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from stages.common.config_base import StrictModel

Family = Literal["mlp", "transformer", "gbdt", "cnn", "rnn"]
FusionMethod = Literal["mean", "vote", "weighted", "caruana", "stacking"]
CompressMethod = Literal["prune", "quantize", "distill"]


class EnsembleMembers(StrictModel):
    """Who joins the train stage's model (always member 0) in the ensemble."""

    seeds: list[int] = Field(
        default_factory=list
    )  # train's model again with these base.seed values
    families: list[Family] = Field(
        default_factory=list
    )  # other families, with their train.<family>
    tune_top_k: int = Field(0, ge=0)  # the K best finished trials of the current `make tune` study


class EnsembleParams(StrictModel):
    """The ensemble stage: members trained on the train split, fused on the validation split."""

    enabled: bool = False  # off: the stage records "disabled" and the train model is the candidate
    members: EnsembleMembers = Field(default_factory=EnsembleMembers)
    # mean (probabilities) | vote (majority of predicted classes) | weighted (weights below) |
    # caruana (greedy selection with replacement on val) | stacking (logistic regression on val)
    method: FusionMethod = "caruana"
    weights: list[float] | None = (
        None  # weighted: one per member, train's model first; null: by val loss
    )
    caruana_rounds: int = Field(20, gt=0)  # greedy steps (a member may be picked several times)
    stacking_c: float = Field(1.0, gt=0)  # the meta-model's inverse regularisation strength

    @model_validator(mode="after")
    def _weights(self) -> EnsembleParams:
        if self.weights is not None:
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
            if self.method != "weighted":
                raise ValueError(f"weights are for method 'weighted', not {self.method!r}")
        return self


class CompressParams(StrictModel):
    """The compress stage: smaller models of the candidate, each judged by the compression gate."""

    enabled: bool = True  # off: the stage records "disabled"; nothing compact is registered
    # prune (whole neurons/channels removed, then fine-tuned) | quantize (int8: dynamic for
    # mlp/transformer/rnn, static with calibration for cnn) | distill (a smaller student)
    methods: list[CompressMethod] = Field(default_factory=lambda: ["prune", "quantize", "distill"])
    prune_fraction: float = Field(0.5, gt=0, lt=1)  # share of each hidden layer's units removed
    finetune_epochs: int = Field(10, ge=0)  # after pruning (early stopping on val loss)
    distill_hidden_sizes: list[int] = Field(default_factory=lambda: [16])  # student MLP (tables)
    distill_channels: list[int] = Field(default_factory=lambda: [8, 16])  # student CNN (images)
    temperature: float = Field(2.0, gt=0)  # softens teacher and student logits alike
    distill_alpha: float = Field(0.7, ge=0, le=1)  # weight of the soft-target loss (rest: labels)
    distill_epochs: int = Field(150, gt=0)  # at most; early stopping on val loss
    lr: float = Field(0.003, gt=0)  # fine-tuning and distillation
    calibration_rows: int = Field(256, gt=0)  # static int8: train rows that set the scales
    # The compression gate: the candidate's relative drop on `metric` against the parent on the
    # parent's test split is at most max_relative_drop, AND it is min_speedup x faster (median
    # single-row latency) OR min_size_ratio x smaller (file bytes)
    metric: str = "accuracy"
    max_relative_drop: float = Field(0.01, ge=0, lt=1)
    min_speedup: float = Field(1.5, gt=0)
    min_size_ratio: float = Field(3.0, gt=0)
    alias: str = Field("champion-compact", min_length=1)  # moved when the parent is champion
    row_repeats: int = Field(100, gt=0)  # latency: median over this many single-row calls...
    batch_repeats: int = Field(20, gt=0)  # ...and this many batch-of-64 calls

    @field_validator("methods")
    @classmethod
    def _some_method(cls, value: list[str]) -> list[str]:
        # an empty list would run the stage for nothing and report none_passed, as if every
        # candidate had failed the gate: say how to turn compression off instead
        if not value:
            raise ValueError(
                "no method listed: name at least one of prune, quantize, distill, or set "
                "compress.enabled: false to turn compression off"
            )
        return value

    @model_validator(mode="after")
    def _methods(self) -> CompressParams:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {self.methods}")
        if not self.distill_hidden_sizes or any(n <= 0 for n in self.distill_hidden_sizes):
            raise ValueError("distill_hidden_sizes: at least one layer, each > 0")
        if not self.distill_channels or any(n <= 0 for n in self.distill_channels):
            raise ValueError("distill_channels: at least one layer, each > 0")
        return self
