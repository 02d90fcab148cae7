"""PyTorch's edge cases, without torch: zero-size batches, unbatched instance-norm inputs, ``bias=False``.

The numbers are checked against torch itself in ``tests/test_torch_module_db.py`` (PyTorch's own samples) and the
transformations in ``tests/test_transforms.py``; here, the rules in closed form: an empty batch keeps the running
statistics exactly and is counted as torch counts it (unlike a masked batch with no valid value, which is not
counted), everywhere a batch can be empty; ``batched=False`` is the batch ``x[None]`` of one, and the reading the
state contradicts is refused with the fix; the init functions and the wrappers make a scale without a bias.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jn

C = 3
OLD = {"mean": jnp.asarray([0.5, -0.5, 0.25]), "var": jnp.asarray([2.0, 3.0, 0.5]), "count": jnp.asarray(3, jnp.int32)}
PARAMS = {"scale": jnp.asarray([1.5, 0.5, 1.0]), "bias": jnp.asarray([0.1, -0.2, 0.3])}


def _x(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * 2 + 1)


# ------------------------------------------------------------------ zero-size batches


EMPTY_CALLS = {
    "batch_norm (0, C)": (lambda s: jaxnorm.batch_norm(PARAMS, s, _x(0, C), training=True), 1),
    "batch_norm (N, C, 0)": (lambda s: jaxnorm.batch_norm(PARAMS, s, _x(2, C, 0), training=True), 1),
    "batch_norm cumulative": (lambda s: jaxnorm.batch_norm(PARAMS, s, _x(0, C, 4), training=True, momentum=None), 1),
    "batch_norm channels-last with a mask": (
        lambda s: jaxnorm.batch_norm(PARAMS, s, _x(0, 4, C), training=True, axis=-1, mask=jnp.ones((4, C), bool)), 1),
    "batch_norm ghost batches": (
        lambda s: jaxnorm.batch_norm(PARAMS, s, _x(0, C, 4), training=True, virtual_batch_size=2), 1),
    "batch_norm across a vmap of zero examples": (
        lambda s: jax.vmap(lambda xi: jaxnorm.batch_norm(PARAMS, s, xi[None], training=True, axis_name="i"),
                           axis_name="i", out_axes=(0, None))(_x(0, C, 4)), 1),
    "batch_renorm": (lambda s: jaxnorm.batch_renorm(PARAMS, s, _x(0, C, 4), training=True), 1),
    "instance_norm (0, C, L)": (lambda s: jaxnorm.instance_norm(PARAMS, s, _x(0, C, 4), training=True), 0),
    "instance_norm (N, C, 0)": (lambda s: jaxnorm.instance_norm(PARAMS, s, _x(2, C, 0), training=True), 0),
}


@pytest.mark.parametrize("name", list(EMPTY_CALLS))
def test_an_empty_batch_keeps_the_statistics_and_is_counted_as_pytorch_counts_it(name):
    """torch 2.13: BatchNorm leaves mean and var as they were and increments num_batches_tracked; InstanceNorm never
    counts (and raises an IndexError on a zero-size batch, which jaxnorm normalizes)."""
    call, added = EMPTY_CALLS[name]
    y, new = jax.jit(call)(OLD)
    assert y.size == 0
    chex.assert_trees_all_equal(new, {**OLD, "count": OLD["count"] + added})
    # a state without a counter (flax.linen.BatchNorm's) stays without one
    if "cumulative" not in name:
        _, flax_state = jax.jit(call)({k: OLD[k] for k in ("mean", "var")})
        chex.assert_trees_all_equal(flax_state, {k: OLD[k] for k in ("mean", "var")})


def test_a_masked_batch_with_no_valid_value_is_not_counted_where_a_zero_size_one_is():
    """The two rules side by side (docs/numerics.md says why they differ)."""
    x = _x(4, C)
    _, masked = jaxnorm.batch_norm(PARAMS, OLD, x, training=True, mask=jnp.zeros((4, 1), bool))
    _, empty = jaxnorm.batch_norm(PARAMS, OLD, x[:0], training=True, mask=jnp.zeros((0, 1), bool))
    assert int(masked["count"]) == 3 and int(empty["count"]) == 4


def test_the_cumulative_average_counts_the_empty_batch_as_torch_does():
    """momentum=None after an empty batch: the next batch has weight 1 / (count + 2), as in torch (whose counter
    saw the empty batch too)."""
    x = _x(6, C, seed=1)
    _, s = jaxnorm.batch_norm(PARAMS, OLD, x[:0], training=True, momentum=None)
    _, s = jaxnorm.batch_norm(PARAMS, s, x, training=True, momentum=None)
    xs = np.asarray(x)
    f = 1 / 5
    np.testing.assert_allclose(s["mean"], (1 - f) * np.asarray(OLD["mean"]) + f * xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["var"], (1 - f) * np.asarray(OLD["var"]) + f * xs.var(0, ddof=1), rtol=1e-12)
    assert int(s["count"]) == 5


def test_one_value_per_channel_is_still_refused_and_zero_is_not():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jaxnorm.batch_norm(PARAMS, OLD, _x(1, C), training=True)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        jaxnorm.instance_norm({}, {}, _x(2, C, 1), training=True)
    assert jaxnorm.instance_norm({}, {}, _x(2, C, 0), training=True)[0].shape == (2, C, 0)


@pytest.mark.parametrize("shape", [(0, 4, C), (2, 0, C)])
def test_the_stateless_layers_take_an_empty_batch(shape):
    x = _x(*shape)
    layers = {
        "layer_norm": lambda x: jaxnorm.layer_norm(PARAMS, x, normalized_shape=C),
        "rms_norm": lambda x: jaxnorm.rms_norm({"scale": PARAMS["scale"]}, x, normalized_shape=C),
        "group_norm": lambda x: jaxnorm.group_norm(PARAMS, x, num_groups=C, axis=-1),
        "local_response_norm": lambda x: jaxnorm.local_response_norm(x, size=2, axis=-1),
        "frozen_batch_norm": lambda x: jaxnorm.frozen_batch_norm(PARAMS, OLD, x, axis=-1),
    }
    for name, f in layers.items():
        y, dx = jax.jit(lambda x, f=f: (f(x), jax.grad(lambda x: jnp.sum(f(x)))(x)))(x)
        assert y.shape == shape and dx.shape == shape, name


def test_the_wrappers_count_an_empty_batch():
    x = _x(0, 4, C)
    module = jl.BatchNorm(use_running_average=False)
    variables = {"params": PARAMS, "batch_stats": OLD}
    y, upd = module.apply(variables, x, mutable=["batch_stats"])
    assert y.shape == x.shape
    chex.assert_trees_all_equal(upd["batch_stats"], {**OLD, "count": OLD["count"] + 1})
    bn = jn.BatchNorm(C)
    bn.mean.set_value(OLD["mean"]), bn.var.set_value(OLD["var"])
    assert bn(x).shape == x.shape
    chex.assert_trees_all_equal({k: getattr(bn, k)[...] for k in ("mean", "var", "count")},
                                {**OLD, "count": jnp.asarray(1, jnp.int32)})


def test_every_equinox_layer_takes_a_vmap_over_zero_examples():
    """An empty output, zero gradients for every parameter, the state kept; BatchNorm and BatchRenorm count the
    batch (the vmap's axis has size 0), InstanceNorm does not."""
    eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra")
    from jaxnorm import equinox as je

    x = _x(0, C, 4)
    batch = dict(axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    stateful = {"BatchNorm": (je.BatchNorm, 1), "BatchRenorm": (je.BatchRenorm, 1),
                "InstanceNorm": (lambda c, name: je.InstanceNorm(c, name, track_running_stats=True), 0)}
    for name, (cls, added) in stateful.items():
        layer, state = eqx.nn.make_with_state(cls)(C, "batch")
        y, new = jax.vmap(layer, **batch)(x, state)
        assert y.shape == x.shape, name
        old = state.get(layer.state_index)
        chex.assert_trees_all_equal(new.get(layer.state_index), {**old, "count": old["count"] + added})
    stateless = {"LayerNorm": je.LayerNorm((C, 4)), "RMSNorm": je.RMSNorm(4), "GroupNorm": je.GroupNorm(1, C),
                 "InstanceNorm": je.InstanceNorm(C, channelwise_affine=True)}
    for name, layer in stateless.items():
        assert jax.vmap(layer)(x).shape == x.shape, name
        grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x)))(layer)
        chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))


