#!/usr/bin/env python
"""Mutation testing: plant plausible bugs one at a time and check that the tests catch each.

    python scripts/mutants.py [--quick] [--only NAME[,NAME...]] [--timeout S] [--list]

Each mutant (scripts/mutant_list.py) is a set of exact source replacements (a pattern that must occur
exactly once in its file, never a line number) and the tests that should catch it. The harness copies
src/ and tests/ to a temporary folder (the working tree is never edited), checks the unmutated copy passes
the selected tests, then for each mutant applies it, runs `pytest -x -q` on its tests (OMP_NUM_THREADS=1,
a timeout per mutant) and restores the file. A mutant is KILLED when its tests fail (or time out),
SURVIVED when they pass. Mutants annotated `equivalent` change no observable behaviour (the reason is in
the list); their survival is expected and reported apart. Not part of CI: the full list takes a while.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from mutant_list import MUTANTS  # noqa: E402


def check_patterns(root: str, mutants) -> None:
    """Every pattern occurs exactly once in its file: a refactor that moves or duplicates code must
    update the list rather than silently mutate nothing (or the wrong place)."""
    problems = []
    for m in mutants:
        text = open(os.path.join(root, m.file)).read()
        for pattern, _ in m.edits:
            count = text.count(pattern)
            if count != 1:
                problems.append(f"{m.name}: pattern occurs {count} times in {m.file}: {pattern[:70]!r}")
    if problems:
        raise SystemExit("mutant list out of date:\n  " + "\n  ".join(problems))


def run_tests(workdir: str, tests, timeout: float) -> tuple[bool, float, str]:
    """(passed, seconds, last output line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.path.join(workdir, "src"), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - start, f"timeout after {timeout:.0f}s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return proc.returncode == 0, time.monotonic() - start, lines[-1] if lines else proc.stderr[-200:]


def copy_tree(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name), ignore=ignore)
    for name in ("pyproject.toml", "README.md"):  # tests read the README (flags documented)
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dest)
    for name in ("scripts", "docs"):  # some tests read recipe scripts and docs
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name), ignore=ignore)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the mutants marked quick (fast tests)")
    p.add_argument("--only", default="", help="comma-separated mutant names")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    args = p.parse_args(argv)

    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        raise SystemExit(f"--only: unknown mutant(s) {', '.join(unknown)}; see --list")
    selected = [m for m in MUTANTS if (not names or m.name in names) and (not args.quick or m.quick)]
    check_patterns(ROOT, MUTANTS)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:36s} {m.file:36s} {'quick' if m.quick else '     '} {m.why}")
        return 0

    with tempfile.TemporaryDirectory(prefix="mutants-") as work:
        copy_tree(work)
        if not args.no_baseline:
            tests = sorted({t for m in selected for t in m.tests})
            ok, seconds, last = run_tests(work, tests, args.timeout * 4)
            print(f"baseline ({len(tests)} test targets, {seconds:.0f}s): {'pass' if ok else 'FAIL'}: {last}",
                  flush=True)
            if not ok:
                print("the unmutated code fails its tests: fix that first", file=sys.stderr)
                return 2
        killed, survived, equivalent_survived, equivalent_killed = [], [], [], []
        for i, m in enumerate(selected, 1):
            path = os.path.join(work, m.file)
            original = open(path).read()
            mutated = original
            for pattern, replacement in m.edits:
                mutated = mutated.replace(pattern, replacement, 1)
            try:
                with open(path, "w") as f:
                    f.write(mutated)
                ok, seconds, last = run_tests(work, m.tests, args.timeout)
            finally:
                with open(path, "w") as f:
                    f.write(original)
            verdict = "survived" if ok else "killed"
            if m.equivalent:
                (equivalent_survived if ok else equivalent_killed).append(m)
                verdict += " (equivalent)"
            else:
                (survived if ok else killed).append(m)
            print(f"[{i:2d}/{len(selected)}] {m.name:36s} {verdict:22s} {seconds:5.0f}s  {last[:90]}", flush=True)

        counted = len(killed) + len(survived)
        print(f"\nkilled {len(killed)}/{counted} non-equivalent mutants "
              f"({100.0 * len(killed) / max(counted, 1):.0f}%); "
              f"{len(equivalent_survived)} equivalent mutant(s) survived as expected"
              + (f", {len(equivalent_killed)} 'equivalent' mutant(s) were KILLED (fix their annotation)"
                 if equivalent_killed else ""))
        for m in survived:
            print(f"  SURVIVOR {m.name}: {m.why} ({m.file}; tests {' '.join(m.tests)})")
        for m in equivalent_survived:
            print(f"  equivalent {m.name}: {m.equivalent}")
        for m in equivalent_killed:
            print(f"  'equivalent' but killed {m.name}: {m.equivalent}")
        return 1 if survived or equivalent_killed else 0


if __name__ == "__main__":
    sys.exit(main())
