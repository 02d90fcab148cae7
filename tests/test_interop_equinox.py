"""PyTorch state_dict <-> Equinox models and state, without torch: field order, conv bias shape, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import interop
from tests.test_interop import _cnn_state_dict

eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'")
je = pytest.importorskip("jaxnorm.equinox")


class EqxInTorchOrder(eqx.Module):
    """Equinox pairs by field order, then list order: a Sequential's layers are "layers/0", "layers/1"."""

    stem: eqx.nn.Sequential
    conv2: eqx.nn.Conv2d
    gn: je.GroupNorm
    head: list

    def __init__(self):
        k = jax.random.split(jax.random.key(0), 4)
        self.stem = eqx.nn.Sequential([eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0]), je.BatchNorm(8, "batch")])
        self.conv2 = eqx.nn.Conv2d(8, 8, 3, key=k[1])
        self.gn = je.GroupNorm(4, 8)
        self.head = [eqx.nn.Linear(128, 16, key=k[2]), je.LayerNorm(16), eqx.nn.Linear(16, 5, key=k[3])]


def test_equinox_pairs_by_field_order_and_round_trips_exactly():
    sd = {k.replace("conv1", "stem.0").replace("bn.", "stem.1.").replace("fc1", "head.0").replace("ln.", "head.1.")
          .replace("fc2", "head.2"): v for k, v in _cnn_state_dict(np.random.default_rng(0)).items()}
    sd["stem.1.num_batches_tracked"] = np.asarray(5, np.int64)
    model, state = eqx.nn.make_with_state(EqxInTorchOrder)()
    names = interop.derive_names(sd, model, state)
    assert names == {"stem.0": "stem/layers/0", "stem.1": "stem/layers/1", "conv2": "conv2", "gn": "gn",
                     "head.0": "head/0", "head.1": "head/1", "head.2": "head/2"}
    new_model, new_state = interop.torch_to_equinox(sd, model, state)
    chex.assert_shape(new_model.conv2.bias, (8, 1, 1))  # Equinox's conv bias
    np.testing.assert_array_equal(new_model.stem.layers[0].weight, sd["stem.0.weight"])  # torch's own layout
    stats = new_state.get(new_model.stem.layers[1].state_index)
    assert int(stats["count"]) == 5 and stats["count"].dtype == state.get(model.stem.layers[1].state_index)[
        "count"].dtype
    np.testing.assert_array_equal(model.conv2.weight, eqx.nn.make_with_state(EqxInTorchOrder)()[0].conv2.weight)
    state.get(model.stem.layers[1].state_index)  # the state passed in is still usable (not used up by State.set)
    back = interop.equinox_to_torch(new_model, new_state, names)
    assert list(back) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value.astype(back[key].dtype), err_msg=key)
    assert back["stem.1.num_batches_tracked"].dtype == np.int64


def test_equinox_errors_name_the_first_mismatch():
    model, state = eqx.nn.make_with_state(EqxInTorchOrder)()
    sd = {"stem.0.weight": np.zeros((8, 3, 3, 3)), "stem.0.bias": np.zeros(8), "stem.1.weight": np.ones(4)}
    with pytest.raises(ValueError, match=r"torch module 'stem.1' \(module 2 .*does not match Equinox module "
                                         r"'stem/layers/1': it converts to \{'weight': \(4,\)\}"):
        interop.torch_to_equinox(sd, model, state)
    with pytest.raises(TypeError, match=r"keeps running statistics in an eqx.nn.State; pass it"):
        interop.derive_names(sd, model)
    with pytest.raises(TypeError, match=r"at most its eqx.nn.State"):
        interop.derive_names(sd, model, state, jnp.zeros(3))
    with pytest.raises(KeyError, match=r"no convertible module at Equinox path 'stem'"):
        interop.equinox_to_torch(model, state, {"stem.0": "stem"})