# ------------------------------------------------------------------ unbatched instance norm


@pytest.mark.parametrize("shape", [(C, 5), (C, 4, 5), (C, 2, 3, 4)], ids=["(C,L)", "(C,H,W)", "(C,D,H,W)"])
@pytest.mark.parametrize("training", [True, False])
def test_an_unbatched_input_is_the_batch_of_one(shape, training):
    x = _x(*shape)
    stats = OLD
    kw = dict(training=training, momentum=0.3, eps=1e-3)
    y, new = jax.jit(lambda x: jaxnorm.instance_norm(PARAMS, stats, x, batched=False, **kw))(x)
    y1, new1 = jaxnorm.instance_norm(PARAMS, stats, x[None], **kw)
    assert y.shape == x.shape
    chex.assert_trees_all_close((y, new), (y1[0], new1), rtol=1e-12)
    # channels last: axis=-1 as in the batched layout
    last = jnp.moveaxis(x, 0, -1)
    y_last, _ = jaxnorm.instance_norm(PARAMS, stats, last, batched=False, axis=-1, **kw)
    chex.assert_trees_all_close(y_last, jnp.moveaxis(y, 0, -1), rtol=1e-12)


def test_an_unbatched_mask_lines_up_with_the_example():
    x = _x(C, 6)
    mask = jnp.asarray([True, True, False, True, False, True])
    y, _ = jaxnorm.instance_norm({}, {}, x, training=True, batched=False, mask=mask)
    want, _ = jaxnorm.instance_norm({}, {}, x[None], training=True, mask=mask)
    chex.assert_trees_all_close(y, want[0], rtol=1e-12)


