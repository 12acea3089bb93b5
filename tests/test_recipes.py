"""The paper's recipes (scripts/recipes/run.sh, scripts/torchrun_neuclip_dfn14m.sh) print commands whose
flags the trainer accepts, with the paper's settings (Tables 2-4) and global batch. Parse only: nothing
trains, nothing imports torch (params.py is loaded on its own), so the file runs in a few seconds."""
import importlib.util
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "recipes" / "run.sh"
TORCHRUN_DFN14M = REPO / "scripts" / "torchrun_neuclip_dfn14m.sh"
REFERENCE_SLURM = REPO / "scripts" / "slurm" / "neuclip_dfn14m.sh"


def _load_params():
    """training.params without the package __init__ (which imports open_clip and torch: ~10 s)."""
    try:
        spec = importlib.util.spec_from_file_location("_recipes_params", REPO / "src" / "training" / "params.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:  # params.py grew a package-relative import: take the slow path
        from training import params
        return params


params = _load_params()

# Table 2 (size as downloaded: B.5 for CC3M/CC12M, the reference command for DFN-14M; the paper's
# rounded sizes for DFN-192M/1B), Table 3.
PAPER = {
    "cc3m": dict(model="RN50", global_batch=1024, size=2_723_840, seen=100e6,
                 lr=1e-3, lr_tau=1.25e-4, wd=0.1, warmup=10000, rho=6.5),
    "cc12m": dict(model="ViT-B-32", global_batch=2048, size=9_187_328, seen=300e6,
                  lr=4e-4, lr_tau=5e-5, wd=0.1, warmup=10000, rho=8.5),
    "dfn14m": dict(model="ViT-B-32", global_batch=4096, size=13_710_637, seen=320e6,
                   lr=5e-4, lr_tau=6.25e-5, wd=0.2, warmup=500, rho=11.0),
    "dfn192m": dict(model="ViT-B-16", global_batch=5120, size=192_000_000, seen=1.3e9,
                    lr=3.125e-4, lr_tau=3.9e-5, wd=0.2, warmup=500, rho=11.0),
    "dfn1b": dict(model="ViT-B-16", global_batch=5120, size=1_000_000_000, seen=1.0e9,
                  lr=3.125e-4, lr_tau=3.9e-5, wd=0.2, warmup=500, rho=11.0),
}
BASELINES = ["neuclip", "fastclip", "openclip", "siglip", "amorlip"]
# method -> the NPN fields that differ from NeuCLIP's (Table 4: m 4096, T_r 500, T_u 10, lr 1.0)
ABLATIONS = {
    "neuclip-mlp": {"npn_arch": "mlp"},
    "neuclip-sep": {"npn_objective": "regression"},
    "neuclip-sep-mlp": {"npn_arch": "mlp", "npn_objective": "regression"},
    "neuclip-simul": {"npn_update": "simultaneous"},
    **{f"neuclip-tr{t}": {"npn_restart_iter": t} for t in (0, 20, 100, 500, 2500, 12500)},
    **{f"neuclip-tu{t}": {"npn_repetition": t} for t in (1, 5, 10, 20, 50)},
}
# where the paper ran them: Tables 12-14 (objective x architecture), B.3 (simultaneous), Tables 15-16
ABLATION_DATASETS = {"neuclip-mlp": ["cc3m", "cc12m", "dfn14m"], "neuclip-sep": ["cc3m", "cc12m", "dfn14m"],
                     "neuclip-sep-mlp": ["cc3m", "cc12m", "dfn14m"], "neuclip-simul": ["cc3m"]}
RUN_ENV_VARS = ("LAUNCH", "NPROC", "SLURM_NTASKS", "DRY_RUN", "DATA_ROOT", "TRAIN_DATA", "NUM_SAMPLES",
                "DATA_SIZE", "SAMPLES_PER_SHARD", "EPOCHS", "GLOBAL_BATCH", "SEED", "NAME", "LOGS", "WORKERS",
                "PYTHON", "TORCHRUN", "CC3M_DATA", "CC12M_DATA", "DFN14M_DATA", "DFN192M_DATA", "DFN1B_DATA")


def dry_run(script, *argv, check=True, **env):
    clean = {k: v for k, v in os.environ.items() if k not in RUN_ENV_VARS}
    clean.update({"DRY_RUN": "1", **{k: str(v) for k, v in env.items()}})
    proc = subprocess.run(["bash", str(script), *argv], env=clean, capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def split_command(line):
    """(launcher, world size, training.main argv) of a printed command."""
    tokens = shlex.split(line)
    assert tokens[0] == "PYTHONPATH=src", line
    if tokens[1] == "srun":
        assert tokens[2:5] == ["python", "-u", "src/training/main.py"], line
        return "srun", None, tokens[5:]
    assert tokens[1] == "torchrun", line
    i = tokens.index("training.main")
    assert tokens[i - 1] == "-m" and tokens[i + 1] == "--", line
    nproc = int(tokens[tokens.index("--nproc_per_node") + 1])
    return "torchrun", nproc, tokens[i + 2:]


def recipe(dataset, method, *extra, **env):
    proc = dry_run(RUN, dataset, method, *extra, **env)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    launcher, nproc, argv = split_command(lines[0])
    try:
        args = params.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{dataset} {method}: training.params rejects the recipe's flags ({exc}): {argv}")
    return launcher, nproc, argv, args


def test_list_names_every_recipe():
    out = dry_run(RUN, "--list").stdout.splitlines()
    assert out[0].split(":")[1].split() == list(PAPER)
    assert sorted(out[1].split(":")[1].split()) == sorted(BASELINES + list(ABLATIONS))


@pytest.mark.parametrize("dataset", list(PAPER))
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_recipe_parses_with_paper_settings(dataset, method):
    paper = PAPER[dataset]
    launcher, nproc, _, args = recipe(dataset, method)
    assert launcher == "torchrun" and nproc == 8  # the paper's 8 GPUs
    assert args.batch_size * nproc == paper["global_batch"]
    assert args.model == paper["model"]
    assert args.train_num_samples == paper["size"]
    # epochs = samples seen / size, rounded up (DFN-14M: 23.3 -> 24, the reference command's)
    assert args.epochs == math.ceil(paper["seen"] / paper["size"])
    assert (args.lr, args.wd, args.warmup) == (paper["lr"], paper["wd"], paper["warmup"])
    assert "{" in args.train_data and args.train_data.endswith(".tar")
    assert args.name == f"{dataset}-{method}-s2026"
    if method == "openclip":
        assert args.method == "openclip" and args.local_loss and args.gather_with_grad
    elif method == "siglip":
        assert args.method == "siglip"
    else:
        estimator = {"neuclip": "npn", "fastclip": "moving_average", "amorlip": "amorlip"}[method]
        assert (args.method, args.estimator) == ("gcl", estimator)
        assert args.multiply_tau and args.temperature_scheme == "global_learnable"
        assert args.lr_tau_scheduler == "step_thresh" and args.temperature == 0.07
        assert (args.lr_tau, args.rho, args.fastclip_eps) == (paper["lr_tau"], paper["rho"], 1e-6)
        # key space covers img2dataset's keys: (highest shard + 1) x 10^4 >= samples
        assert args.data_size >= args.train_num_samples and args.data_size % 10000 == 0
    if method == "neuclip":
        assert (args.npn_lr, args.npn_num_protos, args.npn_restart_iter, args.npn_repetition) == (1.0, 4096, 500, 10)
        assert (args.npn_arch, args.npn_objective, args.npn_update) == ("prototype", "unified", "alternating")


@pytest.mark.parametrize("method", list(ABLATIONS))
def test_ablation_recipe_differs_from_neuclip_only_where_intended(method):
    for dataset in ABLATION_DATASETS.get(method, ["dfn14m"]):  # Tables 15-16: DFN-14M
        *_, base = recipe(dataset, "neuclip")
        launcher, nproc, _, args = recipe(dataset, method)
        assert args.batch_size * nproc == PAPER[dataset]["global_batch"]
        assert {k: getattr(args, k) for k in ABLATIONS[method]} == ABLATIONS[method]
        changed = {k for k, v in vars(args).items() if vars(base)[k] != v}
        intended = {k for k, v in ABLATIONS[method].items() if vars(base)[k] != v}  # tr500, tu10: none
        assert changed == {"name"} | intended
        assert args.name == f"{dataset}-{method}-s2026"
        assert args.estimator == "npn"


@pytest.mark.parametrize("dataset", list(PAPER))
@pytest.mark.parametrize("world", [1, 4, 8, 16, 32])
def test_per_rank_batch_times_world_is_the_global_batch(dataset, world):
    for env in ({"NPROC": world}, {"LAUNCH": "srun", "SLURM_NTASKS": world}):
        launcher, nproc, _, args = recipe(dataset, "neuclip", **env)
        assert (nproc or int(env.get("SLURM_NTASKS", 0))) == world
        assert launcher == env.get("LAUNCH", "torchrun")
        assert args.batch_size * world == PAPER[dataset]["global_batch"]


def test_bad_input_fails_before_launching():
    assert dry_run(RUN, "cc4m", "neuclip", check=False).returncode == 2
    assert dry_run(RUN, "cc3m", "neuclp", check=False).returncode == 2
    assert dry_run(RUN, "cc3m", "neuclip-trx", check=False).returncode == 2
    assert dry_run(RUN, "cc3m", "neuclip", NPROC=3, check=False).returncode == 2  # 1024 / 3
    assert dry_run(RUN, "cc3m", "neuclip", LAUNCH="srun", check=False).returncode == 2  # no allocation
    assert dry_run(RUN, "cc3m", "neuclip", LAUNCH="mpirun", check=False).returncode == 2
    # a shard list without numbers gives no key space: the family needs DATA_SIZE, others do not
    assert dry_run(RUN, "cc3m", "fastclip", TRAIN_DATA="/d/train.tar", check=False).returncode == 2
    assert recipe("cc3m", "fastclip", TRAIN_DATA="/d/train.tar", DATA_SIZE=123)[3].data_size == 123
    assert recipe("cc3m", "openclip", TRAIN_DATA="/d/train.tar")[3].train_data == "/d/train.tar"


def test_typo_or_conflict_in_a_recipe_fails_to_parse():
    # what a recipe with a mistake would print is rejected by the same parse
    *_, argv, _ = recipe("dfn14m", "neuclip")
    for bad in (["--npn_lrr", "1.0"], ["--siglip"], ["--estimator", "moving_average"], ["--npn_arch", "transformer"]):
        with pytest.raises(SystemExit):
            params.parse_args(argv + bad)


def test_environment_and_extra_flags_override():
    _, _, _, args = recipe("cc3m", "fastclip", "--npn_lr", "0.5", "--tau_grad", "reference",
                           NUM_SAMPLES=2_000_000, SEED=7, NAME="x", DATA_ROOT="/data",
                           CC3M_DATA="/cc3m/{00000..00099}.tar")
    assert (args.npn_lr, args.tau_grad, args.seed, args.name) == (0.5, "reference", 7, "x")
    assert args.train_num_samples == 2_000_000 and args.epochs == 50  # ceil(100M / 2M)
    assert args.gamma_decay_epochs == 25  # CC3M: half the epochs (FastCLIP's rule)
    assert (args.train_data, args.data_size) == ("/cc3m/{00000..00099}.tar", 100 * 10000)
    _, _, _, args = recipe("dfn14m", "fastclip", TRAIN_DATA="/a/{000..009}.tar::/b/{00010..00019}.tar",
                           GLOBAL_BATCH=1024, EPOCHS=2)
    assert args.data_size == 20 * 10000 and args.batch_size * 8 == 1024 and args.epochs == 2
    assert args.gamma_decay_epochs == 2  # DFN: over all epochs (the reference command's rule)
    _, _, _, args = recipe("dfn192m", "neuclip", DATA_ROOT="/data")
    assert args.train_data.startswith("/data/")


def _reference_argv():
    text = REFERENCE_SLURM.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("srun python -u src/training/main.py"))
    return shlex.split(line)[4:]


def _comparable(args):
    return {k: v for k, v in vars(args).items() if k not in ("name", "logs")}


def test_dfn14m_neuclip_recipe_is_the_reference_command():
    reference = params.parse_args(_reference_argv())
    assert reference.batch_size * 8 == 4096  # 2 nodes x 4 GPUs x 512
    for env in ({}, {"LAUNCH": "srun", "SLURM_NTASKS": 8}):
        *_, args = recipe("dfn14m", "neuclip", **env)
        assert _comparable(args) == _comparable(reference)


@pytest.mark.parametrize("nproc", [8, 4, 2, 1])
def test_torchrun_script_is_the_reference_command_on_one_node(nproc):
    proc = dry_run(TORCHRUN_DFN14M, NPROC=nproc)
    launcher, world, argv = split_command(proc.stdout.strip())
    assert (launcher, world) == ("torchrun", nproc)
    args = params.parse_args(argv)
    reference = params.parse_args(_reference_argv())
    assert args.batch_size * nproc == 4096
    assert {**vars(args), "batch_size": None} == {**vars(reference), "batch_size": None}
    assert dry_run(TORCHRUN_DFN14M, NPROC=3, check=False).returncode == 2


def test_readme_style_docs_name_only_existing_recipes():
    doc = (REPO / "docs" / "RECIPES.md").read_text()
    datasets, methods = set(PAPER), set(BASELINES) | set(ABLATIONS)
    calls = re.findall(r"run\.sh ([a-z0-9]+) ([a-z0-9-]+)", doc)
    assert calls, "docs/RECIPES.md names no recipe"
    for dataset, method in calls:
        assert dataset in datasets and method in methods, (dataset, method)
