"""Pipeline stages: thin Ray wrappers around the pure-PyTorch code in ``kd``."""
