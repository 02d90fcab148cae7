"""``interop.compare``: a correct port is within tolerance, and an injected fault is named first, chained and
isolated, for linen, NNX and Equinox ports of one small PyTorch network; fixtures replay without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import interop

torch = pytest.importorskip("torch")
eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'")
from tests import twins  # noqa: E402 - needs equinox
from tests.test_models import torch_net  # noqa: E402 - needs torch

pytestmark = pytest.mark.torch
X = np.random.default_rng(0).normal(size=(6, 3, 6, 6)).astype(np.float32)
LOSS = lambda y: (y * y).sum()  # noqa: E731 - one function for both frameworks


def port(framework, torch_model, transposed_kernel=False, **fault):
    """The JAX port of ``torch_model`` with ``fault``: (model, compare keyword arguments)."""
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    if fault.get("bn", "torch") != "torch" and framework != "equinox":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # the port keeps no count
    if framework == "linen":
        model = twins.FlaxNet(**fault)
        names = interop.derive_names(sd, model, jnp.zeros((1, 6, 6, 3)))
        variables = jax.tree.map(jnp.asarray, interop.torch_to_flax(sd, names))
        if transposed_kernel:
            kernel = variables["params"]["Conv_1"]["kernel"]
            variables["params"]["Conv_1"]["kernel"] = jnp.swapaxes(kernel, 0, 1)
        return model, {"variables": variables, "layout": "channels_last"}
    if framework == "nnx":
        model = interop.torch_to_nnx(sd, twins.NNXNet(**fault))
        if transposed_kernel:
            model.conv2.kernel[...] = jnp.swapaxes(model.conv2.kernel[...], 0, 1)
        return model, {"layout": "channels_last"}
    model, state = interop.torch_to_equinox(sd, *eqx.nn.make_with_state(twins.EqxNet)(**fault))
    if fault.get("bn") == "no_count":  # jaxnorm.equinox layers always keep a count: this port failed to carry it
        stats = state.get(model.bn.state_index)
        state = state.set(model.bn.state_index, {**stats, "count": jnp.zeros_like(stats["count"])})
    if transposed_kernel:
        model = eqx.tree_at(lambda m: m.conv2.weight, model, jnp.swapaxes(model.conv2.weight, 2, 3))
    return model, {"state": state}


FRAMEWORKS = ["linen", "nnx", "equinox"]


@pytest.fixture(scope="module")
def net():
    return torch_net(num_batches_tracked=3)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_correct_port_is_within_tolerance(framework, net):
    model, kwargs = port(framework, net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for isolated in (False, True):
        report = interop.compare(net, model, X, loss=LOSS, isolated=isolated, **kwargs)
        report.assert_close()
        assert report.first is None and report.ok
        quantities = {(r.module, r.mode, r.quantity) for r in report.rows}
        for module in ("conv1", "bn", "conv2", "gn", "fc1", "ln", "fc2"):
            assert {(module, mode, "output") for mode in ("eval", "train")} <= quantities, module
            assert (module, "train", "grad weight") in quantities and (module, "train", "grad bias") in quantities
        assert {("bn", "train", q) for q in ("running_mean", "running_var", "num_batches_tracked")} <= quantities
        assert report.order == ["conv1", "bn", "conv2", "gn", "fc1", "ln", "fc2"]
    for key, value in net.state_dict().items():  # compare leaves the torch model as it was
        assert torch.equal(value, before[key]), key


FAULTS = {  # fault -> (the module compare must name first, the quantity it fails on)
    "ln_eps": ({"ln_eps": 1e-1}, "ln", "output"),
    "transposed_kernel": ({"transposed_kernel": True}, "conv2", "output"),
    "flax_momentum": ({"bn": "flax_momentum"}, "bn", "running_mean"),
    "groups": ({"groups": 2}, "gn", "output"),
    "missing_count": ({"bn": "no_count"}, "bn", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_injected_fault_is_named_first_chained_and_isolated(framework, fault, net):
    options, module, quantity = FAULTS[fault]
    model, kwargs = port(framework, net, **options)
    with_loss = {"loss": LOSS} if fault == "ln_eps" else {}  # upstream gradients differ too, and must not come first
    chained = interop.compare(net, model, X, **kwargs, **with_loss)
    isolated = interop.compare(net, model, X, isolated=True, **kwargs, **with_loss)
    for report in (chained, isolated):
        assert report.first is not None and report.first.module == module, report.table()
        if quantity is not None:
            assert report.first.quantity == quantity, report.table()
        with pytest.raises(AssertionError, match=f"differs from PyTorch from module '{module}'"):
            report.assert_close()
        line = next(line for line in report.table().splitlines() if line.split()[:1] == [module])
        assert line.endswith("<- first"), report.table()
    failing = {row.module for row in isolated.failures if row.quantity == "output"}
    if quantity == "output":  # isolated: only the faulty module's outputs differ; chained: everything after it too
        assert failing == {module}, isolated.table()
        assert {row.module for row in chained.failures if row.quantity == "output"} >= {module, "fc2", "(output)"}
    else:
        assert not failing, isolated.table()
    if fault == "missing_count":
        count = next(r for r in chained.rows if r.module == "bn" and r.quantity == "num_batches_tracked")
        assert not count.ok
        assert ("keeps no count" in count.note) if framework != "equinox" else count.max_abs == 3  # 1 vs 3 + 1
    if fault == "ln_eps":
        assert any(r.quantity.startswith("grad") and r.module == "conv1" for r in chained.failures)


def test_report_numbers_are_data(net):
    model, kwargs = port("nnx", net, groups=2)
    report = interop.compare(net, model, X, modes=("eval",), **kwargs)
    rows = {(r.module, r.quantity): r for r in report.rows}
    net.eval()
    with torch.no_grad():
        y_torch = net(torch.from_numpy(X)).numpy()
    y_jax = np.asarray(_eval(model, X))
    expected = np.abs(y_jax - y_torch).max()
    assert rows[("(output)", "output")].max_abs == pytest.approx(expected, rel=1e-6)
    assert rows[("(output)", "output")].max_rel == pytest.approx(expected / np.abs(y_torch).max(), rel=1e-6)
    assert all(r.mode == "eval" for r in report.rows)
    assert json.loads(json.dumps(report.records()))[0]["module"] == "conv1"
    custom = interop.compare(net, model, X, modes=("eval",), tolerance={"atol": 1.0, "rtol": 1.0}, **kwargs)
    assert custom.ok and all(r.atol == 1.0 for r in custom.rows)


def _eval(model, x):
    model = nnx.clone(model)
    model.eval()
    return model(jnp.asarray(np.moveaxis(x, 1, -1)))


def test_errors_are_clear(net):
    model, kwargs = port("nnx", net)
    with pytest.raises(ValueError, match=r"layout='NHWC'; pass None"):
        interop.compare(net, model, X, layout="NHWC")
    with pytest.raises(TypeError, match=r"linen model needs its variables"):
        interop.compare(net, twins.FlaxNet(), X, layout="channels_last")
    with pytest.raises(ValueError, match=r"`modes` holds 'test'"):
        interop.compare(net, model, X, modes=("test",), **kwargs)
    with pytest.raises(ValueError, match=r"received an input of shape \(6, 8, 6, 6\).*takes \(6, 6, 6, 8\)"):
        interop.compare(net, model, X, isolated=True, layout="channels_last", layouts={"bn": None})


REPLAY = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # no torch in this process
    import jax
    jax.config.update("jax_enable_x64", True)
    from jaxnorm import interop
    from tests.twins import NNXNet
    try:
        interop.compare(object(), NNXNet(), None)
    except ImportError as error:
        assert "compare_fixture" in str(error), error
    else:
        raise AssertionError("compare ran without torch")
    fixture = interop.Recording.load(sys.argv[1])
    model = interop.torch_to_nnx(fixture.state_dict, NNXNet(groups=2))  # the weights travel in the fixture
    report = interop.compare_fixture(sys.argv[1], model, layout="channels_last", isolated=True,
                                     loss=lambda y: (y * y).sum())
    print(json.dumps(report.records()))
""")


