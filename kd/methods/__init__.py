"""Importing this package registers every method."""

from kd.methods import finetune, hinton  # noqa: F401  (register finetune, kd)
from kd.methods import bilstm  # noqa: F401  (registers bilstm; importing kd.bilstm registers its Auto classes)
from kd.methods import textsmooth  # noqa: F401  (registers textsmooth)
from kd.methods import distilbert, pkd, tinybert  # noqa: F401  (register distilbert, pkd, tinybert)
from kd.methods import fastbert, mobilebert  # noqa: F401  (register fastbert, mobilebert and their Auto classes)
from kd.methods import dualtrain  # noqa: F401  (registers dualtrain)
from kd.methods.base import METHODS, Method, MethodParams, Phase, TeacherOutputs, get_method, register_method

__all__ = ["METHODS", "Method", "MethodParams", "Phase", "TeacherOutputs", "get_method", "register_method"]
