"""Distillation repair: numpy gradients of pruned blocks and their optimisation."""
