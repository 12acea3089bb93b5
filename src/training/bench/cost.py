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

Memory peak on GPU: `torch.cuda.max_memory_allocated` during a step minus what was allocated before it (`measure`).
Memory peak on CPU (one subprocess per method) and persistent state size: training.bench.memory.
The tables, plots and markdown of part 1 are in training.bench.cost_report.
"""
from __future__ import annotations

import copy
import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from training.bench.common import MethodSpec, iqr, median
from training.loop import average_method_grads, encode_batch

PHASES = ("forward", "before", "loss", "backward", "optimizer", "comm")
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
    from training.params import parse_args, resolve_precision  # noqa: PLC0415
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
        from training.optim import build_optimizer  # noqa: PLC0415
        args = build_args(spec, model_name, batch, precision, data_size, device)
        model = copy.deepcopy(base_model)
        method = build_method(args.method, args, model).to(device)
        train_model = model
        if dist_info is not None and dist_info.distributed:
            from training.distributed import wrap_ddp  # noqa: PLC0415
            train_model = wrap_ddp(model, dist_info)
        optimizer = build_optimizer(model, method, args)
        model.train()
        method.train()
        return cls(spec, args, model, train_model, method, optimizer, device)

    def step_once(self, batch, clock, comm: CommTimer, flops: dict | None = None) -> dict:
        """One training step as training.loop runs it; returns seconds per phase (+ "total")."""
        from contrastive import Features  # noqa: PLC0415
        from training.loop import MAX_LOGIT_SCALE, autocast  # noqa: PLC0415
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
            image_features, text_features, logit_scale, logit_bias = encode_batch(self.train_model, images, texts)
        feats = Features(image=image_features, text=text_features, logit_scale=logit_scale, keys=keys,
                         step=self.step, epoch=0, logit_bias=logit_bias)
        with phase("before"):
            self.method.before_encoder_step(feats)
        with phase("loss"):
            out = self.method(feats)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        with phase("optimizer"):
            average_method_grads(self.method)
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
    from training.data.synthetic.samples import SyntheticCaptions  # noqa: PLC0415
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
    from training.loop import autocast  # noqa: PLC0415
    images, texts, keys = batch
    with torch.no_grad(), autocast(runner.args.precision, runner.device):
        image, text, scale, _ = encode_batch(runner.model, images, texts)
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

