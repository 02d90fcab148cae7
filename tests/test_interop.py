"""PyTorch state_dict <-> Flax variables: round trips without torch; a whole CNN end to end with torch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnorm import interop
from jaxnorm import linen as jl

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
    assert v["params"]["block"]["Conv_0"]["kernel"].shape == (3, 3, 3, 8)
    assert v["params"]["Dense_0"]["kernel"].shape == (6, 4)
    assert v["batch_stats"]["block"]["BatchNorm_0"]["count"].dtype == np.int32
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


@pytest.mark.torch
def test_pytorch_cnn_end_to_end():
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class TorchCNN(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn = tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8)
            self.conv2, self.gn = tnn.Conv2d(8, 8, 3), tnn.GroupNorm(4, 8)
            self.fc1, self.ln, self.fc2 = tnn.Linear(8 * 4 * 4, 16), tnn.LayerNorm(16), tnn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv1(x)))
            x = torch.relu(self.gn(self.conv2(x)))
            return self.fc2(torch.relu(self.ln(self.fc1(x.flatten(1)))))

    torch.manual_seed(0)
    tm = TorchCNN()
    with torch.no_grad():  # non-trivial norm parameters and statistics
        for mod in (tm.bn, tm.gn, tm.ln):
            mod.weight.add_(0.3 * torch.randn_like(mod.weight))
            mod.bias.add_(0.3 * torch.randn_like(mod.bias))
        tm.bn.running_mean.normal_()
        tm.bn.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 6, 6)).astype(np.float32)
    y = rng.integers(0, 5, size=6)
    to_nhwc = lambda a: jnp.asarray(np.transpose(a, (0, 2, 3, 1)))

    variables = jax.tree.map(jnp.asarray, interop.torch_to_flax(tm.state_dict(), NAMES))
    model = FlaxCNN()
    ref = jax.tree.map(jnp.shape, model.init(jax.random.key(0), to_nhwc(x), train=False))
    assert jax.tree.map(jnp.shape, variables) == ref

    tm.eval()
    with torch.no_grad():
        t_eval = tm(torch.from_numpy(x)).numpy()
    f_eval = model.apply(variables, to_nhwc(x), train=False)
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

    (f_loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, _ = tx.update(grads, tx.init(variables["params"]))
    new = {"params": optax.apply_updates(variables["params"], updates), "batch_stats": upd["batch_stats"]}
    np.testing.assert_allclose(f_loss, loss.item(), rtol=1e-5)
    after = interop.flax_to_torch(new, NAMES)
    for key, value in tm.state_dict().items():
        np.testing.assert_allclose(after[key], value.numpy(), atol=2e-5, rtol=1e-5, err_msg=key)
    assert int(new["batch_stats"]["BatchNorm_0"]["count"]) == int(tm.bn.num_batches_tracked) == 1