def test_a_fixture_replays_without_torch(net, tmp_path):
    path = tmp_path / "port.npz"
    model, kwargs = port("nnx", net, groups=2)
    report = interop.compare(net, model, X, isolated=True, loss=LOSS, save=str(path), **kwargs)
    assert report.first.module == "gn"
    out = subprocess.run([sys.executable, "-c", REPLAY, str(path)], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert json.loads(out.stdout.splitlines()[-1]) == json.loads(json.dumps(report.records()))
    loaded = interop.Recording.load(str(path))
    assert sorted(loaded.modes) == ["eval", "train"] and loaded.grads is not None
    assert loaded.train_state["bn.num_batches_tracked"] == 4


class NNXNetLayerNormTwice(twins.NNXNet):
    """A port that applies its LayerNorm twice where torch applies it once."""

    def __call__(self, x):
        x = jax.nn.relu(self.gn(self.conv2(jax.nn.relu(self.bn(self.conv1(x))))))
        x = self.fc1(jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1))
        return self.fc2(jax.nn.relu(self.ln(self.ln(x))))


def test_a_module_called_more_often_than_in_torch_is_named(net):
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    model = interop.torch_to_nnx(sd, NNXNetLayerNormTwice())
    report = interop.compare(net, model, X, layout="channels_last", modes=("eval",), isolated=True)
    assert (report.first.module, report.first.quantity) == ("ln", "output (call 2)"), report.table()
    assert report.first.note == "called 2 times by the JAX model, 1 by torch"
    assert [r.ok for r in report.rows if r.module == "ln"] == [True, False]
