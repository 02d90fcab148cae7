"""The momentum conventions, resolved in one place for every wrapper.

PyTorch's ``momentum=0.1`` is the weight of the NEW batch; Flax's ``momentum=0.99`` is the decay of the OLD
average, and Flax updates the running variance with the biased batch variance where PyTorch uses the unbiased
one. ``flax_momentum`` therefore selects Flax's whole update rule. The wrappers have no field called plain
``momentum``: a Flax user writing ``BatchNorm(momentum=0.99)``
gets a TypeError instead of a silently wrong model, and must say which convention is meant.
"""

from __future__ import annotations

_TORCH_DEFAULT = 0.1


def resolve_momentum(torch_momentum: float | None, flax_momentum: float | None, layer: str) -> float | None:
    """Return the functional API's momentum (PyTorch convention; None = cumulative average)."""
    if flax_momentum is None:
        return torch_momentum
    if torch_momentum != _TORCH_DEFAULT:
        raise ValueError(
            f"{layer}: give either `torch_momentum` (weight of the new batch) or `flax_momentum` (decay of the old "
            f"average), not both; got torch_momentum={torch_momentum!r}, flax_momentum={flax_momentum!r}."
        )
    if isinstance(flax_momentum, bool) or not 0.0 <= flax_momentum <= 1.0:
        raise ValueError(f"{layer}: `flax_momentum` must be in [0, 1], got {flax_momentum!r} (Flax's default is 0.99).")
    return 1.0 - float(flax_momentum)


def resolve_training(use_running_average: bool | None, call_value: bool | None, layer: str) -> bool:
    """Flax's merge of the field and the call argument; returns ``training = not use_running_average``."""
    value = call_value if call_value is not None else use_running_average
    if value is None:
        raise ValueError(
            f"{layer}: no `use_running_average` was given. Pass it to the constructor or to the call, e.g. "
            f"{layer}(use_running_average=not train) or layer(x, use_running_average=not train)."
        )
    return not value
