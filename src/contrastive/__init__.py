"""Contrastive objectives for CLIP training: one interface, many ways to estimate normalizers.

Every method and estimator is one `registry.Entry` (its flags, rules, per-sample state, resume-fixed flags,
run-name tag and builder). The trainer asks the registry and never names a method. The built-in entries are
declared in `builtin_entries` (without torch: --help and flag errors answer before torch is imported); the
implementations are `openclip`, `gcl`, `moving_average`, `neuclip`, `amorlip`.

Adding an estimator is one file, src/contrastive/plugins/<name>.py (every module there is imported on the
registry's first use), holding:
  * a `NormalizerEstimator` subclass (`estimator_interface`): `estimate` (the detached a_i ≈ log(ε + g_i)
    the encoders' step uses; it may update state), `predict` (the same without changing state: the
    estimation-error diagnostic), optionally `prepare`, `on_epoch_start`, `trainable_parameter_groups`,
    `scalars`; state as buffers/parameters so checkpoints carry it;
  * a builder (args, embed_dim) -> the estimator, and `registry.register(Entry(name, ESTIMATOR, builder,
    add_arguments=..., validate=..., per_sample_state_bytes=..., resume_fixed_flags=...))`.
`--fastclip --estimator <name>` then trains with it. (Registering an entry from elsewhere, e.g. a test,
before the flags are parsed does the same.)

Importing the package does not import torch; `Features`, `ContrastiveMethod` and `LossOutput` are loaded on
first access.
"""
import importlib

from .registry import Entry, build_estimator, build_method, method_names, register  # noqa: F401

_LAZY = {"Features": "features", "ContrastiveMethod": "method_interface", "LossOutput": "method_interface"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
