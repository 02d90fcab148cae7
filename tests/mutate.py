"""Mutation testing: does a wrong line in jaxnorm make some fast test fail?

Each mutation below changes ONE line of the library (flip a coefficient, drop a term, swap a default). The script
copies the repository into a temporary folder once, and for each mutation writes the mutated line there, runs the
fast tier (``-m "not slow"``, stopping at the first failure) in that copy, and restores the line. The tests named
in a mutation's ``hint`` run first, alone; only if none of them fails does the whole fast tier run. A mutation no
fast test kills is a gap in the suite: close it with a test, never by deleting the mutation.

    python tests/mutate.py                  # every mutation, then the kill table (minutes)
    python tests/mutate.py --sample         # the fixed sample CI runs (a minute or two)
    python tests/mutate.py --only NAME ...  # some mutations, by name
    python tests/mutate.py --check          # each mutation still applies to exactly one line; runs no test
    python tests/mutate.py --list           # the mutations, one per line

Exit status 0 when every mutation run was killed. The compilation cache of the test session (``.jax_cache`` at the
repository root, see ``tests/conftest.py``) is shared with the copies, so programs a mutation leaves unchanged are
not compiled again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    find: str  # text occurring exactly once in ``file``, within one line
    replace: str
    hint: tuple[str, ...]  # pytest node ids or files most likely to kill it, run first


def M(name: str, file: str, find: str, replace: str, *hint: str) -> Mutation:  # noqa: N802 - a table constructor
    return Mutation(name, file, find, replace, tuple(hint))


STATS, MOMENTS, COMBINE = "jaxnorm/_statistics.py", "jaxnorm/_moments.py", "jaxnorm/_combine.py"
RULE, RUNNING, CONV = "jaxnorm/_derivative.py", "jaxnorm/_running.py", "jaxnorm/_conventions.py"
VARIANTS, INTEROP, KERNELS = "jaxnorm/_variants.py", "jaxnorm/interop/_pairing.py", "jaxnorm/kernels.py"
CORE, FIX, TRANSFORMS = "tests/test_core.py", "tests/test_pytorch_fixtures.py", "tests/test_transforms.py"
SHARDING, LOW, VAR_TESTS = "tests/test_sharding.py", "tests/test_low_precision.py", "tests/test_variants.py"
DROPIN, KERNEL_TESTS = "tests/test_flax_dropin.py", "tests/test_kernels.py"
COMPARE, COMPARE_TESTS = "jaxnorm/interop/_compare.py", "tests/test_compare.py"
LEAVES, REPORT = "jaxnorm/interop/_leaves.py", "jaxnorm/interop/_report.py"
PROBES, RECORD = "jaxnorm/interop/_probes.py", "jaxnorm/interop/_record.py"
EDGE = "tests/test_pytorch_edge_cases.py"

MUTATIONS = [
    # ---------------------------------------------------------------- statistics numerics
    M("one-pass kept far from zero", STATS, "(jnp.square(m) <= ONE_PASS_MAX_RATIO * var)", "(var >= 0)",
      f"{CORE}::test_statistics_stay_exact_on_both_sides_of_the_one_pass_limit"),
    M("shifted sums lose the shift's repair", STATS, "return shift + t1 / count, t2 - abs2(t1) / count",
      "return shift, t2 - abs2(t1) / count", f"{CORE}::test_large_mean_small_spread_is_stable"),
    M("masked count counts every position", STATS, "count = red(maskb.astype(real_dtype(dtype)))",
      "count = red(jnp.ones_like(maskb, real_dtype(dtype)))",
      f"{CORE}::test_masked_statistics_equal_statistics_of_the_unpadded_batch"),
    M("statistics in the input's dtype", STATS, "return jnp.promote_types(dtype, jnp.float32)",
      "return jnp.dtype(dtype)", f"{LOW}::test_narrow_layers_keep_float32_running_statistics"),
    M("row statistics not centred", STATS, "m2 = jnp.sum(jnp.square(x2 - cpu_barrier(mean)), -1, keepdims=True)",
      "m2 = jnp.sum(jnp.square(x2), -1, keepdims=True)", f"{CORE}::test_row_statistics_are_exact_far_from_zero"),
    M("plain (GPU/TPU) statistics not centred", STATS, "return mean, red(abs2(xf - mean))",
      "return mean, red(abs2(xf))",
      f"{KERNEL_TESTS}::test_plain_statistics_are_exact_far_from_zero_and_branch_free"),
    M("group sums repeated in the wrong order", STATS, "return jnp.repeat(s, c // g, axis=ax)",
      "return jnp.tile(s, [c // g if i == ax else 1 for i in range(s.ndim)])", FIX),
    M("staged sum drops its trailing block", "jaxnorm/_xla_cpu.py",
      "return jnp.sum(jnp.sum(t, rest, keepdims=True), tuple(trailing), keepdims=True)",
      "return jnp.sum(t, rest, keepdims=True) * 1", FIX),
    M("RMS statistic counts masked positions", MOMENTS, "sum_over(maskb.astype(sq.dtype), axes)",
      "sum_over(jnp.ones_like(sq), axes)",
      f"{TRANSFORMS}::test_every_transformation_matches_the_textbook_formula_float64"),
    # ---------------------------------------------------------------- cross-device combination
    M("device combine drops the between-device term", COMBINE,
      "return total[0], mean_all[0], jnp.sum(m2s + counts * abs2(means - mean_all), 0)",
      "return total[0], mean_all[0], jnp.sum(m2s, 0)", SHARDING),
    M("linear-time combine drops the between-device term", COMBINE,
      "return total, mean_all, group_psum(m2 + count * jnp.square(mean - mean_all), axis_name, groups)",
      "return total, mean_all, group_psum(m2, axis_name, groups)", SHARDING),
    M("axis_index_groups ignored by the gather", COMBINE,
      "stacked = stacked * lift(jnp.asarray(_group_membership(axis_index_groups, size), mine.dtype)[index])",
      "stacked = stacked * 1", SHARDING),
    # ---------------------------------------------------------------- the derivative rule
    M("tangent: mean term coefficient", RULE, "terms.append(scaled(invs[\"mean_dot\"] * (-1.0 / n)) * sum_xd)",
      "terms.append(scaled(invs[\"mean_dot\"] * (-2.0 / n)) * sum_xd)", TRANSFORMS),
    M("tangent: variance term coefficient", RULE, "var_coef = scaled(invs[\"var_dot\"] ** 3 * (-1.0 / n)) * sum_xdxc",
      "var_coef = scaled(invs[\"var_dot\"] ** 2 * (-1.0 / n)) * sum_xdxc", TRANSFORMS),
    M("tangent: var_dot coefficient", RULE, "var_dot = sum_xdxc * (2.0 / n)", "var_dot = sum_xdxc * (1.0 / n)",
      f"{CORE}::test_grad_through_the_running_statistics_matches_finite_differences"),
    M("tangent: mean_dot normalizer", RULE, "mean_dot = sum_xd / n if centre else None",
      "mean_dot = sum_xd / (n + 1) if centre else None",
      f"{CORE}::test_grad_through_the_running_statistics_matches_finite_differences"),
    M("tangent: scale term sign (per group)", RULE, "xc_coefs.append(invs[\"scale_dot\"] * scale_dot.astype(dtype))",
      "xc_coefs.append(-invs[\"scale_dot\"] * scale_dot.astype(dtype))", FIX),
    M("tangent: scale term (per element)", RULE,
      "terms.append((xc(\"scale_dot term\") * invs[\"scale_dot\"]) * scale_dot.astype(dtype))",
      "terms.append((xc(\"scale_dot term\") * invs[\"scale_dot\"]) * scale_dot.astype(dtype) * 0.5)", FIX),
    M("tangent: bias tangent doubled", RULE, "terms.append(bias_dot.astype(dtype))",
      "terms.append(2 * bias_dot.astype(dtype))", FIX),
    M("tangent: bf16 parts, only the first kept", RULE, ".astype(x.dtype) for p in parts))",
      ".astype(x.dtype) for p in parts[:1]))", f"{LOW}::test_first_order_transformations_in_low_precision"),
    # ---------------------------------------------------------------- the running-statistics update
    M("running var: biased instead of unbiased", STATS, "return var * (count / jnp.maximum(count - 1, 1))",
      "return var * (count / jnp.maximum(count, 1))", FIX),
    M("momentum=None: off-by-one average", RUNNING, "factor = 1.0 / new_count.astype(var_dtype)",
      "factor = 1.0 / (new_count.astype(var_dtype) + 1)", f"{CORE}::test_momentum_none_is_cumulative_average"),
    M("count steps by two", RUNNING, 'new_count = batch_stats["count"] + 1 if',
      'new_count = batch_stats["count"] + 2 if', FIX),
    M("momentum weights swapped", RUNNING,
      'mean = (1 - factor) * batch_stats["mean"] + factor * batch_mean',
      'mean = factor * batch_stats["mean"] + (1 - factor) * batch_mean', FIX),
    M("non-finite guard keeps the bad batch", RUNNING,
      "new = {k: jnp.where(ok, v, batch_stats[k]) for k, v in new.items()}", "new = {k: v for k, v in new.items()}",
      f"{VAR_TESTS}::test_nonfinite_guard_keeps_statistics_and_reports_the_skip"),
    M("non-finite guard does not count the skip", RUNNING, "jnp.where(ok, 0, 1).astype(",
      "jnp.where(ok, 0, 0).astype(", f"{VAR_TESTS}::test_nonfinite_guard_keeps_statistics_and_reports_the_skip"),
    M("instance norm: running var biased", "jaxnorm/_instance_norm.py",
      "unbiased = unbiased_variance(var, count)", "unbiased = var", FIX),
    M("instance norm counts batches", "jaxnorm/_instance_norm.py", "count_batches=False, valid=valid,",
      "count_batches=True, valid=valid,", FIX),
    M("mask: a channel with no value still updates", RUNNING, 'mean = jnp.where(valid[0], mean, batch_stats["mean"])',
      "mean = mean", "tests/test_masked_running.py"),
    M("mask: a single value updates the variance", RUNNING, "valid = (count > 0, count > 1)",
      "valid = (count > 0, count > 0)", "tests/test_masked_running.py"),
    M("mask: an empty batch is counted", RUNNING,
      'new_count = jnp.where(jnp.any(valid[0]), new_count, batch_stats["count"])', "new_count = new_count",
      "tests/test_masked_running.py"),
    M("instance norm: instances without values averaged in", "jaxnorm/_instance_norm.py",
      "has_mean, has_var = (count > 0).astype(var.dtype), (count > 1).astype(var.dtype)",
      "has_mean, has_var = (count >= 0).astype(var.dtype), (count > 1).astype(var.dtype)",
      "tests/test_masked_running.py"),
    M("complex variance: x^2 instead of |x|^2", STATS, "return jnp.square(d.real) + jnp.square(d.imag)",
      "return jnp.real(jnp.square(d))", "tests/test_complex.py"),
    # ---------------------------------------------------------------- variants
    M("renorm: r not clipped", VARIANTS, "r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))",
      "r = jax.lax.stop_gradient(sigma_b / sigma)", f"{VAR_TESTS}::test_batch_renorm_matches_the_papers_algorithm"),
    M("renorm: d gets a gradient", VARIANTS,
      "d = jax.lax.stop_gradient(jnp.clip((mean - mu) / sigma, -d_max, d_max))",
      "d = jnp.clip((mean - mu) / sigma, -d_max, d_max)",
      f"{VAR_TESTS}::test_batch_renorm_with_r1_d0_is_batch_norm_and_r_d_get_no_gradient"),
    M("frozen: statistics get gradients", VARIANTS,
      "params, batch_stats = jax.lax.stop_gradient((params, batch_stats))",
      "params, batch_stats = (params, batch_stats)",
      f"{VAR_TESTS}::test_frozen_batch_norm_is_torchvisions_formula_without_gradients"),
    M("frozen: shift forgets the mean", VARIANTS, 'shift = b - batch_stats["mean"].astype(dtype) * scale',
      'shift = b - batch_stats["mean"].astype(dtype)',
      f"{VAR_TESTS}::test_frozen_batch_norm_is_torchvisions_formula_without_gradients"),
    M("fold: bias loses beta", VARIANTS, 'new_bias = (b - batch_stats["mean"].astype(dtype)) * s + beta',
      'new_bias = (b - batch_stats["mean"].astype(dtype)) * s',
      f"{VAR_TESTS}::test_fold_equals_layer_then_eval_batch_norm"),
    M("precise BN: biased population variance", "jaxnorm/precise_bn.py",
      "return unbiased_variance(variance(m2, n), n)", "return variance(m2, n)",
      f"{VAR_TESTS}::test_recalibrate_gives_the_exact_population_statistics"),
    # ---------------------------------------------------------------- the wrappers' conventions
    M("flax momentum taken as torch's", CONV, "return Momentum(1.0 - float(flax_momentum),",
      "return Momentum(float(flax_momentum),",
      "tests/test_flax.py::test_flax_configured_batch_norm_matches_flax_linen_over_steps"),
    M("flax momentum with the unbiased update", CONV, "unbiased=False, keeps_count=False)",
      "unbiased=True, keeps_count=False)", f"{DROPIN}::test_linen_matches_flax_linen_keyword_for_keyword"),
    M("count kept with flax momentum", CONV, "unbiased=False, keeps_count=False)", "unbiased=False, keeps_count=True)",
      f"{DROPIN}::test_nnx_matches_flax_nnx_keyword_for_keyword"),
    M("use_running_average inverted", CONV, "    return not value", "    return bool(value)", "tests/test_flax.py"),
    M("PyTorch affine defaults lost", CONV, "on = default if affine is None else bool(affine)",
      "on = True if affine is None else bool(affine)", f"{DROPIN}::test_pytorch_defaults_kept_where_flax_differs"),
    M("dtype keyword: no wider compute", CONV, "return x if wide == x.dtype else x.astype(wide)", "return x",
      f"{DROPIN}::test_dtype_keyword_gives_flaxs_output_dtype_and_numbers"),
    M("linen: unbiased update whatever the momentum", "jaxnorm/linen.py",
      "running_var_unbiased=momentum.unbiased, virtual_batch_size", "running_var_unbiased=True, virtual_batch_size",
      f"{DROPIN}::test_linen_matches_flax_linen_keyword_for_keyword"),
    M("equinox: unbiased update whatever the momentum", "jaxnorm/equinox.py",
      "module.running_var_unbiased = convention.momentum, convention.unbiased",
      "module.running_var_unbiased = convention.momentum, True",
      "tests/test_equinox.py::test_flax_momentum_and_call_time_inference_equal_the_functional_core"),
    # ---------------------------------------------------------------- interop
    M("interop: conv kernel axes swapped", LEAVES, "return (*k, 1, 0), ()  # conv, and Flax's",
      "return (*k, 0, 1), ()  # conv, and Flax's", "tests/test_interop.py"),
    M("interop: dense kernel not transposed", LEAVES, "        return (1, 0), ()", "        return (0, 1), ()",
      "tests/test_interop.py"),
    M("interop: ConvTranspose kernel not flipped", LEAVES, "return (*k, 0, 1), tuple(range(ndim - 2))",
      "return (*k, 0, 1), ()", "tests/test_interop_kinds.py"),
    M("interop: attention heads and head size swapped", LEAVES,
      "w if style == \"equinox\" else np.ascontiguousarray(w.T).reshape(w.shape[1], heads, -1))",
      "w if style == \"equinox\" else np.ascontiguousarray(w.T).reshape(w.shape[1], -1, heads))",
      "tests/test_interop_kinds.py"),
    M("interop: bare parameters read as a norm layer", INTEROP,
      'if not set(shapes) & ({"weight", "bias"} | set(RUNNING) | set(ATTENTION_LEAVES)):', "if False:",
      "tests/test_interop_kinds.py"),
    M("interop: the JAX module's kind ignored", INTEROP, "if not given and LOOKS_LIKE.get(jax_kind) == kind:",
      "if False:", "tests/test_interop_kinds.py"),
    M("interop: pairing by call order", "jaxnorm/interop/_linen.py",
      "for path in [*declared, *(p for p in called if p not in declared)]:", "for path in [*called]:",
      "tests/test_interop.py::test_derive_names_follows_setup_order_not_call_order"),
    M("interop: nested setup modules in call order", "jaxnorm/interop/_linen.py",
      'children(declared[""], "")', "pass", "tests/test_interop_kinds.py"),
    M("interop: NNX modules in nnx.state's alphabetical order", "jaxnorm/interop/_nnx.py",
      "for p in sorted(modules, key=lambda p: _declaration_key(model, p))}", "for p in sorted(modules)}",
      "tests/test_interop.py::test_nnx_pairs_by_assignment_order_and_round_trips_exactly"),
    M("interop: Equinox conv bias kept 1-D", LEAVES,
      'out[leaf] = value.reshape(_conv_bias_shape(value.shape[0], leaves["weight"].ndim))', "out[leaf] = value",
      "tests/test_interop_equinox.py::test_equinox_pairs_by_field_order_and_round_trips_exactly"),
    M("compare: gradients ranked with the outputs", REPORT, '"stats": 1, "grads": 2}[kind]',
      '"stats": 1, "grads": 0}[kind]',
      f"{COMPARE_TESTS}::test_an_injected_fault_is_named_first_chained_and_isolated[nnx-ln_eps]"),
    M("compare: isolated mode feeds the chained input", PROBES,
      "replaced[i] = jnp.asarray(value, dtype=jnp.result_type(args[i]))", "replaced[i] = args[i]",
      f"{COMPARE_TESTS}::test_an_injected_fault_is_named_first_chained_and_isolated[equinox-groups]"),
    M("compare: the torch model keeps the training batch's statistics", RECORD,
      "torch_model.load_state_dict(before)", "pass",
      f"{COMPARE_TESTS}::test_a_correct_port_is_within_tolerance[linen]"),
    M("compare: count not compared", REPORT, "ok=bool(np.array_equal(a, b)), note=note)", "ok=True, note=note)",
      f"{COMPARE_TESTS}::test_an_injected_fault_is_named_first_chained_and_isolated[equinox-missing_count]"),
    # ---------------------------------------------------------------- Pallas kernels (interpret mode)
    M("kernel forward: mean over padded columns", KERNELS, "mean = jnp.sum(x, axis=1) / n_cols",
      "mean = jnp.sum(x, axis=1) / x.shape[1]", f"{KERNEL_TESTS}::test_forward_kernel_matches_float64"),
    M("kernel backward: mean term dropped", KERNELS, "dx = dx - jnp.sum(g, axis=1, keepdims=True) / n_cols", "dx = dx",
      f"{KERNEL_TESTS}::test_backward_kernel_matches_the_xla_backward"),
    M("kernel backward: partials not accumulated over tiles", KERNELS,
      "return sums[0] + jnp.sum(dy * xhat, axis=0, keepdims=True), sums[1]",
      "return jnp.sum(dy * xhat, axis=0, keepdims=True), sums[1]",
      f"{KERNEL_TESTS}::test_backward_kernel_matches_the_xla_backward"),
    M("kernel never used when enabled", RULE, "if kernel is not None and row_kernel_applies(",
      "if False and row_kernel_applies(",
      f"{KERNEL_TESTS}::test_layers_with_the_kernel_match_the_xla_path_under_every_transform"),
    # ---------------------------------------------------------------- checks
    M("eps = 0 accepted", "jaxnorm/_checks.py", "if not eps > 0:", "if not eps >= 0:", "tests/test_errors.py"),
    M("momentum bound: 1 refused", "jaxnorm/_checks.py", "if not 0.0 <= momentum <= 1.0:",
      "if not 0.0 <= momentum < 1.0:", f"{CORE}::test_momentum_at_its_bounds_keeps_or_replaces_the_running_statistics"),
    M("momentum bound: a negative momentum accepted", "jaxnorm/_checks.py", "if not 0.0 <= momentum <= 1.0:",
      "if not -1.0 <= momentum <= 1.0:", "tests/test_errors.py"),
    # ---------------------------------------------------------------- the variants' and wrappers' eps and defaults
    M("renorm: running sigma without eps", VARIANTS, "sigma_b, sigma = jnp.sqrt(var_b + eps), jnp.sqrt(run_var + eps)",
      "sigma_b, sigma = jnp.sqrt(var_b + eps), jnp.sqrt(run_var)", VAR_TESTS),
    M("frozen BN: eps dropped", VARIANTS, 'scale = w * jax.lax.rsqrt(batch_stats["var"].astype(dtype) + eps)',
      'scale = w * jax.lax.rsqrt(batch_stats["var"].astype(dtype))', VAR_TESTS),
    M("weight norm: eps outside the root", "jaxnorm/_weight_norms.py",
      "return v * jax.lax.rsqrt(jnp.sum(v * v, axis=axes, keepdims=True) + eps)",
      "return v * (jax.lax.rsqrt(jnp.sum(v * v, axis=axes, keepdims=True)) + eps)",
      "tests/test_weight_norms.py::test_weight_norm_is_the_normalized_direction_times_scale"),
    M("local response: window shifted", "jaxnorm/_local_response_norm.py",
      "pads = tuple((size // 2, (size - 1) // 2) if i == ax else (0, 0) for i in range(x.ndim))",
      "pads = tuple(((size - 1) // 2, size // 2) if i == ax else (0, 0) for i in range(x.ndim))", FIX),
    M("nnx LayerNorm: Flax's epsilon default", "jaxnorm/nnx.py",
      "normalized_shape: int | tuple[int, ...] | None = None, epsilon: float | None = 1e-5,",
      "normalized_shape: int | tuple[int, ...] | None = None, epsilon: float | None = 1e-6,", DROPIN),
    M("equinox RMSNorm: eps default", "jaxnorm/equinox.py",
      "shape: int | Sequence[int], eps: float = 1e-5, use_weight: bool = True, use_bias: bool = True,",
      "shape: int | Sequence[int], eps: float = 1e-6, use_weight: bool = True, use_bias: bool = True,",
      "tests/test_equinox.py"),
    M("equinox InstanceNorm: affine by default", "jaxnorm/equinox.py",
      "channelwise_affine: bool = False, *, use_bias: bool = True, track_running_stats: bool = False,",
      "channelwise_affine: bool = True, *, use_bias: bool = True, track_running_stats: bool = False,",
      "tests/test_equinox.py::test_stateless_layers_equal_the_functional_core"),
    # ---------------------------------------------------------------- PyTorch's edge cases
    M("empty batch: the rule divides by n = 0", RULE, "n = max(group_count(x.shape, axes, groups), 1.0)",
      "n = group_count(x.shape, axes, groups)",
      f"{TRANSFORMS}::test_zero_size_batch_under_every_transformation[batch_norm/train/2d]"),
    M("empty batch: not counted", RUNNING, 'return {**batch_stats, **({"count": batch_stats["count"] + 1} if counted',
      'return {**batch_stats, **({"count": batch_stats["count"] + 0} if counted', EDGE),
    M("empty batch: a vmap over zero examples not seen", RUNNING,
      "return x.size == 0 or (axis_name is not None and jax.lax.axis_size(axis_name) == 0)", "return x.size == 0",
      EDGE),
    M("unbatched: an example read as a batch passes", "jaxnorm/_instance_norm.py",
      "if batched and as_batch != want and as_example == want:", "if False:", EDGE),
    M("unbatched: the example read as a batch", "jaxnorm/_instance_norm.py", "        x = x[None]",
      "        x = x[:]", EDGE),
    M("fold: scale without eps", VARIANTS, 's = gamma * jax.lax.rsqrt(batch_stats["var"].astype(dtype) + eps)',
      's = gamma * jax.lax.rsqrt(batch_stats["var"].astype(dtype))',
      f"{VAR_TESTS}::test_fold_keeps_eps_where_the_variance_is_of_its_order"),
    M("renorm: the schedule never leaves the warm-up", VARIANTS,
      "progress = (step >= warmup_steps).astype(jnp.float32)", "progress = (step < 0).astype(jnp.float32)",
      f"{VAR_TESTS}::test_batch_renorm_schedule_warm_up_then_linear_relaxation"),
    M("renorm: the relaxation is not linear", VARIANTS,
      "progress = jnp.clip((step - warmup_steps) / relax_steps, 0.0, 1.0)",
      "progress = jnp.clip((step - warmup_steps) / relax_steps, 0.0, 1.0) ** 2",
      f"{VAR_TESTS}::test_batch_renorm_schedule_warm_up_then_linear_relaxation"),
    M("renorm: batch_var_unbiased ignored", VARIANTS,
      "var_b = unbiased_variance(var, count) if batch_var_unbiased else var", "var_b = var",
      "tests/test_batch_renorm_references.py::test_sb3_contrib_torch_batch_renorm"),
    M("renorm layers: no step counter with Flax's momentum", "jaxnorm/linen.py",
      "count = momentum.keeps_count or counts_steps", "count = momentum.keeps_count",
      "tests/test_batch_renorm_references.py::test_sbx_rl_linen_batch_renorm"),
    M("bias=False ignored by the init functions", "jaxnorm/_channels.py",
      'return {"scale": jnp.ones(shape, dtype), **({"bias": jnp.zeros(shape, dtype)} if bias else {})}',
      'return {"scale": jnp.ones(shape, dtype), **({"bias": jnp.zeros(shape, dtype)} if True else {})}', EDGE),
]

# the sample CI runs on every submission: one mutation per area, each killed by its hint in seconds
SAMPLE = ("masked count counts every position", "tangent: mean term coefficient",
          "running var: biased instead of unbiased", "flax momentum taken as torch's")


def _locate(m: Mutation, root: pathlib.Path) -> tuple[str, int]:
    """The file's text and the 1-based line of ``m.find``; raises if it is not there exactly once."""
    text = (root / m.file).read_text()
    hits = [i for i in range(len(text)) if text.startswith(m.find, i)]
    if len(hits) != 1:
        raise LookupError(f"mutation {m.name!r}: {m.find!r} occurs {len(hits)} times in {m.file} (needs exactly 1)")
    if "\n" in m.find or "\n" in m.replace:
        raise ValueError(f"mutation {m.name!r}: a mutation changes one line")
    return text, text.count("\n", 0, hits[0]) + 1


