"""Bad input raises at trace time with a message naming the argument, the value and the fix."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

X = jnp.ones((4, 3, 5), jnp.float32)
P, S = jaxnorm.batch_norm_init(3)


def bn(**kw):
    args = dict(params=P, batch_stats=S, x=X, training=True)
    args.update(kw)
    return jaxnorm.batch_norm(args.pop("params"), args.pop("batch_stats"), args.pop("x"), **args)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(x=jnp.ones((4, 3), jnp.int32)), TypeError,
         r"`x` must have a floating-point or complex dtype, got int32.*astype"),
        (dict(x=jnp.ones((4,))), ValueError, r"`x` must have rank >= 2.*got shape \(4,\)"),
        (dict(x=jnp.ones((4, 5, 5))), ValueError, r"`params\['scale'\]` has shape \(3,\) but the input needs \(5,\)"),
        (dict(axis=3), ValueError, r"`axis`=3 is out of range for an input of rank 3"),
        (dict(eps=0.0), ValueError, r"`eps` must be > 0, got 0.0"),
        (dict(eps=-1e-5), ValueError, r"`eps` must be > 0, got -1e-05"),
        (dict(momentum=1.5), ValueError, r"`momentum` must be in \[0, 1\] or None.*got 1.5.*weight of the NEW batch"),
        (dict(momentum=-0.1), ValueError, r"`momentum` must be in \[0, 1\]"),
        (dict(x=jnp.ones((1, 3))), ValueError, r"expected more than 1 value per channel when training.*\(1, 3\)"),
        (dict(training=jnp.array(True)), TypeError, r"`training` must be a Python bool.*static_argnames"),
        (dict(training="yes"), TypeError, r"`training` must be a Python bool"),
        (dict(params={"weight": P["scale"]}), ValueError, r"`params` has keys \['weight'\] but this layer expects"),
        (dict(batch_stats={"mean": S["mean"], "count": S["count"]}), ValueError,
         (r"`batch_stats` has keys \['count', 'mean'\] but this layer expects \['count', 'mean', 'var'\]"
         r".*batch_norm_init\(3")),
        (dict(batch_stats={"mean": S["mean"], "var": S["var"]}, momentum=None), ValueError,
         r"`momentum`=None \(the cumulative average\) needs `batch_stats\['count'\]`"),
        (dict(batch_stats={**S, "count": jnp.zeros(())}), TypeError, r"`batch_stats\['count'\]` must have an integer"),
        (dict(batch_stats={**S, "var": jnp.ones((3,), jnp.int32)}), TypeError,
         r"`batch_stats\['var'\]` must have a floating"),
        (dict(params=[1, 2]), TypeError, r"`params` must be a dict, got list"),
        (dict(mask=jnp.ones((4, 1, 5))), TypeError, r"`mask` must be a boolean array"),
        (dict(mask=jnp.ones((2, 1, 1), bool)), ValueError, r"`mask` has shape \(2, 1, 1\), which does not broadcast"),
        (dict(mask=jnp.ones((1, 4, 3, 5), bool)), ValueError, r"`mask` has shape \(1, 4, 3, 5\), which does not"),
    ],
)
def test_batch_norm_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bn(**kwargs)


def test_errors_are_raised_at_trace_time_under_jit():
    f = jax.jit(lambda p, s, x: jaxnorm.batch_norm(p, s, x, training=True, eps=0.0))
    with pytest.raises(ValueError, match="`eps` must be > 0"):
        f(P, S, X)


def test_traced_training_flag_is_rejected_under_jit():
    f = jax.jit(lambda t: jaxnorm.batch_norm(P, S, X, training=t))
    with pytest.raises(TypeError, match=r"`training` must be a Python bool"):
        f(True)


def test_state_is_not_mutated_on_error():
    stats = {k: jnp.array(v) for k, v in S.items()}
    before = jax.tree.map(np.asarray, stats)
    with pytest.raises(ValueError):
        jaxnorm.batch_norm(P, stats, X, training=True, momentum=2.0)
    chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, stats))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6, 3)), num_groups=4), ValueError,
         r"`num_groups`=4 must divide the number of channels 6; valid choices are \[1, 2, 3, 6\]"),
        (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6, 3)), num_groups=2, axis=0), ValueError,
         r"`axis`=0 points at the batch axis"),
        (lambda: jaxnorm.group_norm_init(4, 6), ValueError, r"`num_groups`=4 must divide"),
        (lambda: jaxnorm.layer_norm({}, jnp.ones((2, 3, 4)), normalized_shape=(3,)), ValueError,
         r"`normalized_shape`=\(3,\) must equal the trailing dims of `x`.*\(2, 3, 4\)"),
        (lambda: jaxnorm.layer_norm(jaxnorm.layer_norm_init(5), jnp.ones((2, 4)), normalized_shape=4), ValueError,
         r"`params\['bias'\]` has shape \(5,\) but the input needs \(4,\).*layer_norm_init\(4"),
        (lambda: jaxnorm.layer_norm({}, jnp.ones((2, 4)), normalized_shape="4"), TypeError,
         r"`normalized_shape` must be an int or a tuple of ints, got '4'"),
        (lambda: jaxnorm.rms_norm({"shift": jnp.ones(4)}, jnp.ones((2, 4)), normalized_shape=4), ValueError,
         r"rms_norm: `params` has keys \['shift'\] but this layer expects \['bias', 'scale'\]"),
        (lambda: jaxnorm.instance_norm({}, {}, jnp.ones((3, 5)), training=True), ValueError,
         r"rank >= 3.*For one unbatched example \(C, L\), pass batched=False"),
        (lambda: jaxnorm.instance_norm({}, {}, jnp.ones((2, 3, 1)), training=True), ValueError,
         r"expected more than 1 spatial element when training"),
        (lambda: jaxnorm.batch_norm_init(0), ValueError, r"`num_features` must be a positive int, got 0"),
        (lambda: jaxnorm.batch_norm(*jaxnorm.instance_norm_init(4, affine=True), X, training=True), ValueError,
         r"`params\['scale'\]` has shape \(4,\) but the input needs \(3,\)"),
    ],
)
def test_other_layer_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
