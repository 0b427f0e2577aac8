"""Importing this package registers every method: each module of this folder is imported, and its
``@register_method`` classes enter ``METHODS``. A new method is one file here; nothing else names it."""

import importlib
import pkgutil

from kd.methods.base import METHODS, Method, MethodParams, Phase, TeacherOutputs, get_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "MethodParams", "Phase", "TeacherOutputs", "get_method", "register_method"]
