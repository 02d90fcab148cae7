"""PyTorch state_dict <-> Flax variables: round trips without torch; a whole CNN end to end with torch."""

from __future__ import annotations

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxnorm import interop
from jaxnorm import linen as jl
from jaxnorm import nnx as jn

NAMES = {"conv1": "Conv_0", "bn": "BatchNorm_0", "conv2": "Conv_1", "gn": "GroupNorm_0", "fc1": "Dense_0",
         "ln": "LayerNorm_0", "fc2": "Dense_1"}


class FlaxCNN(nn.Module):
    """The same network as TorchCNN below, NHWC, built from jaxnorm layers."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.relu(jl.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(8, (3, 3), padding="VALID")(x)
        x = nn.relu(jl.GroupNorm(num_groups=4)(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # flatten in torch's (C, H, W) order
        x = nn.relu(jl.LayerNorm()(nn.Dense(16)(x)))
        return nn.Dense(5)(x)


def _random_state_dict(rng):
    return {
        "conv1.weight": rng.normal(size=(8, 3, 3, 3)), "conv1.bias": rng.normal(size=8),
        "bn.weight": rng.normal(size=8), "bn.bias": rng.normal(size=8), "bn.running_mean": rng.normal(size=8),
        "bn.running_var": rng.uniform(0.5, 2, size=8), "bn.num_batches_tracked": np.asarray(3, np.int64),
        "fc.weight": rng.normal(size=(4, 6)), "fc.bias": rng.normal(size=4),
        "ln2d.weight": rng.normal(size=(3, 4)), "ln2d.bias": rng.normal(size=(3, 4)),
    }


def test_round_trip_without_torch():
    sd = _random_state_dict(np.random.default_rng(0))
    names = {"conv1": "block/Conv_0", "bn": "block/BatchNorm_0", "fc": "Dense_0", "ln2d": "LayerNorm_0"}
    v = interop.torch_to_flax(sd, names, kinds={"ln2d": "norm"})
    chex.assert_shape(v["params"]["block"]["Conv_0"]["kernel"], (3, 3, 3, 8))
    chex.assert_shape(v["params"]["Dense_0"]["kernel"], (6, 4))
    chex.assert_type(v["batch_stats"]["block"]["BatchNorm_0"]["count"], np.int32)
    np.testing.assert_array_equal(v["params"]["LayerNorm_0"]["scale"], sd["ln2d.weight"])
    back = interop.flax_to_torch(v, names, kinds={"ln2d": "norm"})
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_unmapped_module_is_a_clear_error():
    with pytest.raises(KeyError, match=r"module 'head', which `names` does not map.*names\['head'\]"):
        interop.torch_to_flax({"head.weight": np.ones((2, 3))}, {})
    with pytest.raises(ValueError, match=r"kinds\['x'\] must be one of"):
        interop.torch_to_flax({"x.weight": np.ones((2, 3))}, {"x": "Dense_0"}, kinds={"x": "dense"})


def _cnn_state_dict(rng):
    """A state_dict shaped like TorchCNN's below, in its registration order, as NumPy arrays."""
    shapes = {"conv1.weight": (8, 3, 3, 3), "conv1.bias": (8,), "bn.weight": (8,), "bn.bias": (8,),
              "bn.running_mean": (8,), "bn.running_var": (8,), "bn.num_batches_tracked": (),
              "conv2.weight": (8, 8, 3, 3), "conv2.bias": (8,), "gn.weight": (8,), "gn.bias": (8,),
              "fc1.weight": (16, 128), "fc1.bias": (16,), "ln.weight": (16,), "ln.bias": (16,),
              "fc2.weight": (5, 16), "fc2.bias": (5,)}
    return {k: np.asarray(rng.normal(size=s), np.float32) for k, s in shapes.items()}


