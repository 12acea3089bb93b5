"""Part 1 of `training.bench` (cost) and the step-timing machinery part 4 (GPU) reuses.

Every method gets its own copy of one initial model, its own optimizer (built as training does) and the
same batches; steps run INTERLEAVED (a step of every method, then again, the order rotated each round)
after warm-up, so a change in machine load hits every method alike. A step is split into the loop's
phases, each timed with `time.perf_counter` (after `torch.cuda.synchronize()` on GPU):

  forward     the encoders (under the run's autocast)
  before      method.before_encoder_step: NeuCLIP's NPN inner loop, AmorLIP's MLP fitting; the gcl family
              also computes the batch similarity and normalizers here once (the loss reuses them)
  loss        method(feats)
  backward    zero_grad + loss.backward()
  optimizer   method-gradient averaging, grad-norm clipping, optimizer.step(), after_encoder_step, τ clamp
  comm        collectives (torch.distributed all-gathers, all-reduces, broadcasts), timed by wrapping them and
              subtracted from the phase they happen in. One process: none, 0. DDP's gradient all-reduce
              overlaps backward inside C++ and stays in `backward`.

Memory peak on CPU: each method in its own subprocess (`python -m training.bench_cost --memory-probe JSON`),
max RSS (`resource.getrusage`) after its steps minus max RSS before the method existed. On GPU:
`torch.cuda.max_memory_allocated` during a step minus what was allocated before it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .bench_common import (METHOD_ORDER, MethodSpec, fmt, human_bytes, iqr, markdown_table, median, method_spec,
                           pyplot, python, save_figure, subprocess_env)

PHASES = ("forward", "before", "loss", "backward", "optimizer", "comm")
PHASE_LABELS = {"forward": "encoder fwd", "before": "before_encoder_step", "loss": "loss (method fwd)",
                "backward": "encoder bwd", "optimizer": "optimizer", "comm": "comm"}
TARGET_RATIO = 1.05


# ------------------------------------------------------------------------------------------- clock

def clock_for(device: torch.device):
    if device.type == "cuda":
        def clock():
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


class CommTimer:
    """Seconds spent in torch.distributed collectives, by wrapping them (synchronising around each on GPU).
    Without a process group nothing is wrapped and the total stays 0."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single")

    def __init__(self, clock):
        self.clock, self.total, self.calls, self._saved = clock, 0.0, 0, {}

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def install(self) -> "CommTimer":
        import torch.distributed as dist  # noqa: PLC0415
        if not (dist.is_available() and dist.is_initialized()):
            return self
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(dist, name, self._wrap(original))
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved = {}

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += self.clock() - start
                self.calls += 1
        return timed


# ------------------------------------------------------------------------------------------ runner

def common_flags(model: str, batch: int, precision: str, data_size: int) -> list[str]:
    return ["--model", model, "--batch-size", str(batch), "--lr", "1e-4", "--warmup", "1", "--precision", precision,
            "--workers", "0", "--report-to", "", "--data_size", str(data_size)]


def build_args(spec: MethodSpec, model: str, batch: int, precision: str, data_size: int, device: torch.device):
    from .params import parse_args, resolve_precision  # noqa: PLC0415
    from contrastive import comm  # noqa: PLC0415
    args = parse_args(common_flags(model, batch, precision, data_size) + list(spec.flags))
    args.rank, args.world_size, args.is_master = comm.rank(), comm.world_size(), comm.rank() == 0
    args.local_rank, args.device = 0, str(device)
    args.precision = resolve_precision(args, device.type)
    if spec.uses_family:
        args.gamma_decay_epochs = 1
    return args


