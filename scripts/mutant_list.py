"""The curated mutants of scripts/mutants.py: plausible bugs in the maths, the loop, resume and data position.

Each entry: a name, the file, one or more (exact pattern, replacement) edits, the tests that should catch
it (most likely killer first: pytest runs with -x), and why the bug is plausible. --quick runs the
subset named in QUICK (one or two per kind of bug, tests of seconds each: a few minutes on an idle machine). `equivalent` names why a mutant cannot change behaviour; such a
mutant is expected to survive.
"""
from dataclasses import dataclass


@dataclass
class Mutant:
    name: str
    file: str
    edits: list
    tests: list
    why: str
    quick: bool = False
    equivalent: str | None = None


PAPER, GCL, NPN, EST = "tests/test_paper_reference.py", "tests/test_gcl.py", "tests/test_npn.py", "tests/test_estimators.py"
POS = "tests/test_position.py"
_STATE = "tests/test_state_and_ranks.py::"
RING = _STATE + "test_ring_state_round_trips_at_a_nonzero_write_position"
RANKS = _STATE + "test_loop_averages_the_methods_own_gradients_over_ranks"
RNG = _STATE + "test_every_rank_resumes_its_own_rng_streams"
LOGIT_CLAMP = _STATE + "test_loop_clamps_logit_scale_at_its_bounds"
TAU_CLAMP = _STATE + "test_per_sample_tau_gradient_is_clamped_at_plus_and_minus_five"
NDIST, GDIST, ACC = "tests/test_neuclip_distributed.py", "tests/test_gcl_distributed.py", "tests/test_accumulation.py"
RESUME = "tests/test_main.py::test_resume_continues_exactly"
FLAGS = "tests/test_rank_flags.py"
PRE_PY = "src/training/preemption.py"
REFCMD = "tests/test_reference_command.py::test_reference_command_runs_the_temperature_gradient_its_rho_was_tuned_with"

CORE, EST_PY, TEMP = "src/contrastive/core.py", "src/contrastive/moving_average.py", "src/contrastive/temperature.py"
NPN_PY, NEU, GCL_PY = "src/contrastive/npn.py", "src/contrastive/neuclip.py", "src/contrastive/gcl.py"
COMM_PY, ENTRIES_PY = "src/contrastive/comm.py", "src/contrastive/builtin_entries.py"
LOOP, CKPT, POS_PY = "src/training/loop.py", "src/training/checkpoint/manager.py", "src/training/data/position.py"
CKPT_POSITION = "src/training/checkpoint/position.py"
DEVICE_PY, DEVICE = "src/training/data/device_decode.py", "tests/test_device_decode.py::"
FEATS = "src/contrastive/features.py"
LOG_PY, OBS = "src/training/logger.py", "tests/test_step_observers.py::"
ELASTIC, ELASTIC_TEST = "src/training/elastic.py", "tests/test_torchrun_elastic.py::"
EXACT = "src/training/eval/exact_normalizers.py"
REGIME = "tests/test_regime.py::test_anchor_log_normalizers_match_float64_brute_force"


def m(name, file, pattern, replacement, tests, why, **kw):
    return Mutant(name, file, [(pattern, replacement)], tests, why, **kw)


