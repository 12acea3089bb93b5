"""Part 1 of `training.bench`: runs the cost measurements of `training.bench.cost` and writes their tables,
plots and markdown section."""
from __future__ import annotations

import math
import os
import time

import torch

from training.bench.common import (MethodSpec, human_bytes, load_average, markdown_table, method_spec, pyplot,
                           save_figure)
from training.bench.cost import (PHASES, TARGET_RATIO, CommTimer, Runner, clock_for, count_flops, data_size_for,
                         make_batches, make_model, measure, profile_npn, summarize)
from training.bench.memory import run_memory_probes, state_sizes

PHASE_LABELS = {"forward": "encoder fwd", "before": "before_encoder_step", "loss": "loss (method fwd)",
                "backward": "encoder bwd", "optimizer": "optimizer", "comm": "comm"}


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
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
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
        colour = colours[row["key"]]
        ax.plot(ns, ys, style, color=colour, label=f"{row['label']}, d={row['dim']}")
        for n, y in zip(ns, ys):
            computed = row["sizes"][str(n)]["how"] != "allocated"
            ax.plot([n], [y], "o", color=colour, markerfacecolor="white" if computed else colour)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("data size n (sample-key space)")
    ax.set_ylabel("persistent method state (bytes)")
    title = "Method state vs data size (filled: allocated, hollow: computed)"
    if zero:
        title += "\nno state at all: " + ", ".join(zero)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    load_before = load_average()
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
    load_after = load_average()
    n_params = sum(p.numel() for p in model.parameters())
    data = {"specs": [s.__dict__ for s in specs], "summary": summary, "raw": results, "flops": flops,
            "gpu_peak_bytes": peaks if device.type == "cuda" else None, "world_size": world, "batch": opts.cost_batch,
            "model": opts.model, "params": n_params, "data_batches": opts.cost_data_batches, "precision": precision,
            "device": str(device),
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
    lines += _verdict(summary, specs, data["flops"])
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


def _verdict(summary: dict, specs: list[MethodSpec], flops: dict) -> list[str]:
    if specs[0].family != "openclip":
        return ["(OpenCLIP was not measured: no ratios, no target check.)"]
    ref = summary[specs[0].key]
    lines = []
    for spec in specs:
        if spec.family != "neuclip":
            continue
        e = summary[spec.key]
        ratio = e["ratio"]
        ok = ratio["median"] <= TARGET_RATIO
        before, total = e["before"]["median"], e["total"]["median"]
        npn = e["npn_inner"]["median"] if e["npn_inner"] else math.nan
        lines.append(f"**Target (NeuCLIP step ≤ {TARGET_RATIO}× OpenCLIP's, same model and batch): {spec.label}: "
                     f"{ratio['median']:.3f}× (IQR {ratio['iqr'][0]:.3f}–{ratio['iqr'][1]:.3f}) — "
                     f"{'met' if ok else 'MISSED'}.** "
                     f"Its step is {total * 1e3:.1f} ms vs OpenCLIP's {ref['total']['median'] * 1e3:.1f} ms; "
                     f"before_encoder_step takes {before * 1e3:.1f} ms ({100 * before / total:.1f}% of the step) "
                     f"without collectives; the NPN inner loop's own stopwatch (`npn_time_ms`, collectives included) "
                     f"{npn * 1e3:.1f} ms ({100 * npn / total:.1f}%). The target leaves "
                     f"{(TARGET_RATIO - 1) * ref['total']['median'] * 1e3:.1f} ms per step for everything NeuCLIP "
                     "adds.")
        lines.append("")
        lines.append("  " + _rates(spec, e, flops.get(spec.key, {}), ref))
        lines.append("")
    lines.append("The NPN's cost is T_u × 2 modalities × (forward + backward) over a B × m similarity, whatever the "
                 "encoders are: it is a fixed cost next to encoders whose cost grows with the model. A tiny CPU model "
                 "makes it look large; on ViT-B/32 it is a small share (part 4; paper Table 5: 6.03% on 8 H100s). "
                 "The FLOP table and the profile below say where the time goes here.")
    return lines


def _rates(spec: MethodSpec, entry: dict, flops: dict, ref: dict) -> str:
    """Why, from this run's own numbers: NPN FLOPs relative to the encoders', and achieved FLOP rates."""
    if not flops or "error" in flops:
        return "(no FLOP count)"
    enc_flops = flops.get("forward", 0) + flops.get("backward", 0)
    enc_time = entry["forward"]["median"] + entry["backward"]["median"]
    npn_flops, npn_time = flops.get("before", 0), entry["before"]["median"]
    if not enc_flops or not enc_time or not npn_time:
        return "(no FLOP count)"
    return (f"Why: the NPN does {npn_flops / enc_flops:.3g}× the encoders' counted FLOPs, at "
            f"{npn_flops / npn_time / 1e9:.3g} GFLOP/s against the encoders' {enc_flops / enc_time / 1e9:.3g} GFLOP/s "
            f"(forward + backward): "
            + ("its work is comparable to the encoders' and it runs as fast or slower, so it costs about as much as a "
               "second encoder pass." if npn_flops / enc_flops > 0.2 else
               "little arithmetic, but spread over many small element-wise ops (normalise, log-sum-exp, AdaGrad) "
               "whose per-op overhead, not FLOPs, sets its time."))
