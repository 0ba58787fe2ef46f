"""Importance criteria for channels: one small function each, in a registry."""

from onnxprune.scoring.criteria import (
    CRITERIA,
    ChannelWeights,
    Criterion,
    register_criterion,
    score_channels,
)

__all__ = ["CRITERIA", "ChannelWeights", "Criterion", "register_criterion", "score_channels"]
