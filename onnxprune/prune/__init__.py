"""The pruning passes: whole neurons (dispatching to repair/ and conv/), weight zeroing, lossless
clean-up.
"""
