"""Pure-PyTorch distillation library: losses, layer maps, students and the method registry.

Nothing in this package imports Ray or MLflow, so every piece is unit-tested in milliseconds.
"""
