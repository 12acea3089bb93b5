"""The one registry of training methods and normalizer estimators.

Each method (openclip, siglip, gcl) and each estimator of the gcl family (moving_average, minibatch, npn,
amorlip, ...) registers one `Entry` that says everything the trainer needs to know about it: its flags, their
rules, the per-sample state it keeps, the flags a resume may not change, its tag in run names and its builder.
The trainer (flags, start-up and resume checks, run naming, the diagnostics) iterates the entries and never
names a method, so a new estimator is one module of this package (see the package docstring).

The built-in entries are declared in `builtin_entries` and plug-ins are the modules of `contrastive.plugins`;
both are imported on the registry's first use. Only argparse and the standard library here (`contrastive` must
not import `training`, and --help must not import torch): a builder may be named by "module:function" and is
imported when a run builds it.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

METHOD, ESTIMATOR = "method", "estimator"
#: Help section of an entry's flags unless it names another.
DEFAULT_FLAG_GROUP = "loss family"


def both_spellings(name: str) -> list[str]:
    """The reference's underscore spelling first, plus the dashed one (FastCLIP and NeuCLIP spell flags with
    underscores, open_clip with dashes; each family flag accepts both)."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def _no_flags(group) -> None:
    pass


def _no_rules(args) -> None:
    pass


def _no_per_sample_state(args) -> int:
    return 0


@dataclass
class Entry:
    """One method or estimator, as the trainer sees it."""
    name: str
    kind: str                                  # METHOD or ESTIMATOR
    #: METHOD: (args, model) -> ContrastiveMethod;  ESTIMATOR: (args, embed_dim) -> NormalizerEstimator;
    #: or "module:function" naming one (imported on first build)
    build: Callable | str
    #: adds the entry's flags to an argparse parser or group (`both_spellings` for family flags)
    add_arguments: Callable = _no_flags
    #: raises ValueError naming the bad flag and the fix; may fill derived defaults. Runs on every parse,
    #: whichever method is chosen (an entry's flags exist in every run).
    validate: Callable = _no_rules
    #: bytes of per-sample state (indexed by sample key) one rank keeps per key under these flags
    per_sample_state_bytes: Callable = _no_per_sample_state
    #: flag dest -> why a resume may not change it; stored in each checkpoint's `size_flags`
    resume_fixed_flags: dict = field(default_factory=dict)
    #: the boolean flag (dest) that chooses this entry (--fastclip, --siglip, --npn); None: chosen by default
    #: (a method) or only by --estimator NAME (an estimator)
    selecting_flag: Optional[str] = None
    #: a method whose normalizers come from an estimator: the flag (dest) that names it (gcl: "estimator")
    estimator_flag: Optional[str] = None
    #: the entry's word in default run names; None: its name
    run_name_tag: Optional[str] = None
    #: help section of the entry's flags
    flag_group: str = DEFAULT_FLAG_GROUP

    @property
    def tag(self) -> str:
        return self.run_name_tag or self.name

    def builder(self) -> Callable:
        if isinstance(self.build, str):
            module, _, function = self.build.partition(":")
            self.build = getattr(importlib.import_module(module), function)
        return self.build


_ENTRIES: dict[str, dict[str, Entry]] = {METHOD: {}, ESTIMATOR: {}}
_loaded = False


def _load_entries() -> None:
    """Import the built-in entries, then every module of the plug-in package, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(f"{__package__}.builtin_entries")
    plugins = importlib.import_module(f"{__package__}.plugins")
    for module in pkgutil.iter_modules(plugins.__path__):
        importlib.import_module(f"{plugins.__name__}.{module.name}")


def register(entry: Entry) -> Entry:
    """Add an entry; a second entry of the same kind and name is refused (it would silently replace one)."""
    _load_entries()  # the built-ins first: they keep their place in --estimator's choices
    if entry.kind not in _ENTRIES:
        raise ValueError(f"entry {entry.name!r}: kind must be {METHOD!r} or {ESTIMATOR!r}, got {entry.kind!r}")
    if entry.name in _ENTRIES[entry.kind]:
        raise ValueError(f"a {entry.kind} named {entry.name!r} is already registered")
    _ENTRIES[entry.kind][entry.name] = entry
    return entry


def unregister(kind: str, name: str) -> None:
    _ENTRIES[kind].pop(name, None)


def entries(kind: str) -> list[Entry]:
    """The entries of one kind in registration order (the order of --estimator's choices)."""
    _load_entries()
    return list(_ENTRIES[kind].values())


def names(kind: str) -> list[str]:
    return [item.name for item in entries(kind)]


def method_names() -> list[str]:
    return sorted(names(METHOD))


def entry(kind: str, name: str) -> Entry:
    _load_entries()
    if name not in _ENTRIES[kind]:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(_ENTRIES[kind]))}")
    return _ENTRIES[kind][name]