class FlaxCNNInTorchOrder(FlaxCNN):
    """FlaxCNN with one module per statement, so its modules are created in TorchCNN's order."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.relu(jl.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(8, (3, 3), padding="VALID")(x)
        x = nn.relu(jl.GroupNorm(num_groups=4)(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dense(16)(x)
        x = nn.relu(jl.LayerNorm()(x))
        return nn.Dense(5)(x)


X = jnp.zeros((1, 6, 6, 3))


def test_derive_names_pairs_modules_in_declaration_order():
    sd = _cnn_state_dict(np.random.default_rng(0))
    names = interop.derive_names(sd, FlaxCNNInTorchOrder(), X, train=False)
    assert names == NAMES and list(names) == list(NAMES)
    variables = interop.torch_to_flax(sd, names)
    assert jax.tree.map(np.shape, variables) == jax.tree.map(
        np.shape, jax.eval_shape(lambda: FlaxCNNInTorchOrder().init(jax.random.key(0), X, train=False)))


def test_derive_names_follows_setup_order_not_call_order():
    class PostNorm(nn.Module):  # calls norm before linear, declares it after (as torch's encoder layer does)
        def setup(self):
            self.linear = nn.Dense(4)
            self.norm = jl.LayerNorm()

        def __call__(self, x):
            return self.linear(self.norm(x))

    sd = {"linear.weight": np.ones((4, 4)), "linear.bias": np.ones(4), "norm.weight": np.ones(4),
          "norm.bias": np.ones(4)}
    names = interop.derive_names(sd, PostNorm(), jnp.zeros((2, 4)))
    assert names == {"linear": "linear", "norm": "norm"}


def test_derive_names_error_names_the_first_mismatch_and_names_overrides_it():
    sd = _cnn_state_dict(np.random.default_rng(0))
    # FlaxCNN writes LayerNorm()(Dense(16)(x)): the LayerNorm is created before the Dense
    with pytest.raises(ValueError, match=r"torch module 'fc1' \(module 5 .*does not match Flax module "
                                         r"'LayerNorm_0': it is a linear layer, the Flax module a norm layer.*"
                                         r"names=\{'fc1': 'Flax/path'\}"):
        interop.derive_names(sd, FlaxCNN(), X, train=False)
    names = interop.derive_names(sd, FlaxCNN(), X, train=False, names={"fc1": "Dense_0"})
    assert names == NAMES
    # a full hand-written mapping is returned as given
    assert interop.derive_names(sd, FlaxCNN(), X, train=False, names=NAMES) == NAMES


def test_derive_names_errors():
    sd = _cnn_state_dict(np.random.default_rng(0))
    model = FlaxCNNInTorchOrder()
    with pytest.raises(ValueError, match=r"'conv1' \(module 1 .*converts to .*'kernel': \(3, 3, 3, 4\).*"
                                         r"holds .*'kernel': \(3, 3, 3, 8\)"):
        interop.derive_names({**sd, "conv1.weight": np.zeros((4, 3, 3, 3))}, model, X, train=False)
    with pytest.raises(ValueError, match=r"8 torch modules but 7 Flax modules.*first torch module left without "
                                         r"a partner is 'head'"):
        interop.derive_names({**sd, "head.weight": np.zeros((2, 5))}, model, X, train=False)
    with pytest.raises(ValueError, match=r"first Flax module left without a partner is 'Dense_1'"):
        interop.derive_names({k: v for k, v in sd.items() if not k.startswith("fc2")}, model, X, train=False)
    with pytest.raises(ValueError, match=r"'attn' looks like a MultiheadAttention but holds \['in_proj_weight'\].*"
                                         r"out_proj.weight"):
        interop.derive_names({"attn.in_proj_weight": np.zeros((3, 3)), **sd}, model, X, train=False)
    with pytest.raises(ValueError, match=r"'conv1' holds \['layer_scale'\], which interop does not convert"):
        interop.derive_names({**sd, "conv1.layer_scale": np.zeros(8)}, model, X, train=False)
    with pytest.raises(ValueError, match=r"'bn' .*the Flax module keeps no count.*drop the num_batches_tracked"):
        interop.derive_names(sd, nn.Sequential([nn.Conv(8, (3, 3), padding=1), nn.BatchNorm(True)]), X)
    with pytest.raises(ValueError, match=r"Flax path 'Dense_7', which is not a module with variables"):
        interop.derive_names(sd, model, X, train=False, names={"fc1": "Dense_7"})
    with pytest.raises(ValueError, match=r"names has torch module 'fc9', which the state_dict does not hold"):
        interop.derive_names(sd, model, X, train=False, names={"fc9": "Dense_0"})

    class TwoDimLayerNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jl.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1))(x)

    ln2d = {"ln.weight": np.ones((3, 4)), "ln.bias": np.zeros((3, 4))}
    with pytest.raises(ValueError, match=r"a linear layer, the Flax module a norm layer \(for a LayerNorm or "
                                         r"RMSNorm over 2\+ trailing dims pass kinds=\{'ln': 'norm'\}\)"):
        interop.derive_names(ln2d, TwoDimLayerNorm(), jnp.zeros((2, 3, 4)))
    assert interop.derive_names(ln2d, TwoDimLayerNorm(), jnp.zeros((2, 3, 4)), kinds={"ln": "norm"}) == {
        "ln": "LayerNorm_0"}


@pytest.mark.torch
def test_pytorch_cnn_end_to_end():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    from tests.test_models import torch_net

    tm = torch_net()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 5, size=6)
    to_nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))

    variables = jax.tree.map(jnp.asarray, interop.torch_to_flax(tm.state_dict(), NAMES))
    model = FlaxCNN()
    ref = jax.tree.map(jnp.shape, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), to_nhwc(x)))
    assert jax.tree.map(jnp.shape, variables) == ref

    tm.eval()
    with torch.no_grad():
        t_eval = tm(torch.from_numpy(x)).numpy()
    f_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, to_nhwc(x))
    np.testing.assert_allclose(f_eval, t_eval, atol=2e-5, rtol=1e-5)

    # one identical SGD step in training mode
    tm.train()
    opt = torch.optim.SGD(tm.parameters(), lr=0.1)
    loss = tnn.functional.cross_entropy(tm(torch.from_numpy(x)), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()

    tx = optax.sgd(0.1)

    def loss_fn(params):
        logits, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, to_nhwc(x),
                                  train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(), upd

    (f_loss, upd), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]))
    new = {"params": optax.apply_updates(variables["params"], updates), "batch_stats": upd["batch_stats"]}
    np.testing.assert_allclose(f_loss, loss.item(), rtol=1e-5)
    after = interop.flax_to_torch(new, NAMES)
    for key, value in tm.state_dict().items():
        np.testing.assert_allclose(after[key], value.numpy(), atol=2e-5, rtol=1e-5, err_msg=key)
    assert int(new["batch_stats"]["BatchNorm_0"]["count"]) == int(tm.bn.num_batches_tracked) == 1


def test_derive_names_passes_rngs_to_init():
    """``rngs=`` reaches ``model.init`` (a model with dropout in training mode, given its own dropout key)."""

    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(nn.Dense(4)(x))

    sd = {"fc.weight": np.ones((4, 3)), "fc.bias": np.ones(4)}
    with pytest.raises(flax.errors.InvalidRngError):  # not a key: the argument really reaches init
        interop.derive_names(sd, WithDropout(), jnp.zeros((2, 3)), rngs="not a key")
    key = jax.random.key(0)
    assert interop.derive_names(sd, WithDropout(), jnp.zeros((2, 3)), rngs={"params": key, "dropout": key}) == {
        "fc": "Dense_0"}


# ------------------------------------------------------------------------------------------- NNX and Equinox


class NNXInTorchOrder(nnx.Module):
    """Attributes assigned in torch's order, which is not their alphabetical order (``nnx.state`` sorts by name)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
        self.bn = jn.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs)
        self.gn = jn.GroupNorm(8, num_groups=4, rngs=rngs)
        self.fc1 = nnx.Linear(128, 16, rngs=rngs)
        self.ln = jn.LayerNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 5, rngs=rngs)


