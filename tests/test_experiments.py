"""Experiments: a smoke run of every experiment, the IDX loader, the training loop, and (slow) full findings."""

from __future__ import annotations

import gzip
import json
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import EXPERIMENTS, _common, lenet
from experiments.__main__ import main


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_experiment_writes_figures_and_finite_numbers(quick_results):
    out, results = quick_results
    assert sorted(results) == sorted(EXPERIMENTS)
    for name, r in results.items():
        assert r["figures"], name
        for fig in r["figures"]:
            assert (out / fig).stat().st_size > 10_000, f"{name}: {fig} looks empty"
        numbers = {k: v for k, v in r.items() if k not in ("report", "figures", "data")}
        assert _common.finite(jax.tree.map(lambda v: v if v is not None else 0.0, numbers)), name
    report = (out / "report.md").read_text()
    for r in results.values():
        for fig in r["figures"]:
            assert f"]({fig})" in report


def test_framework_parity_holds_even_in_the_quick_run(quick_results):
    rows = quick_results[1]["framework_parity"]["max_abs_difference"]
    assert rows["float32"]["jaxnorm vs PyTorch"] < 1e-5
    assert rows["float64"]["jaxnorm vs PyTorch"] < 1e-12
    assert rows["float32"]["eps=1e-3 (TensorFlow default) vs eps=1e-5"] > 1e-4


def test_cli_rejects_unknown_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["no_such_experiment"])
    assert "unknown experiment" in capsys.readouterr().err


