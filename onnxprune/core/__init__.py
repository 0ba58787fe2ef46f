"""The lowest layer: reading and writing constants, shapes, accounting, page release, the pass
base.
"""