def test_an_unbatched_input_read_as_a_batch_is_refused_where_the_state_says_so():
    x = _x(C, 4, 5)  # one example (C, H, W); read as a batch it would have 4 channels
    with pytest.raises(ValueError, match=r"batched=False.*PyTorch's InstanceNorm"):
        jaxnorm.instance_norm(PARAMS, {}, x, training=True)
    with pytest.raises(ValueError, match=r"batched=False"):
        jaxnorm.instance_norm({}, OLD, x, training=True)
    with pytest.raises(ValueError, match=r"rank >= 3.*pass batched=False"):
        jaxnorm.instance_norm({}, {}, _x(C, 5), training=True)
    batch = _x(4, C, 5)  # a batch given as one example: it would have 4 channels
    with pytest.raises(ValueError, match=r"Drop batched=False"):
        jaxnorm.instance_norm(PARAMS, OLD, batch, training=True, batched=False)
    with pytest.raises(ValueError, match=r"rank >= 2, \(C, spatial...\) with batched=False"):
        jaxnorm.instance_norm({}, {}, _x(C), training=True, batched=False)
    with pytest.raises(TypeError, match="`batched` must be a Python bool"):
        jaxnorm.instance_norm({}, {}, x, training=True, batched=jnp.asarray(False))


def test_the_flax_wrappers_take_an_unbatched_input():
    x = _x(4, 5, C)  # channels last: (H, W, C)
    module = jl.InstanceNorm(affine=True, track_running_stats=True, use_running_average=False)
    variables = module.init(jax.random.key(0), x, batched=False)
    chex.assert_trees_all_equal_shapes(variables, module.init(jax.random.key(0), x[None]))
    y, upd = module.apply(variables, x, batched=False, mutable=["batch_stats"])
    y1, upd1 = module.apply(variables, x[None], mutable=["batch_stats"])
    chex.assert_trees_all_close((y, upd), (y1[0], upd1), rtol=1e-12)
    layer = jn.InstanceNorm(C, affine=True)
    chex.assert_trees_all_close(layer(x, batched=False), layer(x[None])[0], rtol=1e-12)


# ------------------------------------------------------------------ bias=False


def test_the_init_functions_make_a_scale_without_a_bias():
    assert set(jaxnorm.batch_norm_init(C, bias=False)[0]) == {"scale"}
    assert set(jaxnorm.instance_norm_init(C, affine=True, bias=False)[0]) == {"scale"}
    assert jaxnorm.instance_norm_init(C, bias=False)[0] == {}  # affine off: no params at all, as torch
    assert set(jaxnorm.group_norm_init(1, C, bias=False)) == {"scale"}
    assert set(jaxnorm.layer_norm_init(C, bias=False)) == {"scale"}
    params, stats = jaxnorm.batch_norm_init(C, bias=False, dtype=jnp.float64)
    chex.assert_trees_all_equal(params, {"scale": jnp.ones(C, jnp.float64)})
    assert set(stats) == {"mean", "var", "count"}


def test_equinox_use_bias_false():
    eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra")
    from jaxnorm import equinox as je

    x = _x(2, C, 5)
    scale = {"scale": PARAMS["scale"]}
    bn, state = eqx.nn.make_with_state(je.BatchNorm)(C, "batch", use_bias=False)
    assert bn.bias is None
    bn = eqx.tree_at(lambda m: m.weight, bn, PARAMS["scale"])
    y, _ = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    chex.assert_trees_all_close(y, jaxnorm.batch_norm(scale, jaxnorm.batch_norm_init(C)[1], x, training=True)[0],
                                rtol=1e-6)
    inorm = je.InstanceNorm(C, channelwise_affine=True, use_bias=False)
    assert inorm.bias is None and inorm.weight.shape == (C,)
    gn = eqx.tree_at(lambda m: m.weight, je.GroupNorm(1, C, use_bias=False), PARAMS["scale"])
    assert gn.bias is None
    chex.assert_trees_all_close(jax.vmap(gn)(x), jaxnorm.group_norm(scale, x, num_groups=1), rtol=1e-6)
