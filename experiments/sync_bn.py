"""sync_bn: data-parallel training with synchronized BatchNorm on simulated devices vs one device.

Command: ``python -m experiments sync_bn [--devices 8] [--steps 50] [--out results]``
Runtime: about 10 s on a 2-core CPU.
What it does: trains the same small jaxnorm Flax MLP (Dense -> BatchNorm -> ReLU -> Dense) on two-circles data
twice: (a) ``jax.shard_map`` over a mesh of simulated CPU devices, the global batch of 64 split across them, with
``BatchNorm(axis_name="batch")`` and the loss averaged with ``pmean``; (b) one device on the whole batch.
Expected: after every step the parameters, running statistics and losses agree to float32 rounding (max |diff|
around 1e-6 or below), i.e. sharded training is the global-batch computation.
"""

from __future__ import annotations

import argparse
import json
import pathlib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments sync_bn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    args = parser.parse_args(argv)

    import jax

    try:  # simulate devices on the CPU; only possible before JAX's backend has started
        jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:
        pass
    if jax.device_count() < args.devices:
        raise SystemExit(f"sync_bn: {args.devices} devices requested but JAX sees {jax.device_count()}; run it in a "
                         f"fresh process or set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
    result = run(args.devices, args.steps, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_bn.json").write_text(json.dumps(result, indent=2))
    print(f"{args.devices} devices x {64 // args.devices} examples vs 1 device x 64, {args.steps} SGD steps:")
    for k, v in result["max_abs_diff"].items():
        print(f"  max |sharded - single| {k:12s} {v:.2e}")
    return 0


def run(devices: int, steps: int, seed: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P
    from sklearn.datasets import make_circles

    from jaxnorm import linen as jl

    class Net(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x, train: bool):
            x = jl.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(nn.Dense(32)(x))
            return nn.Dense(2)(nn.relu(x))

    x_all, y_all = make_circles(n_samples=64 * steps, noise=0.1, factor=0.4, random_state=seed)
    x_all, y_all = x_all.astype(np.float32).reshape(steps, 64, 2), y_all.astype(np.int32).reshape(steps, 64)
    tx = optax.sgd(0.1)
    v = Net().init(jax.random.key(seed), jnp.asarray(x_all[0]), train=False)

    def step(model, reduce, params, bs, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
            return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

    mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
    sharded = jax.jit(jax.shard_map(
        lambda *a: step(Net(axis_name="batch"), lambda t: jax.lax.pmean(t, "batch"), *a), mesh=mesh,
        in_specs=(P(), P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P(), P())))
    single = jax.jit(lambda *a: step(Net(), lambda t: t, *a))
    a = b = (v["params"], v["batch_stats"], tx.init(v["params"]))
    diffs = {"params": 0.0, "batch_stats": 0.0, "loss": 0.0}
    for i in range(steps):
        *a, loss_a = sharded(*a, x_all[i], y_all[i])
        *b, loss_b = single(*b, x_all[i], y_all[i])
        for key, ta, tb in (("params", a[0], b[0]), ("batch_stats", a[1], b[1]), ("loss", loss_a, loss_b)):
            d = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(ta), jax.tree.leaves(tb),
                                                                      strict=True))
            diffs[key] = max(diffs[key], d)
    return {"devices": devices, "steps": steps, "global_batch": 64, "max_abs_diff": diffs,
            "final_loss": float(loss_b), "count": int(b[1]["BatchNorm_0"]["count"])}
