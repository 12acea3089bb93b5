"""Contrastive objectives for CLIP training: one interface, many ways to estimate normalizers.

Importing the package registers every method with `build_method`.
"""
from .base import ContrastiveMethod, LossOutput, build_method, method_names, register  # noqa: F401
from .features import Features  # noqa: F401
from . import openclip  # noqa: F401  (registers openclip, siglip)
from . import gcl, estimators  # noqa: F401
from . import neuclip, amorlip  # noqa: F401
