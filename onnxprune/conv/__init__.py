"""Conv layers: calibrated channel removal with im2col statistics, refits, sensitivity, BatchNorm
folding.
"""
