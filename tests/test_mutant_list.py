"""The mutation harness's list stays in step with the code it mutates."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_pattern_occurs_once_and_names_existing_tests(monkeypatch):
    """Bug: a refactor rewrites a line a mutant replaces (or a test it names is renamed): the harness
    then refuses to run, or kills nothing because the named test no longer exists, and nobody notices
    until the next mutation run. Also: a mutant whose replacement equals its pattern mutates nothing."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    mutants = _load("mutants")
    mutant_list = _load("mutant_list")
    mutants.check_patterns(str(ROOT), mutant_list.MUTANTS)  # raises SystemExit naming the stale ones
    assert len(mutant_list.MUTANTS) >= 40
    for m in mutant_list.MUTANTS:
        assert all(pattern != replacement for pattern, replacement in m.edits), m.name
        for target in m.tests:
            path, _, test = target.partition("::")
            assert (ROOT / path).is_file(), (m.name, target)
            if test:
                assert f"def {test}(" in (ROOT / path).read_text(), (m.name, target)


def test_a_stale_pattern_is_reported(tmp_path, monkeypatch):
    """Bug: check_patterns accepts a pattern that is absent (the check above would then pass vacuously)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    mutants = _load("mutants")
    mutant_list = _load("mutant_list")
    (tmp_path / "f.py").write_text("x = 1\n")
    stale = mutant_list.Mutant("stale", "f.py", [("x = 2", "x = 3")], [], "test")
    with pytest.raises(SystemExit, match="stale: pattern occurs 0 times"):
        mutants.check_patterns(str(tmp_path), [stale])