@dataclass
class Runner:
    """One method's model, method, optimizer and step counter."""
    spec: MethodSpec
    args: object
    model: torch.nn.Module
    train_model: torch.nn.Module  # DDP-wrapped when distributed
    method: object
    optimizer: torch.optim.Optimizer
    device: torch.device
    step: int = 0
    npn_ms: list = field(default_factory=list)

    @classmethod
    def build(cls, spec: MethodSpec, base_model, model_name: str, batch: int, precision: str, data_size: int,
              device: torch.device, dist_info=None) -> "Runner":
        from contrastive import build_method  # noqa: PLC0415
        from .optim import build_optimizer  # noqa: PLC0415
        args = build_args(spec, model_name, batch, precision, data_size, device)
        model = copy.deepcopy(base_model)
        method = build_method(args.method, args, model).to(device)
        train_model = model
        if dist_info is not None and dist_info.distributed:
            from .distributed import wrap_ddp  # noqa: PLC0415
            train_model = wrap_ddp(model, dist_info)
        optimizer = build_optimizer(model, method, args)
        model.train()
        method.train()
        return cls(spec, args, model, train_model, method, optimizer, device)

    def step_once(self, batch, clock, comm: CommTimer, flops: dict | None = None) -> dict:
        """One training step as training.loop runs it; returns seconds per phase (+ "total")."""
        from contrastive import Features  # noqa: PLC0415
        from .loop import MAX_LOGIT_SCALE, autocast  # noqa: PLC0415
        images, texts, keys = batch
        times = dict.fromkeys(PHASES, 0.0)
        comm_start, start = comm.total, clock()

        @contextmanager
        def phase(name):
            c0, t0 = comm.total, clock()
            counter = None
            if flops is not None:
                from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415
                counter = FlopCounterMode(display=False)
                counter.__enter__()
            try:
                yield
            finally:
                if counter is not None:
                    counter.__exit__(None, None, None)
                    flops[name] = flops.get(name, 0) + counter.get_total_flops()
                times[name] += clock() - t0 - (comm.total - c0)

        with phase("forward"), autocast(self.args.precision, self.device):
            image_features, text_features, logit_scale = self.train_model(images, texts)
        feats = Features(image=image_features, text=text_features, logit_scale=logit_scale, keys=keys,
                         step=self.step, epoch=0)
        with phase("before"):
            self.method.before_encoder_step(feats)
        with phase("loss"):
            out = self.method(feats)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        with phase("optimizer"):
            _average_method_grads(self.method)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, float("inf"))
            self.optimizer.step()
            self.method.after_encoder_step(feats)
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        end = clock()
        times["comm"] = comm.total - comm_start
        times["total"] = end - start
        npn = self.method.scalars().get("npn_time_ms")
        times["npn_inner"] = float(npn) / 1e3 if npn is not None and math.isfinite(float(npn)) else math.nan
        self.step += 1
        return times


def _average_method_grads(method) -> None:
    """What training.loop does for the method's own parameters (SigLIP's bias) with several processes."""
    from contrastive import comm  # noqa: PLC0415
    grads = [p.grad for g in method.trainable_parameter_groups() for p in g["params"] if p.grad is not None]
    if not grads or comm.world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ------------------------------------------------------------------------------------------- data

def make_model(model_name: str, device: torch.device, precision: str, seed: int = 0):
    import open_clip  # noqa: PLC0415

    import training  # noqa: F401, PLC0415  (registers neuclip-tiny)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, device=device, precision="bf16" if precision == "bf16" else "fp32")
    return model, preprocess, open_clip.get_tokenizer(model_name)


def make_batches(preprocess, tokenizer, batch: int, count: int, device: torch.device, tensors: bool = False,
                 rank: int = 0, world_size: int = 1) -> list[tuple]:
    """`count` batches: the built-in synthetic samples (keys rank-distinct, as a DistributedSampler deals
    them), or, with `tensors`, random pixels of the model's input shape and fixed captions (GPU mode: no
    data loading at all)."""
    from .synthetic import SyntheticCaptions  # noqa: PLC0415
    batches = []
    if tensors:
        shape = SyntheticCaptions(1, transform=preprocess)[0][0].shape
        generator = torch.Generator().manual_seed(rank)
    for b in range(count):
        first = (b * world_size + rank) * batch  # keys disjoint across batches and ranks
        if tensors:
            images = torch.randn((batch, *shape), generator=generator)
            texts = tokenizer([f"a photo of shape number {first + i}" for i in range(batch)])
            keys = torch.arange(first, first + batch)
        else:
            data = SyntheticCaptions(batch, transform=preprocess, tokenizer=tokenizer, offset=first)
            items = [data[i] for i in range(batch)]
            images = torch.stack([x[0] for x in items])
            texts = torch.stack([x[1] for x in items])
            keys = torch.tensor([x[2] for x in items])
        batches.append((images.to(device), texts.to(device), keys.to(device)))
    return batches


