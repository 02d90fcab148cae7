"""The whole-model run: a torchvision ResNet-18 ported to Flax, with jaxnorm's BatchNorm and with
``flax.linen.BatchNorm``, against the same model in PyTorch, all from the same weights; training steps and eval
calls, interleaved."""

from __future__ import annotations

import functools
import statistics

from experiments.benchmark.timing import SETTLE_S, interleaved_times, per_round


def _model_fns(norm, torch_model, image, batch, quick):
    """(train_step, eval_step, sync) for the Flax ResNet with ``norm``, starting from ``torch_model``'s weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from experiments import models
    from jaxnorm import interop

    stages = (1, 1, 1, 1) if quick else (2, 2, 2, 2)
    model = models.ResNet(stage_sizes=stages, num_classes=10, norm=norm)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    state_dict = torch_model.state_dict()
    if norm is models.flax_batch_norm:  # flax's BatchNorm keeps no count
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    names = interop.derive_names(state_dict, model, x[:1])
    variables = jax.tree.map(jnp.asarray, interop.torch_to_flax(state_dict, names))
    tx = optax.sgd(0.01, momentum=0.9)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, y):
        params, batch_stats, opt_state = state

        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

        grads, batch_stats = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    holder = {"state": (variables["params"], variables["batch_stats"], tx.init(variables["params"]))}

    def train():
        holder["state"] = train_step(holder["state"], x, y)
        return holder["state"]

    def eval_():
        params, batch_stats, _ = holder["state"]
        return evaluate({"params": params, "batch_stats": batch_stats}, x)

    return train, eval_


def _torch_model_fns(torch_model, image, batch):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch, 3, image, image)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.01, momentum=0.9)

    def train():
        torch_model.train()
        loss = torch.nn.functional.cross_entropy(torch_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_():
        torch_model.eval()
        with torch.no_grad():
            return torch_model(x)

    return train, eval_


def run_model(model_name: str, runs: int, with_torch: bool, quick: bool, settle: float = SETTLE_S) -> dict:
    """Training steps and eval calls per second of a whole model, jaxnorm vs Flax vs PyTorch, interleaved."""
    import jax
    import torch

    from experiments import models

    if model_name != "resnet18":
        raise ValueError(f"unknown --model {model_name!r}; choose resnet18")
    image, batch = (32, 4) if quick else (64, 32)
    torchvision = models.torchvision_models()
    torch.manual_seed(0)
    torch_model = (torchvision.ResNet(torchvision.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10) if quick
                   else torchvision.resnet18(num_classes=10))
    sync = lambda out: jax.block_until_ready(out)
    fns = {}
    for impl, norm in (("jaxnorm", models.jaxnorm_batch_norm), ("flax", models.flax_batch_norm)):
        train, eval_ = _model_fns(norm, torch_model, image, batch, quick)
        fns[(impl, "train")], fns[(impl, "eval")] = (train, sync), (eval_, sync)
    if with_torch:
        train, eval_ = _torch_model_fns(torch_model, image, batch)
        fns[("torch", "train")], fns[("torch", "eval")] = (train, lambda out: out), (eval_, lambda out: out)
    times = interleaved_times(fns, runs, settle)
    row = {"model": model_name + (" (quick: 1 block per stage)" if quick else ""), "image": image, "batch": batch,
           "runs": runs}
    for (impl, mode), ts in times.items():
        row.setdefault(impl, {})[f"{mode}_ms"] = statistics.median(ts)
        row[impl][f"{mode}_per_s"] = 1e3 / statistics.median(ts)
    for mode in ("train", "eval"):
        for peer in ("flax", "torch"):
            if (peer, mode) in times:  # time ratio: < 1 means jaxnorm is faster
                row[f"{mode}_time/{peer}"] = per_round(times[("jaxnorm", mode)], times[(peer, mode)])
    return row
