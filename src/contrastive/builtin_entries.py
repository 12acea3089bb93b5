"""The built-in methods and estimators as the trainer sees them: one registry entry each.

An entry's flags, rules, per-sample state size and resume-fixed flags are declared here, without torch, so that
`--help` and flag errors answer before torch is imported (seconds, more under load); each builder is named by
its module path and imported only when a run builds the method. The implementations are the modules named:
    openclip, siglip   -> openclip.py          gcl (the FastCLIP/NeuCLIP family) -> gcl.py
    moving_average, minibatch -> moving_average.py   npn -> neuclip.py   amorlip -> amorlip.py
Registration order is the order of --estimator's choices and of the help text.
"""
from .registry import ESTIMATOR, METHOD, Entry, both_spellings, entries, names, register

DEFAULT_ESTIMATOR = "moving_average"
TEMPERATURE_SCHEMES = ("global_learnable", "global_constant", "individual_learnable", "individual_constant")
NPN_GROUP = "NeuCLIP normalizer-prediction network"

#: NeuCLIP's defaults, written once: the flags' defaults here and `neuclip.NeuCLIPEstimator`'s.
NPN_DEFAULTS = {"npn_lr": 1.0, "npn_num_protos": 4096, "npn_repetition": 10, "npn_restart_iter": 500,
                "npn_arch": "prototype", "npn_objective": "unified", "npn_update": "alternating",
                "npn_init_scale": 20.0, "npn_adagrad_reset": "restart", "npn_fill": "ring", "npn_mlp_lr": 1e-3}
#: AmorLIP's defaults, written once: the flags' defaults here and `amorlip.AmorLIPEstimator`'s.
AMORLIP_DEFAULTS = {"amorlip_lr": 1e-3, "amorlip_ema": 0.92, "amorlip_target_mix": 0.0, "amorlip_mix_epochs": 15}


def _defaulted_flag(group, defaults: dict):
    def flag(name, **options):
        group.add_argument(*both_spellings(name), dest=name, default=defaults[name], **options)
    return flag


# ------------------------------------------------------------------------------------------ SigLIP

def add_siglip_arguments(group) -> None:
    group.add_argument("--siglip", action="store_true", help="SigLIP's sigmoid loss")


# ----------------------------------------------------------------------------- the gcl family (FastCLIP)

def add_gcl_arguments(group) -> None:
    group.add_argument("--fastclip", action="store_true",
                       help="the global contrastive loss family (FastCLIP; with --npn: NeuCLIP)")
    group.add_argument(*both_spellings("temperature_scheme"), dest="temperature_scheme",
                       default="global_learnable", choices=TEMPERATURE_SCHEMES)
    group.add_argument("--temperature", type=float, default=0.07, help="initial τ")
    group.add_argument(*both_spellings("multiply_tau"), dest="multiply_tau", action="store_true",
                       help="robust loss: τ·loss + ρτ (RGCL-g with global_learnable = FastCLIP-v3)")
    group.add_argument("--rho", type=float, default=8.0)
    group.add_argument(*both_spellings("fastclip_eps"), dest="fastclip_eps", type=float, default=1e-14,
                       help="ε added to every normalizer")
    group.add_argument(*both_spellings("lr_tau"), dest="lr_tau", type=float, default=-1.0,
                       help="temperature learning rate (−1: --lr)")
    group.add_argument(*both_spellings("lr_tau_scheduler"), dest="lr_tau_scheduler", default="cosine",
                       choices=["cosine", "const", "const-cooldown", "step_thresh"])
    group.add_argument(*both_spellings("data_size"), dest="data_size", type=int, default=-1,
                       help="size of the sample-key space (max key + 1); sizes per-sample state")
    # The default is the gradient the published ρ were tuned with, so the paper's commands reproduce
    # its temperature (scripts/tau_grad_study.py: for one ρ, exact settles τ elsewhere).
    group.add_argument(*both_spellings("tau_grad"), dest="tau_grad", default="reference",
                       choices=["reference", "exact"],
                       help="reference (default): FastCLIP's and the paper's code, which differentiates the "
                            "temperature in the data term twice; the published ρ are tuned to it. exact: the "
                            "objective's own temperature gradient (settles τ elsewhere for the same ρ: "
                            "retune ρ)")
    group.add_argument("--estimator", default=None, choices=names(ESTIMATOR),
                       help=f"normalizer estimator of the --fastclip family (default {DEFAULT_ESTIMATOR})")


def validate_gcl(args) -> None:
    """The family's flags need --fastclip; an estimator's own switch (--npn) and --estimator must agree.
    Resolves args.estimator (every run has one, as params.txt always recorded)."""
    switches = [e for e in entries(ESTIMATOR) if e.selecting_flag]
    family_only = {f"--{e.selecting_flag}": getattr(args, e.selecting_flag) for e in switches}
    family_only.update({"--multiply_tau": args.multiply_tau, "--estimator": args.estimator is not None})
    if not args.fastclip:
        bad = [flag for flag, on in family_only.items() if on]
        if bad:
            raise ValueError(f"{', '.join(bad)} only applies to the global contrastive loss family: "
                             "add --fastclip")
    switched = [e for e in switches if getattr(args, e.selecting_flag)]
    if len(switched) > 1:
        raise ValueError(f"{' and '.join('--' + e.selecting_flag for e in switched)} are different estimators: "
                         "choose one")
    implied = switched[0] if switched else None
    if implied and args.estimator not in (None, implied.name):
        raise ValueError(f"--{implied.selecting_flag} conflicts with --estimator {args.estimator}")
    args.estimator = (implied.name if implied else None) or args.estimator or DEFAULT_ESTIMATOR
    if not 0 < args.temperature <= 1:
        raise ValueError(f"--temperature {args.temperature} must be in (0, 1]")
    if args.lr_tau < 0:
        args.lr_tau = args.lr