MUTANTS = [
    # ------------------------------------------------------------------------------------- core
    m("core_positive_not_masked", CORE, "mask[has_pos.nonzero().squeeze(1), pos_col[has_pos]] = True",
      "mask[has_pos.nonzero().squeeze(1), pos_col[has_pos]] = False", [GCL], "the positive counted as a negative"),
    m("core_data_term_divides_by_n", CORE, "log_n1 = _log(n - 1)", "log_n1 = _log(n)", [GCL, PAPER],
      "1/N instead of 1/(N−1) in the data term only"),
    m("core_batch_normalizer_txt_uses_img_scale", CORE,
      "(sim.T - pos[:, None]) * _col(scale_txt)", "(sim.T - pos[:, None]) * _col(scale_img)", [PAPER, GCL],
      "text anchors' normalizers at the image anchors' temperatures (per-sample τ)"),
    m("core_tau_differentiated_twice", CORE,
      "neg_scale = scale_all if differentiate_tau_twice else scale_all.detach()", "neg_scale = scale_all",
      [GCL, PAPER], "λ differentiated on the negative side too (the reference's double count) by default"),
    m("core_no_world_scaling", CORE, "return (anchor_part + negative_part) * world / n",
      "return (anchor_part + negative_part) / n", [GDIST], "the rank's loss not scaled by W before DDP's mean"),
    m("core_negative_side_offset", CORE, "_logsumexp_without_positive(neg_logits, -loc.start)",
      "_logsumexp_without_positive(neg_logits, loc.start)", [GDIST],
      "negative-side positive mask at the wrong offset on ranks > 0"),
    m("core_eps_ignored", CORE, "    if eps <= 0:\n        return log_g\n", "    if eps >= 0:\n        return log_g\n",
      [GCL, PAPER], "ε dropped from the batch normalizer"),
    m("core_positive_detached", CORE, "pos = (anchors * positives).sum(-1, keepdim=True)",
      "pos = (anchors * positives.detach()).sum(-1, keepdim=True)", [GCL], "no gradient into the positive pair"),
    # ------------------------------------------------------------------------------- estimators
    m("ma_gamma_swapped", EST_PY, "torch.logaddexp(log_u + math.log1p(-gamma), log_target + math.log(gamma))",
      "torch.logaddexp(log_u + math.log(gamma), log_target + math.log1p(-gamma))", [EST],
      "u ← γu + (1−γ)g instead of (1−γ)u + γg"),
    m("ma_reset_guard_only_nonfinite", EST_PY, "unset = ~torch.isfinite(log_u) | (log_u < LOG_RESET_THRESHOLD)",
      "unset = ~torch.isfinite(log_u)", [EST], "u below 1e-35 averaged instead of reset"),
    m("ma_gamma_not_one_in_epoch_0", EST_PY, "    if epoch <= 0:\n        return 1.0",
      "    if epoch < 0:\n        return 1.0", [EST], "stale (zero) u averaged in epoch 0"),
    m("ma_cosine_off_by_one_epoch", EST_PY, "math.cos(math.pi * epoch / decay_epochs)",
      "math.cos(math.pi * (epoch + 1) / decay_epochs)", [EST], "γ schedule one epoch ahead"),
    m("ma_text_written_from_image", EST_PY, "log_u_img=a_img, log_u_txt=a_txt", "log_u_img=a_img, log_u_txt=a_img",
      [EST], "the text u's overwritten with the image side's"),
    # ------------------------------------------------------------------------------ temperature
    m("tau_grad_clamp_removed", TEMP, "return (value + rho + sensitivity).clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)",
      "return value + rho + sensitivity", [TAU_CLAMP, GCL], "the reference's ±5 clamp dropped"),
    m("tau_grad_clamp_one_sided", TEMP, "return (value + rho + sensitivity).clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)",
      "return (value + rho + sensitivity).clamp(max=TAU_GRAD_CLAMP)", [TAU_CLAMP], "only the upper bound clamped"),
    m("tau_grad_clamp_value", TEMP, "TAU_GRAD_CLAMP = 5.0", "TAU_GRAD_CLAMP = 10.0", [TAU_CLAMP],
      "the clamp at another bound"),
    m("tau_sensitivity_sign", TEMP, "sensitivity = -log_ratio.exp() * weighted_sum",
      "sensitivity = log_ratio.exp() * weighted_sum", [GCL], "sign of ∂g/∂τ flipped"),
    m("tau_sensitivity_over_n", TEMP, "log_ratio = (z_max - a - math.log(n - 1))", "log_ratio = (z_max - a - math.log(n))",
      [GCL], "1/N instead of 1/(N−1) in the τ sensitivity"),
    m("tau_adam_no_bias_correction", TEMP, "m_hat = m / (1.0 - beta1 ** steps)", "m_hat = m", [GCL],
      "Adam without first-moment bias correction"),
    m("tau_not_kept_in_bounds", TEMP, "tau = (tau - lr * m_hat / (v_hat.sqrt() + eps)).clamp(TAU_MIN, TAU_MAX)",
      "tau = tau - lr * m_hat / (v_hat.sqrt() + eps)", [GCL], "per-sample τ leaves [0.01, 1]"),
    m("tau_text_reads_image_column", TEMP, 'self.table.read("tau_txt", keys, feats.all_image))',
      'self.table.read("tau_img", keys, feats.all_image))', [PAPER, GCL], "text anchors get the image τ's"),
    m("tau_text_updated_with_image_grad", TEMP, '(("img", grad_img), ("txt", grad_txt))',
      '(("img", grad_img), ("txt", grad_img))', [GCL], "text τ's stepped with the image gradients"),
    m("tau_global_factor_inverted", TEMP, "            tau = 1.0 / fp32(feats.logit_scale).reshape(())\n",
      "            tau = fp32(feats.logit_scale).reshape(())\n", [GCL, PAPER], "RGCL-g multiplied by λ instead of τ"),
    # -------------------------------------------------------------------------------------- NPN
    m("npn_alpha_without_log_m", NPN_PY, "return log_eps_plus_exp(logits.logsumexp(dim=1) - math.log(self.num_protos), eps)",
      "return log_eps_plus_exp(logits.logsumexp(dim=1), eps)", [NPN, PAPER], "sum instead of mean over prototypes"),
    m("npn_closed_form_radial_sign", NPN_PY, "grad = self.weight * (radial * inv_norms.square()).neg_()[:, None]",
      "grad = self.weight * (radial * inv_norms.square())[:, None]", [NPN, PAPER],
      "sign of the normalisation's projection term in ∂J/∂W"),
    m("npn_closed_form_lse_without_log_m", NPN_PY,
      "lse = (row_max + row_sum.log()).squeeze(1) - math.log(self.num_protos)",
      "lse = (row_max + row_sum.log()).squeeze(1)", [NPN, PAPER], "the inner loop's α without the 1/m"),
    m("npn_unified_grad_not_over_n", NPN_PY, "return (tau * (excess + alpha)).mean(), tau * (1 - excess) / n",
      "return (tau * (excess + alpha)).mean(), tau * (1 - excess)", [NPN, PAPER], "∂J/∂α of a mean without 1/n"),
    m("npn_unified_objective_without_tau", NPN_PY, "    return (tau * terms).mean()\n", "    return terms.mean()\n",
      [NPN], "eq. 12's NPN term without τ (matters for per-sample τ)"),
    m("adagrad_without_sqrt", NPN_PY, "p.addcdiv_(g, sum_sq.sqrt().add_(self.eps), value=-self.lr)",
      "p.addcdiv_(g, sum_sq.clone().add_(self.eps), value=-self.lr)", [NPN, PAPER], "G instead of √G"),
    m("adagrad_forgets", NPN_PY, "sum_sq.addcmul_(g, g)", "sum_sq.copy_(g * g)", [NPN, PAPER],
      "accumulator replaced, not summed (RMSprop-like sign steps)"),
    m("npn_grads_not_averaged_over_ranks", COMM_PY, "    if not is_distributed():\n        return tensors\n",
      "    if True:\n        return tensors\n", [NDIST], "every rank steps its NPN with its own gradient"),
    # ---------------------------------------------------------------------------------- NeuCLIP
    m("restart_subset_wrong_modality", NEU, "return texts[pick], images[pick]", "return images[pick], texts[pick]",
      [PAPER], "m ≤ N restart: each NPN seeded with its own modality's embeddings"),
    m("restart_image_npn_gets_images", NEU, "self.npn_img.reset_(txt_rows, norm)", "self.npn_img.reset_(img_rows, norm)",
      [PAPER], "image-side prototypes := image embeddings"),
    Mutant("restart_after_inner_loop", NEU, [
        ("        restarted = self._maybe_restart(feats, stats)\n        self._remember(feats)\n",
         "        restarted = False\n        self._remember(feats)\n"),
        ("        first, last = self._inner_loop(feats, stats)\n",
         "        first, last = self._inner_loop(feats, stats) if self._initialized else (0.0, 0.0)\n"
         "        restarted = self._maybe_restart(feats, stats)\n")],
      [PAPER], "periodic restart after the T_u steps (the encoder sees the fresh, untrained prototypes)"),
    m("encoder_uses_alpha_before_inner_loop", GCL_PY,
      "        return self.estimator.prepare(feats, self._batch(feats).stats)\n",
      "        self._estimate(feats, self._batch(feats).stats)\n"
      "        return self.estimator.prepare(feats, self._batch(feats).stats)\n",
      [PAPER], "the encoder step's α taken before the NPN's inner loop"),
    m("text_npn_uses_image_temperatures", NEU, "side(txt, stats.scale_txt, stats.log_norm_txt)",
      "side(txt, stats.scale_img, stats.log_norm_txt)", [PAPER], "text NPN at the image anchors' τ"),
    m("restart_schedule_off_by_one", NEU, "step % self.restart_every == 0)", "step % self.restart_every == 1)",
      [PAPER, NPN], "restarts at t ≡ 1 mod T_r"),
    m("adagrad_never_reset_at_restart", NEU,
      'if self.optimizer is not None and (self.adagrad_reset == "restart" or not self._initialized):',
      "if self.optimizer is not None and not self._initialized:", [PAPER, NPN], "AdaGrad state kept across restarts"),
    m("restart_norm_without_sqrt_d", NEU, "norm = self.init_scale * math.sqrt(self.dim)", "norm = self.init_scale",
      [PAPER, NPN], "prototype norm init_scale instead of init_scale·√d (changes what --npn_lr means)"),
    m("inner_loop_one_step_short", NEU, "for _ in range(self.repetition):", "for _ in range(self.repetition - 1):",
      [PAPER], "T_u − 1 NPN steps"),
    m("ring_oldest_rows", NEU, "return (self._ring_next - 1 - torch.arange(take, device=self.ring_img.device)) % capacity",
      "return (self._ring_next + torch.arange(take, device=self.ring_img.device)) % capacity", [PAPER, NPN],
      "m > N restart fills with the oldest ring rows"),
    m("ring_write_position_not_saved", NEU,
      "return torch.tensor([self._initialized, self._last_restart, self._ring_next, self._ring_count])",
      "return torch.tensor([self._initialized, self._last_restart, 0, self._ring_count])", [RING, NPN],
      "checkpoint restores the ring at write position 0"),
    m("ring_count_not_accumulated", NEU, "self._ring_count = min(capacity, self._ring_count + n)",
      "self._ring_count = min(capacity, n)", [PAPER, NPN], "the ring remembers one batch only"),
    m("restart_in_arrival_order", NEU, "order = torch.argsort(feats.all_keys, stable=True)",
      "order = torch.arange(feats.all_keys.shape[0])", [NPN], "restart rows depend on how samples were dealt to ranks"),
    m("resample_without_noise", NEU, "RESAMPLE_NOISE = 0.05", "RESAMPLE_NOISE = 0.0", [NPN],
      "m > N resampled prototypes exact duplicates (never separate)"),
    m("inner_loop_on_all_rows", NEU,
      "        img, txt = self._sides(feats, stats, rows=feats.local)\n        params, values",
      "        img, txt = self._sides(feats, stats)\n        params, values", [NDIST],
      "each rank differentiates every gathered anchor",
      equivalent="every rank then computes the global batch's gradient itself; the all-reduce mean of W "
                 "identical gradients is that gradient: only the work is W times larger (and only in "
                 "floating-point rounding could it differ)"),
    # -------------------------------------------------------------------------------------- gcl
    m("unified_objective_without_minus_one", GCL_PY, "return torch.exp(log_norm - a) + a - 1.0",
      "return torch.exp(log_norm - a) + a", [PAPER], "eq. 12 without −1: τ's gradient shifted by 2"),
    m("tau_grad_flag_inverted", GCL_PY, 'args.tau_grad == "reference"', 'args.tau_grad != "reference"', [GCL, PAPER],
      "--tau_grad exact runs the reference's double count"),
    m("tau_grad_default_exact", ENTRIES_PY, 'dest="tau_grad", default="reference"',
      'dest="tau_grad", default="exact"', [REFCMD],
      "the reference command (no --tau_grad) no longer runs the gradient its ρ were tuned with"),
    m("nonfinite_estimates_kept", GCL_PY, "return torch.where(torch.isfinite(a), a, batch_value)", "return a", [GCL],
      "one NaN estimate poisons the step"),
    m("data_term_factor_not_detached", GCL_PY, "a_img - factor_img.detach().log()", "a_img - factor_img.log()", [GCL],
      "τ's gradient through the shift of a", equivalent="core.data_term detaches a on entry, so the shift "
                                                       "carries no gradient either way"),
    # ------------------------------------------------------------------------- loop, accumulation
    m("logit_scale_clamp_removed", LOOP, "raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)",
      "raw_model.logit_scale.clamp_(0, float('inf'))", [LOGIT_CLAMP], "τ may fall below 0.01"),
    m("logit_scale_lower_clamp_removed", LOOP, "raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)",
      "raw_model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)", [LOGIT_CLAMP], "τ may exceed 1"),
    m("method_grads_not_averaged", LOOP, "    comm.average_over_ranks_(grads)\n", "    grads = list(grads)\n", [RANKS, NDIST],
      "SigLIP's bias and the simultaneous NPN not averaged over ranks"),
    m("method_grads_skipped", LOOP, "    average_method_grads(method)\n", "    pass\n", [RANKS],
      "average_method_grads never runs"),
    m("accumulation_every_pass_carries_step", LOOP, "carries_step_gradient=last, logit_bias=logit_bias))",
      "carries_step_gradient=True, logit_bias=logit_bias))",
      [ACC], "τ / NPN / bias gradient counted k times with --accum-freq k"),
    m("accumulation_logit_scale_not_detached", FEATS,
      "logit_scale=logit_scale if carries_step_gradient else logit_scale.detach(),",
      "logit_scale=logit_scale,", [ACC], "τ differentiated in every micro-batch pass"),
    m("nonfinite_host_stop_waits_for_logging", LOOP, "    if count_now:\n        _check_nonfinite_limit(state, args)\n",
      "    if count_now:\n        state.settle()\n", [OBS + "test_both_optimizer_paths_skip_count_warn_and_stop_alike"],
      "an optimizer without device-side skipping (LAMB) stops only at the next logging step, after more NaN steps"),
    m("training_log_meters_not_reset", LOG_PY, "            self.batch_time, self.data_time = Meter(), Meter()\n",
      "            pass\n", [OBS + "test_training_log_averages_the_timings_since_the_previous_logging_step"],
      "the logged step time and samples/s averaged over the epoch so far instead of since the last line"),
    # ------------------------------------------------------------------------- preemption flags
    m("preemption_due_sent_again", PRE_PY, "int(due and not self._due_in_flight)", "int(due)", [FLAGS],
      "a timed checkpoint written twice, on consecutive steps, under torchrun"),
    m("preemption_epoch_end_left_pending", PRE_PY, "        if now:\n            read.append",
      "        if False:\n            read.append", [FLAGS],
      "a signal during the epoch-end evaluation stops the run only inside the next epoch"),
    m("preemption_local_flags", PRE_PY, "code, due = self.flags.exchange([code, due], now=now)",
      "self.flags.exchange([code, due], now=now)", [FLAGS], "ranks act on their own signal: they stop apart"),
    # ------------------------------------------------------------------------- checkpoint, position
    m("rng_every_rank_gets_rank0", CKPT, "set_rng_state(rng[rank])", "set_rng_state(rng[0])", [RNG],
      "on resume every rank continues rank 0's random streams"),
    m("rng_not_restored", CKPT, "if rng and len(rng) == self.args.world_size:", "if rng and len(rng) == -1:", [RNG],
      "RNG states saved but never restored"),
    m("method_state_not_restored", CKPT, '                self.method.load_state_dict(ckpt["method"])\n',
      "                pass\n", [RESUME], "resume forgets u's / NPN / temperatures"),
    m("position_epoch_end_not_rolled_over", CKPT_POSITION, "    if batch >= steps_per_epoch:\n",
      "    if batch > steps_per_epoch:\n", [POS], "a checkpoint at an epoch's last batch resumes into an empty pass"),
    m("position_not_converted_for_new_global_batch", CKPT_POSITION, "        batch = samples // new_global\n",
      "        batch = batch\n", [POS], "another global batch resumes at the old batch index"),
    m("sampler_start_ignored", POS_PY, "return islice(super().__iter__(), self.start, None)",
      "return islice(super().__iter__(), 0, None)", [POS], "a resumed map-style pass restarts the epoch"),
    m("augmentation_seed_ignores_epoch", POS_PY, 'seed = sample_seed("augment", self.seed, self.shared_epoch.get(), sample)',
      'seed = sample_seed("augment", self.seed, sample)', [POS], "every epoch augments a sample identically"),
    m("augmentation_leaks_python_rng", POS_PY, "                random.setstate(python_state)\n",
      "                pass\n", [POS], "the training process's Python RNG reseeded by every sample"),
    m("elastic_generation_reused", ELASTIC, "    generation = uuid.uuid4().hex\n", '    generation = "fixed"\n',
      [ELASTIC_TEST + "test_every_start_agrees_on_a_token_no_earlier_start_had"],
      "every torchrun restart forms its process group under the same keys as the dead start's"),
    m("elastic_answer_not_rewritten", ELASTIC, "                if answered.get(r) != token:",
      "                if r not in answered:",
      [ELASTIC_TEST + "test_a_rank_starting_after_rank_0_read_its_stale_token_still_joins"],
      "rank 0 answers a stale token once and never the rank's fresh one: the restart waits forever"),
    m("slurm_requeue_refused_as_a_second_run", "src/training/startup/run_name.py",
      " and not (restarted or under_slurm):", " and not restarted:",
      ["tests/test_slurm.py::test_usr1_before_the_time_limit_requeues_and_the_job_resumes_to_uninterrupted_losses"],
      "a requeued slurm job (same id, no --name) refuses its own run folder"),
    # ------------------------------------------------------------------ device decoding (--input-pipeline device)
    m("device_crop_box_transposed", DEVICE_PY, "out = image[:, top:top + height, left:left + width]",
      "out = image[:, left:left + width, top:top + height]",
      [DEVICE + "test_pixels_match_open_clip_on_the_same_crop_box"],
      "the box's rows and columns swapped on the device: a crop of the wrong place, still the right size"),
    m("device_one_resize_pass", DEVICE_PY, "for size in ((height, self.size[1]), self.size):", "for size in (self.size,):",
      [DEVICE + "test_pixels_match_open_clip_on_the_same_crop_box"],
      "one float resize pass: bicubic overshoot not clamped between passes, grey levels off the reference's"),
    m("device_truncated_jpeg_shipped", DEVICE_PY,
      "return data[:2] == b\"\\xff\\xd8\" and data.rstrip(JPEG_PADDING).endswith(b\"\\xff\\xd9\")",
      "return data[:2] == b\"\\xff\\xd8\"",
      [DEVICE + "test_damaged_jpegs_are_skipped_and_counted_in_the_worker"],
      "a truncated JPEG shipped to the device instead of being skipped and counted in the worker"),
    # ------------------------------------------------------------------ exact normalizer of a subset of anchors
    m("subset_positive_not_masked", EXACT, "logits[own, anchors[own] - c0] = -math.inf",
      "logits[own, anchors[own] - c0] = logits[own, anchors[own] - c0]", [REGIME],
      "the anchor's own pair counted among its negatives"),
    m("subset_divides_by_n", EXACT, "running - math.log(n - 1)", "running - math.log(n)", [REGIME],
      "1/n instead of 1/(n−1) in the exact subset normalizer"),
    m("subset_text_side_against_texts", EXACT,
      "_anchor_log_normalizers(text, image, anchors,", "_anchor_log_normalizers(text, text, anchors,", [REGIME],
      "text anchors scored against the texts instead of the images"),
]


#: The --quick subset: one or two mutants per kind of bug, each with fast tests.
QUICK = {"core_positive_not_masked", "core_tau_differentiated_twice", "ma_gamma_swapped", "tau_grad_clamp_removed",
         "tau_text_reads_image_column", "npn_closed_form_radial_sign", "npn_unified_grad_not_over_n",
         "adagrad_without_sqrt", "restart_subset_wrong_modality", "restart_image_npn_gets_images",
         "restart_after_inner_loop", "encoder_uses_alpha_before_inner_loop", "text_npn_uses_image_temperatures",
         "restart_schedule_off_by_one", "ring_write_position_not_saved", "unified_objective_without_minus_one",
         "logit_scale_clamp_removed", "position_epoch_end_not_rolled_over", "sampler_start_ignored",
         "augmentation_leaks_python_rng", "tau_grad_default_exact"}
for _mutant in MUTANTS:
    _mutant.quick = _mutant.name in QUICK
assert QUICK <= {m.name for m in MUTANTS}, sorted(QUICK - {m.name for m in MUTANTS})
