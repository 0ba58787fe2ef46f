"""Attention heads: recognising blocks by what the ops compute, tracing them, scoring and removing
heads.
"""