def data_size_for(batch: int, count: int, world_size: int = 1) -> int:
    return count * world_size * batch  # every key make_batches hands out


# ------------------------------------------------------------------------------------------ measure

def measure(runners: list[Runner], batches: list, warmup: int, repeats: int, clock, comm: CommTimer,
            progress=None) -> tuple[dict, dict]:
    """Interleaved steps: round r runs every runner once, starting at runner r mod M. Returns
    ({key: [per-step phase dict]} for the measured rounds, {key: peak GPU bytes} on GPU)."""
    results = {r.spec.key: [] for r in runners}
    peaks = {r.spec.key: 0 for r in runners}
    cuda = runners[0].device.type == "cuda"
    for rnd in range(warmup + repeats):
        shift = rnd % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            batch = batches[runner.step % len(batches)]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            gc.disable()
            try:
                times = runner.step_once(batch, clock, comm)
            finally:
                gc.enable()
            if cuda:
                peaks[runner.spec.key] = max(peaks[runner.spec.key], torch.cuda.max_memory_allocated() - base)
            if rnd >= warmup:
                results[runner.spec.key].append(times)
        gc.collect()
        if progress:
            progress(rnd + 1, warmup + repeats)
    return results, peaks


def summarize(results: dict, reference_key: str | None) -> dict:
    """Medians and IQRs per phase; per-round paired ratio of totals to the reference method's."""
    summary = {}
    ref = results.get(reference_key) if reference_key else None
    for key, steps in results.items():
        entry = {}
        for name in (*PHASES, "total", "npn_inner"):
            values = [s[name] for s in steps if not math.isnan(s[name])]
            entry[name] = {"median": median(values), "iqr": iqr(values)} if values else None
        others = [s["total"] - sum(s[p] for p in PHASES) for s in steps]
        entry["other_median"] = median(others)
        if ref:
            ratios = [s["total"] / r["total"] for s, r in zip(steps, ref)]
            entry["ratio"] = {"median": median(ratios), "iqr": iqr(ratios)}
        summary[key] = entry
    return summary


def count_flops(runner: Runner, batch, clock) -> dict:
    """Matmul/conv/attention FLOPs of one step per phase (torch.utils.flop_counter; elementwise ops and
    log-sum-exps are not counted). Runs one extra, untimed step."""
    flops = {}
    try:
        runner.step_once(batch, clock, CommTimer(clock), flops=flops)
    except Exception as exc:  # noqa: BLE001  (an op the counter cannot trace must not stop the benchmark)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return flops


def profile_npn(runner: Runner, batch, calls: int = 3) -> str:
    """torch.profiler table of `calls` before_encoder_step calls on fresh (detached) features of `batch`:
    where the NPN's time goes (ops by self time). Avoids restart steps."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    from contrastive import Features  # noqa: PLC0415
    from .loop import autocast  # noqa: PLC0415
    images, texts, keys = batch
    with torch.no_grad(), autocast(runner.args.precision, runner.device):
        image, text, scale = runner.model(images, texts)
    period = getattr(runner.args, "npn_restart_iter", 0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    step = runner.step + 1
    with profile(activities=activities) as prof:
        for _ in range(calls):
            while period > 0 and step % period == 0:
                step += 1
            feats = Features(image=image.detach(), text=text.detach(), logit_scale=scale.detach(), keys=keys,
                             step=step)
            runner.method.before_encoder_step(feats)
            step += 1
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=40)


# ------------------------------------------------------------------------------------ memory (CPU)

def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: /proc/self/clear_refs 5); returns the
    current RSS in bytes, or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def peak_rss() -> int:
    """Peak RSS of this process image in bytes: VmHWM (which clear_refs resets) where /proc has it, else
    getrusage's ru_maxrss (which survives fork + exec: it then includes the parent's peak)."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else max_rss_bytes()


