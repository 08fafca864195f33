"""pandera schemas of the analytics tables: every table the recorder returns is validated on the way
out, so a unit or layout error (a share above 1, a negative count, a missing column) fails loudly."""

from __future__ import annotations

import pandera.pandas as pa
from pandera.pandas import Check, Column, DataFrameSchema

_EPS = 1e-5  # float32 sums of shares land a few ulps outside [0, 1]
_UNIT = Check.in_range(-_EPS, 1 + _EPS)
_NONNEG = Check.ge(0)


def _unit(nullable: bool = False) -> Column:
    return Column(float, _UNIT, nullable=nullable)


def _count() -> Column:
    return Column(int, _NONNEG)


LAYER_METRICS = DataFrameSchema(
    {
        "layer": _count(),
        "name": Column(str),
        "num_experts": Column(int, Check.gt(0)),
        "top_k": Column(int, Check.gt(0)),
        "tokens": _count(),
        "assignments": _count(),
        "load_imbalance": Column(float, _NONNEG),
        "load_cv": Column(float, _NONNEG),
        "dead_expert_fraction": _unit(),
        "load_diversity": _unit(),
        "drop_rate": _unit(),
        "routing_entropy": _unit(nullable=True),  # normalised by log E; NaN without router probabilities
        "top1_prob": _unit(nullable=True),
        "top1_margin": _unit(nullable=True),
        "balance_loss": Column(float, _NONNEG, nullable=True),
        "z_loss": Column(float, _NONNEG),
        "consistency_next": _unit(nullable=True),  # NaN for the last layer of a stack
    },
    strict=True,
    coerce=True,
    unique=["layer"],
)

EXPERT_LOAD = DataFrameSchema(
    {
        "layer": _count(),
        "expert": _count(),
        "tokens": _count(),
        "load_share": _unit(),
        "relative_load": Column(float, _NONNEG),  # E * load_share: 1 is a fair share
        "mean_prob": _unit(nullable=True),
        "dead": Column(bool),
    },
    strict=True,
    coerce=True,
    unique=["layer", "expert"],
)

ASSIGNMENTS = DataFrameSchema(
    {
        "layer": _count(),
        "batch": _count(),
        "token": _count(),  # position in the layer's recorded tokens
        "token_id": Column(int, Check.ge(-1)),  # -1: no input_ids were seen
        "expert": _count(),  # E where dropped
        "weight": Column(float),
        "dropped": Column(bool),
    },
    strict=False,  # plus one column per label (e.g. domain)
    coerce=True,
)

COACTIVATION = DataFrameSchema(
    {
        "layer": _count(),
        "expert": _count(),
        "other": _count(),
        "count": _count(),
        "coactivation": _unit(),
    },
    checks=Check(lambda df: (df["expert"] != df["other"]).all(), error="an expert paired with itself"),
    strict=True,
    coerce=True,
    unique=["layer", "expert", "other"],
)

SPECIALISATION = DataFrameSchema(
    {
        "layer": _count(),
        "group": Column(str),
        "expert": _count(),
        "count": _count(),
        "group_tokens": Column(int, Check.gt(0)),
        "share": _unit(),
        "uniform": _unit(),
        "ratio": Column(float, _NONNEG),  # share / uniform: 1 is no specialisation
    },
    strict=True,
    coerce=True,
    unique=["layer", "group", "expert"],
)

TOKEN_SPECIALISATION = DataFrameSchema(
    {
        "layer": _count(),
        "token_id": _count(),
        "expert": _count(),
        "count": _count(),
        "occurrences": Column(int, Check.gt(0)),
        "share": _unit(),  # of the token's occurrences
        "expert_share": _unit(),  # of all the layer's tokens
        "lift": Column(float, Check.gt(0)),  # share / expert_share: 1 is no preference
    },
    strict=True,
    coerce=True,
)

CONSISTENCY = DataFrameSchema(
    {"layer": _count(), "other_layer": _count(), "consistency": _unit()},
    checks=Check(lambda df: (df["layer"] < df["other_layer"]).all(), error="pairs must be ordered"),
    strict=True,
    coerce=True,
)

SATURATION = DataFrameSchema(
    {
        "checkpoint": Column(str),
        "index": _count(),  # position in the checkpoint sequence; the last is the reference
        "step": _count(),  # training step from the checkpoint's name, else the index
        "layer": _count(),
        "saturation": _unit(),
        "chance": _unit(),  # K / E: two independent uniform routers
    },
    strict=True,
    coerce=True,
    unique=["index", "layer"],
)

HEALTH = DataFrameSchema(
    {
        "layer": _count(),
        "verdict": Column(str, Check.isin(["balanced", "imbalanced", "collapsed"])),
        "load_imbalance": Column(float, _NONNEG),
        "imbalance_of_ceiling": _unit(),  # (load_imbalance - 1) / (E / K - 1)
        "dead_expert_fraction": _unit(),
        "routing_entropy": _unit(nullable=True),
        "reasons": Column(str),
    },
    strict=True,
    coerce=True,
    unique=["layer"],
)


def validate(schema: pa.DataFrameSchema, df):
    """Validate collecting every failure (pandera's lazy mode) and return the coerced frame."""
    return schema.validate(df, lazy=True)