def check(mutations=MUTATIONS, root: pathlib.Path = ROOT) -> list[str]:
    """Problems with the table: names not unique, a `find` not found once, a replacement that changes nothing."""
    problems, names = [], [m.name for m in mutations]
    problems += [f"duplicate mutation name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for m in mutations:
        try:
            _locate(m, root)
        except (LookupError, ValueError) as err:
            problems.append(str(err))
        if m.find == m.replace:
            problems.append(f"mutation {m.name!r} changes nothing")
        for hint in m.hint:
            if not (root / hint.split("::")[0]).exists():
                problems.append(f"mutation {m.name!r}: hint {hint!r} names no test file")
    problems += [f"sample names unknown mutation {s!r}" for s in SAMPLE if s not in names]
    return problems


def _copy(dest: pathlib.Path) -> pathlib.Path:
    skip = shutil.ignore_patterns(".git", ".venv", "dist", "build", "_build", "results", ".jax_cache", "__pycache__",
                                  ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=skip)
    return dest


_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def _pytest(copy: pathlib.Path, args: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "JAXNORM_JAX_CACHE": str(ROOT / ".jax_cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    # tests/test_mutations.py checks the table against the unmutated library: in a mutated copy it fails for every
    # mutation, so it would count as a kill
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow",
           "--ignore=tests/test_mutations.py", *args]
    try:
        done = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return done.returncode, done.stdout + done.stderr


def run(m: Mutation, copy: pathlib.Path, *, full: bool, timeout: float) -> dict:
    text, line = _locate(m, copy)
    path = copy / m.file
    start = time.perf_counter()
    path.write_text(text.replace(m.find, m.replace, 1))
    try:
        stages = [("hint", ["-n", "0", *m.hint])] if m.hint else []
        if full:
            stages.append(("fast tier", ["-n", "auto"]))
        verdict, by, output = "survived", "", ""
        for _stage, args in stages:
            rc, output = _pytest(copy, args, timeout)
            failed = _FAILED.findall(output)
            if failed and rc in (1, 2):  # 2: xdist reports a run stopped by -x as interrupted
                verdict, by = "killed", failed[0]
                break
            if rc != 0:  # a collection error, a timeout: the mutation broke more than one behaviour
                verdict, by = "error", f"pytest exit status {rc}"
                break
    finally:
        path.write_text(text)
    return {"mutation": m.name, "where": f"{m.file}:{line}", "verdict": verdict, "killed_by": by,
            "seconds": round(time.perf_counter() - start, 1),
            "output_tail": "" if verdict == "killed" else output[-3000:]}


def table(rows: list[dict]) -> str:
    heads = ("mutation", "where", "verdict", "killed_by", "seconds")
    width = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in heads}
    line = lambda r: " | ".join(str(r[h]).ljust(width[h]) for h in heads)  # noqa: E731
    return "\n".join([line(dict(zip(heads, heads, strict=True))), "-+-".join("-" * width[h] for h in heads),
                      *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sample", action="store_true", help="run the fixed CI sample only")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations (by name)")
    p.add_argument("--check", action="store_true", help="check that every mutation applies; run no test")
    p.add_argument("--list", action="store_true", help="print the mutations")
    p.add_argument("--hint-only", action="store_true", help="run only each mutation's hinted tests")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    p.add_argument("--json", type=pathlib.Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    problems = check()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:55s} {m.file}:{_locate(m, ROOT)[1]}")
        return 0
    if args.check:
        print(f"{len(MUTATIONS)} mutations, each applies to exactly one line")
        return 0
    chosen = MUTATIONS
    if args.sample or args.only:
        wanted = set(SAMPLE if args.sample else args.only)
        unknown = wanted - {m.name for m in MUTATIONS}
        if unknown:
            print(f"unknown mutations: {sorted(unknown)}", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="jaxnorm-mutate-") as tmp:
        copy = _copy(pathlib.Path(tmp) / "repo")
        for i, m in enumerate(chosen, 1):
            row = run(m, copy, full=not (args.sample or args.hint_only), timeout=args.timeout)
            rows.append(row)
            print(f"[{i}/{len(chosen)}] {row['verdict']:8s} {row['seconds']:7.1f}s  {m.name}  <- {row['killed_by']}",
                  flush=True)
            if row["verdict"] != "killed":
                print(row["output_tail"], flush=True)
    print()
    print(table(rows))
    killed = sum(r["verdict"] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutations killed")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
