"""jaxnorm: normalization layers for JAX as pure functions over explicit state, with Flax wrappers.

Functional API (pure, jit/vmap/grad-safe); state is plain dicts that drop into Flax's
"params" / "batch_stats" collections. The docs site (docs/) gives the PyTorch and Flax mappings and tolerances.
"""

from jaxnorm import kernels  # noqa: F401  (jaxnorm.kernels: opt-in Pallas kernels)
from jaxnorm._batch_norm import batch_norm, batch_norm_init
from jaxnorm._group_norm import group_norm, group_norm_init
from jaxnorm._instance_norm import instance_norm, instance_norm_init
from jaxnorm._layer_norm import layer_norm, layer_norm_init, rms_norm, rms_norm_init
from jaxnorm._local_response_norm import local_response_norm
from jaxnorm._variants import batch_renorm, fold, fold_variables, frozen_batch_norm
from jaxnorm._weight_norms import spectral_norm, weight_norm

__version__ = "0.1.0"

__all__ = [
    "batch_norm",
    "batch_renorm",
    "fold",
    "fold_variables",
    "frozen_batch_norm",
    "batch_norm_init",
    "group_norm",
    "group_norm_init",
    "instance_norm",
    "instance_norm_init",
    "layer_norm",
    "layer_norm_init",
    "local_response_norm",
    "rms_norm",
    "rms_norm_init",
    "spectral_norm",
    "weight_norm",
]
