"""Channel groups: which (tensor, axis) slices go together, how they are cut, and how they are
scored.
"""
