"""The registry drives the command line, the per-sample state decision, resume checks and naming."""
import argparse

import pytest

import contrastive  # noqa: F401  (registers the built-in methods and estimators)
from contrastive import registry
from contrastive.registry import ESTIMATOR, METHOD, Entry, both_spellings
from training.params import build_parser, default_run_name, parse_args

TOY = "toy_constant"


def add_toy_arguments(group) -> None:
    group.add_argument(*both_spellings("toy_level"), dest="toy_level", type=int, default=3,
                       help="the toy's constant estimate")


def validate_toy(args) -> None:
    if args.toy_level % 2 == 0:
        raise ValueError(f"--toy_level must be odd, got {args.toy_level}: pass an odd number")


@pytest.fixture
def toy_entry():
    entry = registry.register(Entry(TOY, ESTIMATOR, lambda args, dim: None, add_arguments=add_toy_arguments,
                                    validate=validate_toy, per_sample_state_bytes=lambda args: 12,
                                    resume_fixed_flags={"toy_level": "the toy cannot change its level"},
                                    selecting_flag=None, run_name_tag="toy"))
    try:
        yield entry
    finally:
        registry.unregister(ESTIMATOR, TOY)


def test_a_registered_estimator_gets_its_flags_choice_and_rules_on_the_command_line(toy_entry, capsys):
    """Bugs caught: --estimator choices fixed in params (the toy would be an invalid choice); an entry's flags
    not added in both spellings; an entry's validate not reaching parse_args as a usage error (exit 2)."""
    args = parse_args(["--fastclip", "--estimator", TOY, "--toy-level", "5"])
    assert (args.method, args.estimator, args.toy_level) == ("gcl", TOY, 5)
    with pytest.raises(SystemExit) as usage:
        parse_args(["--fastclip", "--estimator", TOY, "--toy_level", "4"])
    assert usage.value.code == 2
    assert "--toy_level must be odd, got 4: pass an odd number" in capsys.readouterr().err


def test_per_sample_state_and_run_names_come_from_the_entries(toy_entry):
    """Bugs caught: uses_per_sample_state recomputed from estimator names (the toy keeps per-sample state, so a
    run without --data_size must be refused); run names and the start-up line's method written from a fixed
    list (crash or "gcl" instead of the entry's tag)."""
    args = parse_args(["--fastclip", "--estimator", TOY])
    assert args.uses_per_sample_state
    assert not parse_args(["--fastclip", "--estimator", "minibatch"]).uses_per_sample_state
    assert parse_args(["--fastclip", "--temperature_scheme", "individual_learnable", "--estimator",
                       "minibatch"]).uses_per_sample_state
    assert "-toy-model_" in default_run_name(args)
    assert registry.description(args) == "gcl/toy_constant" and registry.estimator_name(args) == TOY
    plain = parse_args([])
    assert registry.description(plain) == "openclip" and registry.estimator_name(plain) is None


def test_resume_fixed_flags_of_the_entry_in_use_are_compared(toy_entry):
    """Bugs caught: resume checks that only know --npn_num_protos (the toy's changed level would load
    silently); comparing an estimator's fixed flags against a checkpoint of another estimator; a
    checkpoint's size_flags losing the keys old checkpoints have."""
    from training.checkpoint.resume_checks import check_size_flags, size_flags
    old = parse_args(["--fastclip", "--estimator", TOY, "--toy_level", "3"])
    stored = size_flags(old)
    assert list(stored)[:3] == ["model", "estimator", "npn_num_protos"] and stored["toy_level"] == "3"
    ckpt = {"size_flags": stored, "method_name": "gcl"}
    check_size_flags("same.pt", ckpt, old)
    with pytest.raises(ValueError, match=r"^changed\.pt was written with --toy_level 3, this run has --toy_level 5: "
                                         r"the toy cannot change its level; relaunch with --toy_level 3"):
        check_size_flags("changed.pt", ckpt, parse_args(["--fastclip", "--estimator", TOY, "--toy_level", "5"]))
    other = {"size_flags": {**stored, "estimator": "npn"}, "method_name": "gcl"}
    check_size_flags("other.pt", other, parse_args(["--fastclip", "--estimator", TOY, "--toy_level", "5"]))


def test_two_entries_of_one_name_are_refused_and_unregistering_removes_the_flags(toy_entry):
    """Bugs caught: a second registration silently replacing a built-in (e.g. a plug-in named "npn"); an
    unregistered entry's flags or choice lingering in the parser (leaking into other runs)."""
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Entry("npn", ESTIMATOR, lambda args, dim: None))
    registry.unregister(ESTIMATOR, TOY)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--toy_level", "3"])
    registry.register(toy_entry)


def test_method_selection_and_its_messages_come_from_the_entries():
    """Bugs caught: method choice hard-coded in params (a method entry's selecting flag ignored); the
    conflict messages changing wording."""
    assert [e.name for e in registry.entries(METHOD)] == ["openclip", "siglip", "gcl"]
    assert [e.name for e in registry.entries(ESTIMATOR)][:4] == ["moving_average", "minibatch", "npn", "amorlip"]
    assert parse_args(["--siglip"]).method == "siglip" and parse_args([]).method == "openclip"
    with pytest.raises(ValueError, match=r"^--siglip and --fastclip are different losses: choose one$"):
        registry.chosen_method(argparse.Namespace(siglip=True, fastclip=True))


def test_a_module_in_the_plugin_package_registers_itself_without_other_edits(tmp_path, monkeypatch):
    """Bug caught: plug-in discovery missing or broken (a new estimator file would also need an edit of a list
    of imports). The plug-in package's search path gets a temporary folder, so src/ is not touched."""
    import sys
    import contrastive.plugins
    (tmp_path / "tmp_plugin_estimator.py").write_text(
        "from contrastive.registry import ESTIMATOR, Entry, register\n"
        "register(Entry('tmp_plugin', ESTIMATOR, lambda args, dim: None, run_name_tag='plugged'))\n")
    monkeypatch.setattr(contrastive.plugins, "__path__", [*contrastive.plugins.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_loaded", False)  # as in a fresh process: the next query loads the plug-ins
    try:
        assert "tmp_plugin" in registry.names(ESTIMATOR)
        args = parse_args(["--fastclip", "--estimator", "tmp_plugin"])
        assert "-plugged-model_" in default_run_name(args)
    finally:
        registry.unregister(ESTIMATOR, "tmp_plugin")
        sys.modules.pop("contrastive.plugins.tmp_plugin_estimator", None)