def test_nnx_pairs_by_assignment_order_and_round_trips_exactly():
    sd = _cnn_state_dict(np.random.default_rng(0))
    sd["bn.num_batches_tracked"] = np.asarray(7, np.int64)
    model = NNXInTorchOrder()
    names = interop.derive_names(sd, model)
    assert names == {k: k for k in NAMES} and list(names) == list(NAMES)
    assert interop.torch_to_nnx(sd, model) is model  # updated in place, as nnx.update does
    chex.assert_type(model.bn.count[...], jnp.int32)
    assert int(model.bn.count[...]) == 7
    np.testing.assert_array_equal(model.conv1.kernel[...], np.transpose(sd["conv1.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(model.fc1.kernel[...], sd["fc1.weight"].T)
    back = interop.nnx_to_torch(model, names)
    assert list(back) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype, key


def test_nnx_errors_name_the_first_mismatch():
    sd = _cnn_state_dict(np.random.default_rng(0))
    model = NNXInTorchOrder()
    with pytest.raises(ValueError, match=r"torch module 'conv1' \(module 1 .*does not match NNX module 'conv1': it "
                                         r"converts to .*\(3, 3, 3, 4\).*holds .*\(3, 3, 3, 8\)"):
        interop.torch_to_nnx({**sd, "conv1.weight": np.zeros((4, 3, 3, 3))}, model)
    with pytest.raises(ValueError, match=r"first torch module left without a partner is 'head'"):
        interop.torch_to_nnx({**sd, "head.weight": np.zeros((2, 5))}, model)
    with pytest.raises(ValueError, match=r"NNX path 'fc9', which is not a module with variables"):
        interop.torch_to_nnx(sd, model, {"fc1": "fc9"})
    with pytest.raises(TypeError, match=r"an NNX model needs no sample call"):
        interop.derive_names(sd, model, jnp.zeros((1, 6, 6, 3)))
    # names given by hand override the order: swapped twins of the same shape are loaded where they are told
    swapped = {"conv1": "conv1", "bn": "bn", "conv2": "conv2", "gn": "ln", "fc1": "fc1", "ln": "gn", "fc2": "fc2"}
    sd_same = {**sd, "gn.weight": np.ones(16), "gn.bias": np.zeros(16), "ln.weight": np.full(8, 2.0),
               "ln.bias": np.full(8, 3.0)}
    model = NNXInTorchOrder()
    interop.torch_to_nnx(sd_same, model, swapped)
    np.testing.assert_array_equal(model.gn.scale[...], np.full(8, 2.0))
    with pytest.raises(KeyError, match=r"no convertible variables at NNX path 'nothing'"):
        interop.nnx_to_torch(model, {"fc1": "nothing"})
