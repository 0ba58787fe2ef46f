"""Repairing what removal broke: least squares refits and block distillation."""
