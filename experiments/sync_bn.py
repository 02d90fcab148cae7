"""sync_bn: data-parallel training with synchronized BatchNorm on simulated devices vs one device.

Command: ``python -m experiments sync_bn [--devices 8] [--steps 50] [--out results]``
         ``python -m experiments sync_bn --processes 2 [--devices 2] [--steps 20]``
Runtime: about 10 s on a 2-core CPU (about 30 s with two processes).
What it does: trains the same small jaxnorm Flax MLP (Dense -> BatchNorm -> ReLU -> Dense) on two-circles data
twice: (a) ``jax.shard_map`` over a mesh of simulated CPU devices, the global batch of 64 split across them, with
``BatchNorm(axis_name="batch")`` and the loss averaged with ``pmean``; (b) one device on the whole batch.
Expected: after every step the parameters, running statistics and losses agree to float32 rounding (max |diff|
around 1e-6 or below), i.e. sharded training is the global-batch computation.

With ``--processes P`` it starts P processes on this machine, each with ``--devices`` simulated CPU devices, joined
by ``jax.distributed.initialize`` on 127.0.0.1 (a free port; gloo collectives), and trains on the global mesh of
P x devices in two ways: (a) ``shard_map`` with ``BatchNorm(axis_name="batch")`` as above, and (b) plain ``jit``
over a global ``NamedSharding`` (the batch split across every process's devices, BatchNorm without
``axis_name``: XLA reduces the statistics across processes itself). Each process also trains one local device
on the whole global batch; process 0 prints the largest differences as JSON. On real hosts, run
``python -m experiments sync_bn --processes N --devices D --worker i --coordinator HOST:PORT`` on each host i.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

GLOBAL_BATCH = 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments sync_bn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    parser.add_argument("--processes", type=int, default=1, help="JAX processes on this machine (jax.distributed)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the processes are stopped")
    parser.add_argument("--worker", type=int, default=None, metavar="ID",
                        help="run as process ID of --processes (started for you locally; on real hosts run one "
                             "per host with --coordinator)")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="the coordinator's address for --worker (process 0 listens there)")
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)  # local runs: 127.0.0.1:PORT
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    if args.worker is not None:
        if args.coordinator is None and args.port is None:
            parser.error("--worker needs --coordinator HOST:PORT")
        return _worker(args)
    if args.processes > 1:
        devices = args.devices if "--devices" in (argv if argv is not None else sys.argv) else 2
        result = run_processes(args.processes, devices, args.steps, args.seed, args.timeout)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sync_bn_processes.json").write_text(json.dumps(result, indent=2))
        print(f"{args.processes} processes x {devices} devices, global batch {result['global_batch']}, "
              f"{args.steps} SGD steps, vs 1 device on the global batch:")
        for way, diffs in result["max_abs_diff"].items():
            print(f"  {way}: " + ", ".join(f"max |diff| {k} {v:.2e}" for k, v in diffs.items()))
        return 0

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


def _problem(steps: int, seed: int):
    """The model class, the train step, the optimizer and the data (steps x GLOBAL_BATCH two-circles points)."""
    import flax.linen as nn
    import jax
    import numpy as np
    import optax
    from sklearn.datasets import make_circles

    from jaxnorm import linen as jl

    class Net(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x, train: bool):
            x = jl.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(nn.Dense(32)(x))
            return nn.Dense(2)(nn.relu(x))

    x_all, y_all = make_circles(n_samples=GLOBAL_BATCH * steps, noise=0.1, factor=0.4, random_state=seed)
    x_all = x_all.astype(np.float32).reshape(steps, GLOBAL_BATCH, 2)
    y_all = y_all.astype(np.int32).reshape(steps, GLOBAL_BATCH)
    tx = optax.sgd(0.1)

    def step(model, reduce, params, bs, opt, x, y):
        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"])
            return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt, loss

    return Net, step, tx, x_all, y_all


def _max_diff(a, b) -> float:
    """Largest |a - b| over two pytrees; global arrays are read from this process's first replica."""
    import jax
    import numpy as np

    local = lambda t: np.asarray(t.addressable_data(0) if hasattr(t, "addressable_data") else t)
    return max(float(np.max(np.abs(local(p) - local(q))))
               for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def run(devices: int, steps: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    Net, step, tx, x_all, y_all = _problem(steps, seed)
    v = Net().init(jax.random.key(seed), jnp.asarray(x_all[0]), train=False)
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
            diffs[key] = max(diffs[key], _max_diff(ta, tb))
    return {"devices": devices, "steps": steps, "global_batch": GLOBAL_BATCH, "max_abs_diff": diffs,
            "final_loss": float(loss_b), "count": int(b[1]["BatchNorm_0"]["count"])}


# ------------------------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(processes: int, devices: int, steps: int, seed: int, timeout: float = 300.0) -> dict:
    """Start ``processes`` JAX processes here (``devices`` CPU devices each) and return process 0's report."""
    if GLOBAL_BATCH % (processes * devices):
        raise ValueError(f"sync_bn: the global batch of {GLOBAL_BATCH} must split evenly over {processes} processes "
                         f"x {devices} devices; choose processes x devices among 1, 2, 4, 8, 16, 32, 64.")
    port = _free_port()
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    env.pop("XLA_FLAGS", None)  # each worker sets its own device count
    command = [sys.executable, "-m", "experiments.sync_bn", "--processes", str(processes), "--devices", str(devices),
               "--steps", str(steps), "--seed", str(seed), "--port", str(port)]
    workers = [subprocess.Popen([*command, "--worker", str(i)], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(processes)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for w in workers:
            outputs.append(w.communicate(timeout=max(deadline - time.monotonic(), 1.0)))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"sync_bn: the {processes} processes did not finish within {timeout:.0f} s "
                           "(raise --timeout on a slow machine)") from None
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    failed = [(i, w.returncode, err) for i, (w, (_, err)) in enumerate(zip(workers, outputs, strict=True))
              if w.returncode]
    if failed:
        i, code, err = failed[0]
        raise RuntimeError(f"sync_bn: process {i} exited with code {code}; its last output:\n{err[-3000:]}")
    report = [line for line in outputs[0][0].splitlines() if line.startswith("{")]
    return json.loads(report[-1])


def _worker(args) -> int:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", args.devices)
    address = args.coordinator or f"127.0.0.1:{args.port}"
    jax.distributed.initialize(coordinator_address=address, num_processes=args.processes,
                               process_id=args.worker, initialization_timeout=120)
    try:
        result = _multiprocess_training(args.steps, args.seed)
        if jax.process_index() == 0:
            print(json.dumps(result), flush=True)
    finally:
        jax.distributed.shutdown()
    return 0


def _multiprocess_training(steps: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    Net, step, tx, x_all, y_all = _problem(steps, seed)
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    local_device = jax.local_devices()[0]
    v = Net().init(jax.random.key(seed), jnp.asarray(x_all[0]), train=False)  # on this process's first device
    state0 = (v["params"], v["batch_stats"], tx.init(v["params"]))

    def global_array(a, sharding):  # every process holds the whole array; each device takes its part
        a = jax.device_get(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    shard_mapped = jax.jit(jax.shard_map(
        lambda *a: step(Net(axis_name="batch"), lambda t: jax.lax.pmean(t, "batch"), *a), mesh=mesh,
        in_specs=(P(), P(), P(), P("batch"), P("batch")), out_specs=(P(), P(), P(), P())))
    global_jit = jax.jit(lambda *a: step(Net(), lambda t: t, *a), out_shardings=replicated)
    single = jax.jit(lambda *a: step(Net(), lambda t: t, *a))
    ways = {"shard_map": shard_mapped, "jit over NamedSharding": global_jit}
    states = {way: jax.tree.map(lambda t: global_array(t, replicated), state0) for way in ways}
    ref = jax.device_put(state0, local_device)
    diffs = {way: {"params": 0.0, "batch_stats": 0.0, "loss": 0.0} for way in ways}
    for i in range(steps):
        *ref, loss_ref = single(*ref, jax.device_put(x_all[i], local_device), jax.device_put(y_all[i], local_device))
        x, y = global_array(x_all[i], batch), global_array(y_all[i], batch)
        for way, fn in ways.items():
            *new, loss = fn(*states[way], x, y)
            states[way] = tuple(new)
            for key, a, b in (("params", new[0], ref[0]), ("batch_stats", new[1], ref[1]), ("loss", loss, loss_ref)):
                diffs[way][key] = max(diffs[way][key], _max_diff(a, b))
    return {"processes": jax.process_count(), "devices": jax.device_count(), "steps": steps,
            "global_batch": GLOBAL_BATCH, "max_abs_diff": diffs, "final_loss": float(loss_ref),
            "count": int(ref[1]["BatchNorm_0"]["count"])}


if __name__ == "__main__":
    sys.exit(main())