def gcl_bytes_per_sample(args) -> int:
    from .per_sample_memory import bytes_per_sample  # noqa: PLC0415  (torch: only once a run is set up)
    return bytes_per_sample(args)


# ------------------------------------------------------------------------ FastCLIP's moving average

def add_moving_average_arguments(group) -> None:
    group.add_argument("--gamma", type=float, default=0.8, help="final γ of u ← (1−γ)u + γ·g")
    group.add_argument(*both_spellings("gamma_schedule"), dest="gamma_schedule", default="cosine",
                       choices=["cosine", "constant"])
    group.add_argument(*both_spellings("gamma_decay_epochs"), dest="gamma_decay_epochs", type=int, default=10)


def validate_moving_average(args) -> None:
    if args.estimator == "moving_average" and args.temperature_scheme.startswith("individual") \
            and args.multiply_tau:
        raise ValueError("--multiply_tau is for global temperatures; individual temperatures (FastCLIP-v2) "
                         "already use the robust loss")
    if not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma {args.gamma} must be in (0, 1]")


def moving_average_bytes_per_sample(args) -> int:
    from .moving_average import MovingAverageEstimator  # noqa: PLC0415  (torch: only once a run is set up)
    from .table import PerSampleTable  # noqa: PLC0415
    return PerSampleTable.bytes_per_sample(MovingAverageEstimator.COLUMNS)


# --------------------------------------------------------------------------------- NeuCLIP's NPN

def add_npn_arguments(group) -> None:
    flag = _defaulted_flag(group, NPN_DEFAULTS)
    group.add_argument("--npn", action="store_true", help="NeuCLIP: --estimator npn")
    flag("npn_lr", type=float)
    flag("npn_num_protos", type=int)
    flag("npn_repetition", type=int)
    flag("npn_restart_iter", type=int, help="T_r; 0 or negative: never restart")
    flag("npn_arch", choices=["prototype", "mlp"])
    flag("npn_objective", choices=["unified", "regression"])
    flag("npn_update", choices=["alternating", "simultaneous"])
    flag("npn_init_scale", type=float,
         help="RMS coordinate of a restarted prototype (norm = scale·√d). α only sees directions; "
              "AdaGrad's first step (±lr per coordinate) turns a prototype by about lr/scale "
              "radians, so this sets what --npn_lr means (scripts/npn_lr_study.py)")
    flag("npn_adagrad_reset", choices=["restart", "never"],
         help="zero AdaGrad's accumulators at every restart, or never")
    flag("npn_fill", choices=["ring", "resample"],
         help="restart with m > global batch: after the batch, take the most recent earlier "
              "batches' embeddings (ring), or resample the batch with small noise")
    flag("npn_mlp_lr", type=float, help="AdaGrad lr of the --npn_arch mlp ablation (--npn_lr is the prototypes')")


def validate_npn(args) -> None:
    # --npn_repetition also sets AmorLIP's steps per encoder step: checked whichever estimator runs.
    for name in ("npn_repetition", "npn_num_protos"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be ≥ 1, got {getattr(args, name)}")


# ------------------------------------------------------------------------------------------ AmorLIP

def add_amorlip_arguments(group) -> None:
    flag = _defaulted_flag(group, AMORLIP_DEFAULTS)
    group.add_argument("--amorlip", action="store_true", help="AmorLIP baseline: --estimator amorlip")
    flag("amorlip_lr", type=float,
         help="AmorLIP: Adam lr of the normalizer MLPs (--npn_repetition steps per encoder step)")
    flag("amorlip_ema", type=float,
         help="AmorLIP: EMA β of the network whose predictions weight the encoder's negatives")
    flag("amorlip_target_mix", type=float,
         help="AmorLIP: final weight of the previous epoch's network in the regression target "
              "(0: off; AmorLIP's --fit_w_prev used 0.8)")
    flag("amorlip_mix_epochs", type=int, help="AmorLIP: epochs over which the target mix weight rises on a cosine")


# ------------------------------------------------------------------------------------ the entries

# openclip: chosen when no method flag is set.
register(Entry("openclip", METHOD, "contrastive.openclip:build_openclip"))
register(Entry("siglip", METHOD, "contrastive.openclip:build_siglip", add_arguments=add_siglip_arguments,
               selecting_flag="siglip"))
register(Entry("gcl", METHOD, "contrastive.gcl:build_gcl", add_arguments=add_gcl_arguments, validate=validate_gcl,
               per_sample_state_bytes=gcl_bytes_per_sample, selecting_flag="fastclip", estimator_flag="estimator"))
# moving_average first: the default estimator, and the first of --estimator's choices.
register(Entry("moving_average", ESTIMATOR, "contrastive.moving_average:build_moving_average",
               add_arguments=add_moving_average_arguments, validate=validate_moving_average,
               per_sample_state_bytes=moving_average_bytes_per_sample))
register(Entry("minibatch", ESTIMATOR, "contrastive.moving_average:build_minibatch"))
register(Entry("npn", ESTIMATOR, "contrastive.neuclip:build_neuclip", add_arguments=add_npn_arguments,
               validate=validate_npn, selecting_flag="npn", flag_group=NPN_GROUP,
               resume_fixed_flags={"npn_num_protos": "the NPN's prototypes and their AdaGrad state cannot be resized"}))
register(Entry("amorlip", ESTIMATOR, "contrastive.amorlip:build_amorlip", add_arguments=add_amorlip_arguments,
               selecting_flag="amorlip", flag_group=NPN_GROUP))
