"""Training data: the synthetic event generator and clip data sets."""
