"""Contrastive objectives for CLIP training: one interface, many ways to estimate normalizers.

Importing the package imports every module in it, and each method or estimator module registers one
`registry.Entry`. The trainer asks the registry for flags, rules, per-sample state, resume-fixed flags,
run-name tags and builders, and never names a method.

Adding an estimator is one file, src/contrastive/<name>.py, holding:
  * a `NormalizerEstimator` subclass (`estimator_interface`): `estimate` (the detached a_i ≈ log(ε + g_i)
    the encoders' step uses; it may update state), `predict` (the same without changing state: the
    estimation-error diagnostic), optionally `prepare`, `on_epoch_start`, `trainable_parameter_groups`,
    `scalars`; state as buffers/parameters so checkpoints carry it;
  * a builder (args, embed_dim) -> the estimator, and `registry.register(Entry(name, ESTIMATOR, builder,
    add_arguments=..., validate=..., per_sample_state_bytes=..., resume_fixed_flags=...))`.
`--fastclip --estimator <name>` then trains with it; nothing else in src/ changes.
(Outside the package, e.g. a test, registering an entry before the flags are parsed does the same.)
"""
import importlib
import pkgutil

from .features import Features  # noqa: F401
from .method_interface import ContrastiveMethod, LossOutput  # noqa: F401
from .registry import Entry, build_estimator, build_method, method_names, register  # noqa: F401

# The built-in entries in a fixed order (the order of --estimator's choices and of the help text) ...
from . import openclip, gcl, moving_average, neuclip, amorlip  # noqa: F401,E402
# ... then every other module of the package: a new estimator's file registers itself with no other edit.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
