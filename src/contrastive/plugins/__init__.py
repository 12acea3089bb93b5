"""Plug-in methods and estimators: every module in this package is imported on the registry's first use.

A new estimator is one file here that defines it and calls `contrastive.registry.register(Entry(...))`
(see the `contrastive` package docstring); nothing else in src/ changes. Import torch inside the builder's
module freely; keeping it out of the module's top level keeps `--help` fast.
"""
