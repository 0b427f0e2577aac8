"""Importing this package registers every method."""

from kd.methods import hinton  # noqa: F401  (registers kd, finetune)
from kd.methods.base import METHODS, Method, MethodParams, Phase, TeacherOutputs, get_method, register_method

__all__ = ["METHODS", "Method", "MethodParams", "Phase", "TeacherOutputs", "get_method", "register_method"]
