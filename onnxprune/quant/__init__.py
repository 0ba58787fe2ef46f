"""8-bit quantization: the driver, the QDQ pass, which layers, QDQ building, scale folding, ranges,
error.
"""