def _write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def test_idx_loader_reads_fashion_mnist_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (3, 28, 28),
                                                                                                 dtype=np.uint8)}
    labels = {"train": rng.integers(0, 10, 7, dtype=np.uint8), "t10k": rng.integers(0, 10, 3, dtype=np.uint8)}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    x_train, y_train, x_test, y_test = lenet.load_fashion_mnist(tmp_path)
    assert x_train.shape == (7, 28, 28, 1) and x_test.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(x_train[..., 0], images["train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_test, labels["t10k"])
    _write_idx(tmp_path / "plain.idx", np.arange(6, dtype=np.int32).reshape(2, 3), gz=False)
    np.testing.assert_array_equal(lenet.load_idx(tmp_path / "plain.idx"), np.arange(6).reshape(2, 3))


def test_idx_loader_errors(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01\x00\x00\x00\x02ab"))
    with pytest.raises(ValueError, match="not an IDX file"):
        lenet.load_idx(tmp_path / "bad.gz")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(ValueError, match="header says shape"):
        lenet.load_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST files missing"):
        lenet.load_fashion_mnist(tmp_path)


def test_training_loop_learns_and_never_recompiles():
    """The shared jitted train step (optax + TrainState + batch_stats) lowers the loss and compiles once."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
    y = jnp.asarray((x[:, 0] + x[:, 1] > 0).astype(np.int32))
    model = _common.MLP(hidden=(16,), out=2, use_bn=True)
    state = _common.create_state(model, jax.random.key(0), x[:2], optax.sgd(0.1))
    step = _common.make_train_step(_common.cross_entropy)
    losses = []
    for _ in range(60):
        state, loss = step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    # <= 1: a second entry means a recompile; the cache may also be empty (jax evicts entries under load)
    assert step._cache_size() <= 1, "the train step recompiled"
    assert int(state.batch_stats["BatchNorm_0"]["count"]) == 60


def test_lenet_epochs_to_target_and_standardize():
    assert lenet.epochs_to([0.1, 0.5, 0.9, 0.95]) == 3
    assert lenet.epochs_to([0.1, 0.89]) is None
    assert lenet.epochs_to([0.97], target=0.95) == 1
    rng = np.random.default_rng(0)
    data = (rng.normal(3.0, 2.0, (50, 4, 4, 1)), np.zeros(50), rng.normal(3.0, 2.0, (20, 4, 4, 1)), np.zeros(20))
    x_train, _, x_test, _ = lenet.standardize(data)
    np.testing.assert_allclose([x_train.mean(), x_train.std()], [0.0, 1.0], atol=1e-12)
    # the test split uses the training split's statistics, not its own
    np.testing.assert_allclose(x_test, (data[2] - data[0].mean()) / data[0].std())


@pytest.mark.slow
def test_lenet_with_bn_leaves_chance_in_the_first_epochs_where_the_plain_net_does_not():
    """Two epochs at lr 1.0 on the digits: BN LeNet is past 90% test accuracy, plain LeNet still at chance."""
    data = lenet.standardize(lenet.load_digits_28())
    bn = lenet.train("jaxnorm", 1.0, 2, 0, data, "BN")
    plain = lenet.train("none", 1.0, 2, 0, data, "plain")
    assert bn["epochs_to_target"] is not None and bn["epochs_to_target"] <= 2, bn["test_accuracy"]
    assert max(plain["test_accuracy"]) < 0.2, plain["test_accuracy"]
    assert plain["epochs_to_target"] is None


@pytest.mark.slow
def test_full_two_circles_and_deep_mlp_findings(tmp_path):
    from experiments import deep_mlp_scale, two_circles

    deep = deep_mlp_scale.run(tmp_path)
    assert deep["finding_holds"], deep["report"]
    assert abs(deep["bn_std_mean"] - deep_mlp_scale.RELU_STD) < 0.03
    assert deep["default_last_std"] < 1e-10
    circles = two_circles.run(tmp_path)
    assert circles["finding_holds"], circles["report"]
    assert circles["runs"]["BatchNorm"]["final_test_accuracy"] > 0.95


@pytest.mark.slow
def test_batch_renorm_finding(tmp_path):
    """Non-i.i.d. batches cost BatchNorm test accuracy and renorm recovers most of it; with micro-batches renorm
    beats BatchNorm (the paper's direction), and the run stays within a minute."""
    from experiments import batch_renorm

    r = batch_renorm.run(tmp_path)
    assert r["finding_holds"], r["report"]
    final = r["final_test_accuracy"]
    assert final["iid"]["BatchNorm"] - final["non_iid"]["BatchNorm"] > 0.005
    assert final["micro"]["BatchRenorm"] - final["micro"]["BatchNorm"] > 0.03
    assert final["non_iid"]["ghost BatchNorm"] < 0.5  # one class per sub-batch: normalized away


@pytest.mark.slow
def test_two_circles_in_equinox_gives_the_same_finding(tmp_path):
    pytest.importorskip("equinox", reason="the Equinox run needs the optional extra: pip install 'jaxnorm[equinox]'")
    assert main(["two_circles", "--framework", "equinox", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["two_circles_equinox"]
    r = results["two_circles_equinox"]
    assert r["framework"] == "equinox" and r["finding_holds"], r["report"]
    bn, plain = r["runs"]["BatchNorm"], r["runs"]["no BN"]
    assert bn["final_test_accuracy"] > 0.95
    assert bn["epochs_to_95pct_test_accuracy"] < plain["epochs_to_95pct_test_accuracy"]
    assert "## Two circles: MLP with and without BatchNorm (in Equinox)" in (tmp_path / "report.md").read_text()


def test_framework_flag_applies_to_two_circles_only(capsys):
    with pytest.raises(SystemExit):
        main(["lenet", "--framework", "equinox"])
    assert "applies to two_circles only" in capsys.readouterr().err


def test_benchmark_smoke_run_writes_a_table(tmp_path, capsys):
    """One run of the benchmark with tiny shapes (no timing assertions: speed is measured, never unit-tested)."""
    assert main(["benchmark", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["rows"] and data["meta"]["runs"] == 3
    assert data["meta"]["copy_bandwidth_gbps"]["best"] > 0 and data["meta"]["backend"] == "cpu"
    for row in data["rows"]:
        for impl in ("jaxnorm", "flax"):
            assert row[impl]["fwd_train"] > 0 and row[impl]["fwd_bwd_bytes"] > 0
            assert row[impl]["gbps"]["fwd_bwd"] == pytest.approx(row["bytes"]["fwd_bwd"] / row[impl]["fwd_bwd"] / 1e6)
        assert set(row["ratios"]) >= {"fwd_train/best_peer", "fwd_bwd/best_peer", "fwd_eval/floor"}
        assert row["bytes"]["fwd_bwd"] == 5 * 4 * np.prod(row["shape"])  # float32: x, y, x, dy, dx
        # the Pallas row kernels (interpreted on the CPU) are timed for the row-wise layers only
        for impl in ("jaxnorm_pallas", "pallas_vjp"):
            assert (impl in row) == row["case"].startswith(("ln", "rms")), (impl, row["case"])
    out = capsys.readouterr().out
    assert "| case | floor |" in out and "| case | MB | jaxnorm fwd | jaxnorm Pallas fwd |" in out


def test_benchmark_reports_a_failing_column_and_goes_on():
    """A column that cannot run (PyTorch without a kernel for a dtype on a device, a kernel that does not compile)
    is left out of its case with the error recorded; the case's other columns are still timed."""
    import dataclasses

    from experiments.benchmark import implementations, runner

    def broken(*args):
        def fail():
            raise RuntimeError("no kernel for this dtype")
        return implementations.Fns(fail, fail, fail, lambda out: out)

    columns = [dataclasses.replace(i, build=broken) if i.name == "torch" else i
               for i in implementations.IMPLEMENTATIONS]
    setting = implementations.Setting(with_torch=True, pallas=False)
    row = runner.run_case("ln 8x6", "ln", (8, 6), "float32", {}, 1, setting, settle=0.0, implementations=columns)
    assert "torch" not in row and "no kernel for this dtype" in row["errors"]["torch"]
    assert row["jaxnorm"]["fwd_train"] > 0 and row["ratios"]["fwd_train/best_peer"] > 0  # against flax


def test_benchmark_times_what_it_names():
    """The Pallas columns trace the kernels and the others do not; the forward+backward returns y, the statistics'
    update and the gradients (a training step's share), and every implementation writes the input's dtype."""
    from experiments.benchmark.implementations import jax_fns

    results = {}
    for impl in ("jaxnorm", "jaxnorm_pallas", "pallas_vjp", "flax"):
        fns = jax_fns(impl, "ln", (8, 6), "bfloat16", {})
        with fns.context():
            jaxpr = str(jax.make_jaxpr(fns.program)(*fns.args))
        assert jaxpr.count("pallas_call") == {"jaxnorm_pallas": 1, "pallas_vjp": 2}.get(impl, 0), impl
        y, updates, (dparams, dx) = results[impl] = fns.fwd_bwd()
        x = fns.args[1]
        chex.assert_type([y, dx], jnp.bfloat16)
        chex.assert_shape([y, dx], x.shape)
        assert updates is None and set(dparams) == {"scale", "bias"}, impl
    for impl in ("jaxnorm_pallas", "pallas_vjp"):  # the kernels compute what the XLA path does
        for got, want in zip(jax.tree.leaves(results[impl]), jax.tree.leaves(results["jaxnorm"]), strict=True):
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2,
                                       atol=2e-2)
    y, updates, _ = jax_fns("flax", "bn", (4, 3, 2, 2), "float32", {}).fwd_bwd()
    assert set(updates["batch_stats"]) == {"mean", "var"} and y.shape == (4, 2, 2, 3)


@pytest.mark.slow
@pytest.mark.torch
def test_model_benchmark_smoke_run(tmp_path, capsys):
    """The whole-model benchmark with a 1-block-per-stage ResNet on 32x32 images (no timing assertions)."""
    pytest.importorskip("torch")
    from experiments import models

    try:
        models.torchvision_models()
    except ImportError as error:
        pytest.skip(str(error))
    assert main(["benchmark", "--model", "resnet18", "--quick", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "benchmark_model.json").read_text())
    for impl in ("jaxnorm", "flax", "torch"):
        assert row[impl]["train_ms"] > 0 and row[impl]["eval_ms"] > 0, impl
    assert {"train_time/flax", "train_time/torch", "eval_time/flax", "eval_time/torch"} <= set(row)
    assert "| training steps/s |" in capsys.readouterr().out