def memory_probe(config: dict) -> dict:
    """In a fresh process: model and batches first, then the peak mark is reset, the method built and its
    steps run; the increase of peak RSS over the RSS at the reset is the method's training memory."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = torch.device("cpu")
    model, preprocess, tokenizer = make_model(config["model"], device, "fp32")
    batches = make_batches(preprocess, tokenizer, config["batch"], config["batches"], device)
    spec = MethodSpec(**{**config["spec"], "flags": tuple(config["spec"]["flags"])})
    gc.collect()
    current = reset_peak_rss()
    before = current if current is not None else peak_rss()
    runner = Runner.build(spec, model, config["model"], config["batch"], "fp32",
                          data_size_for(config["batch"], config["batches"]), device)
    clock = clock_for(device)
    for i in range(config["steps"]):
        runner.step_once(batches[i % len(batches)], clock, CommTimer(clock))
    after = peak_rss()
    return {"rss_before": before, "rss_after": after, "delta": after - before,
            "how": "VmHWM after clear_refs" if current is not None else "ru_maxrss"}


def run_memory_probes(specs: list[MethodSpec], model: str, batch: int, batches: int, steps: int, threads: int,
                      log) -> dict:
    out = {}
    for spec in specs:
        config = {"model": model, "batch": batch, "batches": batches, "steps": steps, "threads": threads,
                  "spec": {"key": spec.key, "family": spec.family, "label": spec.label, "flags": list(spec.flags)}}
        proc = subprocess.run([python(), "-m", "training.bench_cost", "--memory-probe", json.dumps(config)],
                              capture_output=True, text=True, env=subprocess_env(), timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[spec.key] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
        else:
            out[spec.key] = json.loads(lines[-1])
        log(f"  memory probe {spec.key}: {human_bytes(out[spec.key].get('delta', math.nan))}")
    return out


# ------------------------------------------------------------------------------------- state size

class _StubModel(torch.nn.Module):
    """What a method reads from the model when it is built: the temperature and the embedding width."""

    def __init__(self, dim: int):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_projection = torch.nn.Parameter(torch.zeros(1, dim))
        self.visual = torch.nn.Module()
        self.visual.output_dim = dim


def state_bytes(method) -> int:
    """Tensors of method.state_dict() plus AdamW's two moments for the method's own trainable parameters
    (the main optimizer's state for them; the model's own optimizer state is the same for every method)."""
    total = sum(t.numel() * t.element_size() for t in method.state_dict().values() if torch.is_tensor(t))
    for group in method.trainable_parameter_groups():
        total += 2 * sum(p.numel() * p.element_size() for p in group["params"])
    return total


def state_sizes(specs: list[MethodSpec], dims: list[int], allocated: list[int], computed: list[int]) -> list[dict]:
    """Persistent state per method, embedding width and data size n (the sample-key space): built for real
    for n in `allocated`; for n in `computed`, the state at the smallest allocated n plus the per-sample
    bytes × (n − that n) (`contrastive.estimators.per_sample_state_bytes`), checked against the allocated ones."""
    from contrastive import build_method  # noqa: PLC0415
    from contrastive.estimators import per_sample_state_bytes  # noqa: PLC0415
    rows = []
    for dim in dims:
        for spec in specs:
            measured = {}
            for n in allocated:
                args = build_args(spec, "neuclip-tiny", 64, "fp32", n, torch.device("cpu"))
                method = build_method(args.method, args, _StubModel(dim))
                measured[n] = state_bytes(method)
                del method
            n0 = min(allocated)
            args0 = build_args(spec, "neuclip-tiny", 64, "fp32", n0, torch.device("cpu"))
            per_sample = per_sample_state_bytes(args0) // max(n0, 1) if args0.method == "gcl" else 0
            fixed = measured[n0] - per_sample * n0
            predicted = {n: fixed + per_sample * n for n in allocated}
            sizes = {n: {"bytes": measured[n], "how": "allocated"} for n in allocated}
            sizes |= {n: {"bytes": fixed + per_sample * n, "how": "computed"} for n in computed if n not in sizes}
            rows.append({"key": spec.key, "label": spec.label, "dim": dim, "per_sample_bytes": per_sample,
                         "fixed_bytes": fixed, "sizes": {str(n): v for n, v in sizes.items()},
                         "formula_matches_allocated": all(predicted[n] == measured[n] for n in allocated)})
    return rows


# -------------------------------------------------------------------------------------------- report

def timing_table(summary: dict, specs: list[MethodSpec], reference_key: str | None) -> tuple[list, list]:
    header = ["method", "step ms (median [IQR])", f"× {reference_key or 'ref'} (paired median [IQR])",
              *(PHASE_LABELS[p] for p in PHASES), "of which NPN inner loop", "other", "share of step in before"]
    rows = []
    for spec in specs:
        e = summary[spec.key]
        tot = e["total"]
        ratio = e.get("ratio")
        npn = e["npn_inner"]
        rows.append([
            spec.label,
            f"{tot['median'] * 1e3:.1f} [{tot['iqr'][0] * 1e3:.1f}–{tot['iqr'][1] * 1e3:.1f}]",
            f"{ratio['median']:.3f} [{ratio['iqr'][0]:.3f}–{ratio['iqr'][1]:.3f}]" if ratio else "—",
            *(f"{e[p]['median'] * 1e3:.1f}" for p in PHASES),
            f"{npn['median'] * 1e3:.1f}" if npn else "—",
            f"{e['other_median'] * 1e3:.1f}",
            f"{100 * e['before']['median'] / tot['median']:.1f}%",
        ])
    return header, rows


def flops_table(flops: dict, specs: list[MethodSpec]) -> tuple[list, list]:
    header = ["method", "encoder fwd", "encoder bwd", "before_encoder_step", "loss", "before / (fwd+bwd)"]
    rows = []
    for spec in specs:
        f = flops.get(spec.key, {})
        if "error" in f:
            rows.append([spec.label, f["error"], "", "", "", ""])
            continue
        enc = f.get("forward", 0) + f.get("backward", 0)
        rows.append([spec.label, *(f"{f.get(p, 0) / 1e9:.3g} G" for p in ("forward", "backward", "before", "loss")),
                     f"{f.get('before', 0) / enc:.3g}" if enc else "—"])
    return header, rows


def plot_step_times(summary: dict, specs: list[MethodSpec], path: str, title: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(specs) + 1.6))
    labels = [s.label for s in specs]
    left = [0.0] * len(specs)
    colours = plt.get_cmap("tab10").colors
    for i, p in enumerate(PHASES):
        widths = [summary[s.key][p]["median"] * 1e3 for s in specs]
        ax.barh(labels, widths, left=left, color=colours[i], label=PHASE_LABELS[p])
        left = [a + b for a, b in zip(left, widths)]
    totals = [summary[s.key]["total"] for s in specs]
    ax.errorbar([t["median"] * 1e3 for t in totals], labels,
                xerr=[[(t["median"] - t["iqr"][0]) * 1e3 for t in totals], [(t["iqr"][1] - t["median"]) * 1e3
                                                                            for t in totals]],
                fmt="k|", capsize=3, label="total: median, IQR")
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (medians of each phase)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_state_sizes(rows: list[dict], path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dims = sorted({r["dim"] for r in rows})
    colours = dict(zip(sorted({r["key"] for r in rows}), plt.get_cmap("tab10").colors))
    zero = []
    for row in rows:
        ns = sorted(int(n) for n in row["sizes"])
        ys = [row["sizes"][str(n)]["bytes"] for n in ns]
        if all(y == 0 for y in ys):
            zero.append(f"{row['label']} (d={row['dim']})")
            continue
        style = "-" if row["dim"] == dims[0] else "--"
        ax.plot(ns, ys, style, marker="o", color=colours[row["key"]], label=f"{row['label']}, d={row['dim']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("data size n (sample-key space)")
    ax.set_ylabel("persistent method state (bytes)")
    title = "Method state vs data size"
    if zero:
        title += "\n(no state: " + ", ".join(zero) + ")"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    return save_figure(fig, path)


def state_table(rows: list[dict]) -> tuple[list, list]:
    ns = sorted({int(n) for r in rows for n in r["sizes"]})
    header = ["method", "d", *(f"n=1e{round(math.log10(n))}" if n > 0 and 10 ** round(math.log10(n)) == n else f"n={n}"
                               for n in ns), "per sample", "formula = allocated"]
    body = []
    for r in rows:
        cells = []
        for n in ns:
            s = r["sizes"].get(str(n))
            cells.append("—" if s is None else human_bytes(s["bytes"]) + ("" if s["how"] == "allocated" else "*"))
        body.append([r["label"], r["dim"], *cells, f"{r['per_sample_bytes']} B", "yes" if
                     r["formula_matches_allocated"] else "NO"])
    return header, body


# ------------------------------------------------------------------------------------------- part 1

def cost_specs(families: list[str], train_protos: int) -> list[MethodSpec]:
    """The compared methods, OpenCLIP first (the reference). NeuCLIP runs with the paper's m = 4096 and, when
    it differs, with the m the training parts use."""
    specs = []
    for family in families:
        if family == "neuclip":
            specs.append(method_spec("neuclip", key="neuclip-m4096"))
            if train_protos != 4096:
                specs.append(method_spec("neuclip", protos=train_protos, key=f"neuclip-m{train_protos}"))
        else:
            specs.append(method_spec(family))
    return sorted(specs, key=lambda s: s.family != "openclip")


def run_cost(opts, out_dir: str, log) -> tuple[str, dict]:
    """Part 1. Returns (markdown section, data); rank 0 writes the plots."""
    from contrastive import comm  # noqa: PLC0415
    device = torch.device(opts.device)
    specs = cost_specs(opts.cost_methods, opts.npn_protos)
    world, rank = comm.world_size(), comm.rank()
    precision = "fp32" if device.type == "cpu" else "amp_bf16"
    model, preprocess, tokenizer = make_model(opts.model, device, precision)
    batches = make_batches(preprocess, tokenizer, opts.cost_batch, opts.cost_data_batches, device, rank=rank,
                           world_size=world)
    data_size = data_size_for(opts.cost_batch, opts.cost_data_batches, world)
    runners = [Runner.build(s, model, opts.model, opts.cost_batch, precision, data_size, device, opts.dist_info)
               for s in specs]
    clock = clock_for(device)
    comm_timer = CommTimer(clock).install()
    load_before = _load()
    log(f"[cost] {len(specs)} methods, {opts.cost_warmup} warm-up + {opts.cost_repeats} measured interleaved rounds, "
        f"batch {opts.cost_batch}, model {opts.model}, device {device}")
    started = time.perf_counter()
    try:
        results, peaks = measure(runners, batches, opts.cost_warmup, opts.cost_repeats, clock, comm_timer,
                                 progress=lambda i, n: log(f"  round {i}/{n}") if i % max(n // 5, 1) == 0 else None)
        reference = specs[0].key if specs[0].family == "openclip" else None
        summary = summarize(results, reference)
        flops = {r.spec.key: count_flops(r, batches[0], clock) for r in runners}
        profiles = {r.spec.key: profile_npn(r, batches[0]) for r in runners if r.spec.family == "neuclip"}
    finally:
        comm_timer.uninstall()
    elapsed = time.perf_counter() - started
    load_after = _load()
    n_params = sum(p.numel() for p in model.parameters())
    data = {"specs": [s.__dict__ for s in specs], "summary": summary, "raw": results, "flops": flops,
            "gpu_peak_bytes": peaks if device.type == "cuda" else None, "world_size": world, "batch": opts.cost_batch,
            "model": opts.model, "params": n_params, "data_batches": opts.cost_data_batches, "precision": precision, "device": str(device),
            "warmup": opts.cost_warmup, "repeats": opts.cost_repeats, "seconds": elapsed,
            "load_before": load_before, "load_after": load_after, "comm_wrapped": comm_timer.calls}
    if rank != 0:
        return "", data
    if device.type == "cpu" and world == 1 and opts.cost_memory:
        log("[cost] peak memory: one subprocess per method")
        data["memory"] = run_memory_probes(specs, opts.model, opts.cost_batch, opts.cost_data_batches,
                                           opts.cost_memory_steps, torch.get_num_threads(), log)
    dims = sorted({_embed_dim(model), 512})
    data["state"] = state_sizes(specs, dims, [10 ** 4, 10 ** 5, 10 ** 6], [10 ** 7, 10 ** 8, 10 ** 9])
    for key, text in profiles.items():
        with open(os.path.join(out_dir, f"cost_profile_{key}.txt"), "w") as f:
            f.write(text)
    data["plots"] = [
        plot_step_times(summary, specs, os.path.join(out_dir, "cost_step_time.png"),
                        f"{opts.model}, batch {opts.cost_batch} x {world} process(es), {device}, {precision}"),
        plot_state_sizes(data["state"], os.path.join(out_dir, "cost_state_size.png"))]
    return cost_markdown(data, specs, profiles), data


def _load() -> list[float]:
    from .bench_common import load_average  # noqa: PLC0415
    return load_average()


def _embed_dim(model) -> int:
    from contrastive.gcl import embed_dim  # noqa: PLC0415
    return embed_dim(model)


def cost_markdown(data: dict, specs: list[MethodSpec], profiles: dict) -> str:
    summary, world = data["summary"], data["world_size"]
    lines = ["## 1. Cost per step", ""]
    lines.append(f"Model `{data['model']}` ({data['params'] / 1e6:.2f}M parameters), batch {data['batch']} per process "
                 f"x {world} process(es), {data['precision']} on {data['device']}. Every method has its own copy of "
                 f"the same initial model and its own optimizer (built as training does) and trains on the same "
                 f"{data['data_batches']} fixed batches of the built-in synthetic data, preprocessed "
                 f"once (no data loading inside the timings). {data['warmup']} warm-up rounds, then "
                 f"{data['repeats']} measured rounds; a round is one step of every method, the order rotated by one "
                 f"each round (interleaved: load changes hit every method alike). Medians and interquartile ranges "
                 f"over rounds; the ratio is the median over rounds of (method step / OpenCLIP step in the same "
                 f"round). Load average before/after: {data['load_before']} / {data['load_after']}; "
                 f"{data['seconds']:.0f} s.")
    lines.append("")
    header, rows = timing_table(summary, specs, "OpenCLIP" if specs[0].family == "openclip" else None)
    lines += [markdown_table(header, rows), ""]
    lines.append("Phases (ms, medians): *encoder fwd* the model's forward; *before_encoder_step* the method's "
                 "preparation: NeuCLIP's NPN inner loop (restart + T_u AdaGrad steps), AmorLIP's MLP fitting, and "
                 "for the whole gcl family (FastCLIP, NeuCLIP, AmorLIP) the batch similarity and batch normalizers, "
                 "computed there once and reused by the loss; *of which NPN inner loop* is the method's own "
                 "`npn_time_ms`; *loss* the method's forward; *encoder bwd* zero_grad + backward; *optimizer* "
                 "clipping, AdamW step, after_encoder_step; *other* = total − phases (Python between phases).")
    if world == 1:
        lines.append("*comm* is 0 by construction: one process runs no collectives (`Features` gathers are the "
                     "identity). Under torchrun it is the time inside torch.distributed's all-gathers / all-reduces "
                     "(wrapped and timed, subtracted from the phase they occur in); DDP's gradient all-reduce "
                     "overlaps backward in C++ and stays in *encoder bwd*.")
    else:
        lines.append(f"*comm*: time inside torch.distributed collectives ({data['comm_wrapped']} calls wrapped), "
                     "subtracted from the phase each occurs in; DDP's gradient all-reduce overlaps backward in C++ "
                     "and stays in *encoder bwd*. NeuCLIP's `npn_time_ms` is the method's own stopwatch and includes "
                     "its T_u all-reduces (one per NPN step), which *comm* counts too.")
    lines.append("")
    lines += _verdict(summary, specs)
    header, rows = flops_table(data["flops"], specs)
    lines += ["", "Counted FLOPs of one step (torch.utils.flop_counter: matmuls, convolutions, attention; "
              "element-wise ops and log-sum-exps are not counted), per process:", "", markdown_table(header, rows), ""]
    for key, text in profiles.items():
        label = next(s.label for s in specs if s.key == key)
        lines += [f"Profile of 3 `before_encoder_step` calls of {label} (torch.profiler, top ops by self time; "
                  f"also in `cost_profile_{key}.txt`):", "", "```", text.rstrip(), "```", ""]
    if data.get("memory"):
        rows = [[s.label, human_bytes(data["memory"][s.key].get("delta", math.nan)),
                 human_bytes(data["memory"][s.key].get("rss_after", math.nan))] for s in specs]
        how = {m.get("how") for m in data["memory"].values() if "how" in m}
        lines += ["Peak memory (CPU): each method in its own process (model and batches built first, then the peak "
                  "mark reset; the method built and its steps run): peak RSS increase over the RSS at the reset "
                  f"({', '.join(sorted(how)) or 'failed'}; Linux's `/proc/self/clear_refs` + VmHWM, because "
                  "`getrusage`'s ru_maxrss survives fork + exec and would report the parent's peak):", "",
                  markdown_table(["method", "peak RSS increase", "peak RSS"], rows), ""]
    elif data.get("gpu_peak_bytes"):
        rows = [[s.label, human_bytes(data["gpu_peak_bytes"][s.key])] for s in specs]
        lines += ["Peak GPU memory of a step beyond what was allocated before it (`max_memory_allocated`):", "",
                  markdown_table(["method", "step peak"], rows), ""]
    header, rows = state_table(data["state"])
    lines += ["Persistent method state (bytes of `method.state_dict()` tensors + AdamW moments of the method's own "
              "trainable parameters; the model's optimizer state is the same for every method and left out) as the "
              "data size n grows; * computed (fixed part + per-sample bytes × n), not allocated. FastCLIP's grows "
              "with n, NeuCLIP's with m·d (prototypes, AdaGrad accumulators and the ring of recent embeddings, for "
              "both modalities). d = 512 is ViT-B/32's embedding width.", "", markdown_table(header, rows), "",
              "![step time](cost_step_time.png)", "", "![state size](cost_state_size.png)", ""]
    return "\n".join(lines)


def _verdict(summary: dict, specs: list[MethodSpec]) -> list[str]:
    lines = []
    if specs[0].family != "openclip":
        return ["(OpenCLIP was not measured: no ratios, no target check.)"]
    for spec in specs:
        if spec.family != "neuclip":
            continue
        e = summary[spec.key]
        ratio = e["ratio"]
        ok = ratio["median"] <= TARGET_RATIO
        before, total = e["before"]["median"], e["total"]["median"]
        npn = e["npn_inner"]["median"] if e["npn_inner"] else math.nan
        ref = summary[specs[0].key]["total"]["median"]
        lines.append(f"**Target (NeuCLIP step ≤ {TARGET_RATIO}× OpenCLIP's, same model and batch): {spec.label}: "
                     f"{ratio['median']:.3f}× (IQR {ratio['iqr'][0]:.3f}–{ratio['iqr'][1]:.3f}) — "
                     f"{'met' if ok else 'MISSED'}.** "
                     f"Its step is {total * 1e3:.1f} ms vs OpenCLIP's {ref * 1e3:.1f} ms; before_encoder_step takes "
                     f"{before * 1e3:.1f} ms ({100 * before / total:.1f}% of the step) without collectives; the NPN "
                     f"inner loop's own stopwatch (`npn_time_ms`, collectives included) {npn * 1e3:.1f} ms "
                     f"({100 * npn / total:.1f}%).")
    lines.append("")
    lines.append("Why, in FLOPs: one NPN inner loop costs about T_u × 2 modalities × 3 (forward + backward) × 2·B·m·d "
                 "multiply-adds, independent of the encoders, while the encoders' cost scales with the model; on a "
                 "tiny model the NPN is therefore a large share of the step, on ViT-B/32 a small one (part 4, paper "
                 "Table 5: 6.03%). The FLOP table below shows the ratio measured here.")
    return lines


# ------------------------------------------------------------------------------------------- entry

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="helper of training.bench")
    parser.add_argument("--memory-probe", required=True, help="JSON config (see memory_probe)")
    opts = parser.parse_args()
    sys.stdout.write(json.dumps(memory_probe(json.loads(opts.memory_probe))) + "\n")