def build_method(name: str, args, model):
    """Build a method by its registry name; `args` are the parsed training flags."""
    return entry(METHOD, name).builder()(args, model)


def build_estimator(name: str, args, embed_dim: int):
    return entry(ESTIMATOR, name).builder()(args, embed_dim)


# ------------------------------------------------------------------------------- what params asks

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every entry's flags, methods first, each in its help section (sections created in first-use order)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for item in entries(METHOD) + entries(ESTIMATOR):
        if item.flag_group not in groups:
            groups[item.flag_group] = parser.add_argument_group(item.flag_group)
        item.add_arguments(groups[item.flag_group])


def chosen_method(args) -> Entry:
    """The method the flags choose: the one whose selecting flag is set, else the one without such a flag."""
    chosen = [m for m in entries(METHOD) if m.selecting_flag and getattr(args, m.selecting_flag, False)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join('--' + m.selecting_flag for m in chosen)} are different losses: "
                         "choose one")
    if chosen:
        return chosen[0]
    defaults = [m for m in entries(METHOD) if not m.selecting_flag]
    if len(defaults) != 1:
        raise ValueError(f"no method flag set and {len(defaults)} methods without one: cannot choose")
    return defaults[0]


def validate(args) -> None:
    """Choose the method (args.method) and run every entry's rules: methods first (gcl resolves --estimator),
    then estimators."""
    args.method = chosen_method(args).name
    for item in entries(METHOD) + entries(ESTIMATOR):
        item.validate(args)


def entries_in_use(args) -> list[Entry]:
    """The chosen method's entry, then its estimator's when it has one (after `validate`)."""
    method = entry(METHOD, args.method)
    if method.estimator_flag is None:
        return [method]
    return [method, entry(ESTIMATOR, getattr(args, method.estimator_flag))]


def estimator_name(args) -> Optional[str]:
    """The estimator in use, or None for a method without one."""
    used = entries_in_use(args)
    return used[1].name if len(used) > 1 else None


def run_name_tag(args) -> str:
    """The method's word in default run names: the estimator's tag for a method with one ("npn"), else the
    method's ("openclip")."""
    return entries_in_use(args)[-1].tag


def description(args) -> str:
    """"gcl/npn", "openclip": the method and its estimator, for the start-up line."""
    return "/".join(item.name for item in entries_in_use(args))


def per_sample_state_bytes(args) -> int:
    """Bytes per sample key of the chosen method's per-sample state (0: it keeps none)."""
    return entry(METHOD, args.method).per_sample_state_bytes(args)


def resume_fixed_flags() -> list[str]:
    """Every entry's resume-fixed flags, in registration order (the `size_flags` a checkpoint stores)."""
    found: list[str] = []
    for item in entries(METHOD) + entries(ESTIMATOR):
        found += [flag for flag in item.resume_fixed_flags if flag not in found]
    return found


def changed_resume_fixed_flag(stored: dict, args) -> Optional[tuple[str, str, str, str]]:
    """(flag, stored value, this run's value, why it is fixed) for the first resume-fixed flag of the entries in
    use whose value differs from a checkpoint's `size_flags` (values as str), else None. An estimator's flags
    count only when the checkpoint used the same estimator (another one's state is not restored)."""
    _load_entries()
    method = _ENTRIES[METHOD].get(getattr(args, "method", None))
    if method is None:  # a namespace that never went through `validate`: no entry's state to protect
        return None
    chosen_estimator = getattr(args, method.estimator_flag, None) if method.estimator_flag else None
    used = [method] + ([_ENTRIES[ESTIMATOR][chosen_estimator]] if chosen_estimator in _ENTRIES[ESTIMATOR] else [])
    for item in used:
        if item.kind == ESTIMATOR and stored.get(method.estimator_flag) != item.name:
            continue
        for flag, why in item.resume_fixed_flags.items():
            old, new = stored.get(flag), str(getattr(args, flag, None))
            if old is not None and old != new:
                return flag, old, new, why
    return None
