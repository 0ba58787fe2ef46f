"""Models in and out: load/save, external data, detached weights, atomic files, the validation
gate, sessions.
"""
