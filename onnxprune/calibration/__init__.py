"""Calibration data and what runs it: batches, token masks, sessions, the Propagator, targets."""
