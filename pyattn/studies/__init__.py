"""The seed write-up's experiments, as library code that examples and
``pyattn.reproduce`` call (examples stay thin command-line wrappers)."""
