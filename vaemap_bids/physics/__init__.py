"""Signal models behind one interface; importing this package registers the built-in models."""
from .acquisition import Acquisition, normalise_by_b0
from .base import ParameterSpec, SignalModel, available_models, get_model_class, make_model, register
from . import ballstick, msdki  # noqa: F401  (registration side effect)

__all__ = ["Acquisition", "normalise_by_b0", "ParameterSpec", "SignalModel", "available_models",
           "get_model_class", "make_model", "register"]
