"""Comparing a candidate with its reference (or saved golden outputs) on onnxruntime."""
