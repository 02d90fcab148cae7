"""NNX and Equinox twins of the four PyTorch architectures of tests/test_models.py, built from jaxnorm layers.

Each twin declares its modules in the torch model's order (NNX: the order of the attribute assignments; Equinox:
the order of the fields), so ``interop.derive_names`` pairs them without a hand-written mapping. NNX twins take
channels-last inputs, as the linen ones do; Equinox twins take one channels-first example, under ``jax.vmap``
with ``axis_name="batch"``, as equinox.nn does.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxnorm import equinox as je
from jaxnorm import linen as jl
from jaxnorm import nnx as jn

AXIS = "batch"


def _keys(key, n):
    return list(jax.random.split(key, n))


def _per_position(layer, x):
    """An Equinox Linear (one vector in) applied at every position of ``x`` (..., features)."""
    flat = x.reshape(-1, x.shape[-1])
    return jax.vmap(layer)(flat).reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------------- ResNet-18


class NNXBasicBlock(nnx.Module):
    def __init__(self, cin, cout, stride, rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs)
        self.bn1 = jn.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = jn.BatchNorm(cout, rngs=rngs)
        self.downsample = (nnx.Sequential(nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs),
                                          jn.BatchNorm(cout, rngs=rngs)) if stride != 1 or cin != cout else None)

    def __call__(self, x):
        y = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x)))))
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class NNXResNet18(nnx.Module):
    def __init__(self, num_classes, rngs):
        self.conv1 = nnx.Conv(3, 64, (7, 7), strides=2, padding=3, use_bias=False, rngs=rngs)
        self.bn1 = jn.BatchNorm(64, rngs=rngs)
        for i, width in enumerate((64, 128, 256, 512)):
            cin = 64 if i == 0 else width // 2
            setattr(self, f"layer{i + 1}", nnx.List([NNXBasicBlock(cin, width, 1 if i == 0 else 2, rngs),
                                                     NNXBasicBlock(width, width, 1, rngs)]))
        self.fc = nnx.Linear(512, num_classes, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


class EqxBasicBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: je.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: je.BatchNorm
    downsample: tuple | None

    def __init__(self, cin, cout, stride, key):
        k = _keys(key, 3)
        self.conv1 = eqx.nn.Conv2d(cin, cout, 3, stride, padding=1, use_bias=False, key=k[0])
        self.bn1 = je.BatchNorm(cout, AXIS)
        self.conv2 = eqx.nn.Conv2d(cout, cout, 3, padding=1, use_bias=False, key=k[1])
        self.bn2 = je.BatchNorm(cout, AXIS)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = (eqx.nn.Conv2d(cin, cout, 1, stride, use_bias=False, key=k[2]), je.BatchNorm(cout, AXIS))

    def __call__(self, x, state):
        y, state = self.bn1(self.conv1(x), state)
        y, state = self.bn2(self.conv2(jax.nn.relu(y)), state)
        if self.downsample is not None:
            x, state = self.downsample[1](self.downsample[0](x), state)
        return jax.nn.relu(y + x), state


class EqxResNet18(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: je.BatchNorm
    layer1: list
    layer2: list
    layer3: list
    layer4: list
    fc: eqx.nn.Linear

    def __init__(self, num_classes, key):
        k = _keys(key, 10)
        self.conv1 = eqx.nn.Conv2d(3, 64, 7, 2, padding=3, use_bias=False, key=k[0])
        self.bn1 = je.BatchNorm(64, AXIS)
        layers = []
        for i, width in enumerate((64, 128, 256, 512)):
            cin = 64 if i == 0 else width // 2
            layers.append([EqxBasicBlock(cin, width, 1 if i == 0 else 2, k[1 + 2 * i]),
                           EqxBasicBlock(width, width, 1, k[2 + 2 * i])])
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = eqx.nn.Linear(512, num_classes, key=k[9])

    def __call__(self, x, state):
        x, state = self.bn1(self.conv1(x), state)
        x = eqx.nn.MaxPool2d(3, 2, padding=1)(jax.nn.relu(x))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x, state = block(x, state)
        return self.fc(jnp.mean(x, axis=(1, 2))), state


# ------------------------------------------------------------------------------------------- ConvNeXt


class NNXCNBlock(nnx.Module):
    """torchvision's CNBlock: depthwise 7x7 conv, LayerNorm over channels, MLP, layer scale, residual."""

    def __init__(self, dim, rngs):
        self.conv = nnx.Conv(dim, dim, (7, 7), padding=3, feature_group_count=dim, rngs=rngs)
        self.norm = jn.LayerNorm(dim, epsilon=1e-6, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)
        self.layer_scale = nnx.Param(jnp.full((dim, 1, 1), 1e-6, jnp.float32))  # torch's shape, converted as it is

    def __call__(self, x):
        y = self.fc2(jax.nn.gelu(self.fc1(self.norm(self.conv(x))), approximate=False))
        return x + y * self.layer_scale[...].reshape(1, 1, 1, -1)


class NNXConvNeXt(nnx.Module):
    def __init__(self, d0, d1, rngs):
        self.stem = nnx.Conv(3, d0, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.stem_norm = jn.LayerNorm(d0, epsilon=1e-6, rngs=rngs)
        self.block1 = NNXCNBlock(d0, rngs)
        self.down_norm = jn.LayerNorm(d0, epsilon=1e-6, rngs=rngs)
        self.down = nnx.Conv(d0, d1, (2, 2), strides=2, padding="VALID", rngs=rngs)
        self.block2 = NNXCNBlock(d1, rngs)
        self.head_norm = jn.LayerNorm(d1, epsilon=1e-6, rngs=rngs)
        self.head = nnx.Linear(d1, 10, rngs=rngs)

    def __call__(self, x):
        x = self.block1(self.stem_norm(self.stem(x)))
        x = self.block2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(jnp.mean(x, axis=(1, 2))))


class EqxCNBlock(eqx.Module):
    conv: eqx.nn.Conv2d
    norm: je.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    layer_scale: jax.Array

    def __init__(self, dim, key):
        k = _keys(key, 3)
        self.conv = eqx.nn.Conv2d(dim, dim, 7, padding=3, groups=dim, key=k[0])
        self.norm = je.LayerNorm(dim, eps=1e-6)
        self.fc1 = eqx.nn.Linear(dim, 4 * dim, key=k[1])
        self.fc2 = eqx.nn.Linear(4 * dim, dim, key=k[2])
        self.layer_scale = jnp.full((dim, 1, 1), 1e-6)  # torch's shape

    def __call__(self, x):
        y = jnp.transpose(self.conv(x), (1, 2, 0))  # as torch's block: (H, W, C) for the norm and the MLP
        y = _per_position(self.fc2, jax.nn.gelu(_per_position(self.fc1, self.norm(y)), approximate=False))
        return x + jnp.transpose(y, (2, 0, 1)) * self.layer_scale


class EqxChannelNorm(eqx.Module):
    """torchvision's LayerNorm2d for one (C, H, W) example: a LayerNorm over C at every position."""

    norm: je.LayerNorm

    def __call__(self, x):
        return jnp.transpose(self.norm(jnp.transpose(x, (1, 2, 0))), (2, 0, 1))


class EqxConvNeXt(eqx.Module):
    stem: eqx.nn.Conv2d
    stem_norm: EqxChannelNorm
    block1: EqxCNBlock
    down_norm: EqxChannelNorm
    down: eqx.nn.Conv2d
    block2: EqxCNBlock
    head_norm: je.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, d0, d1, key):
        k = _keys(key, 5)
        self.stem = eqx.nn.Conv2d(3, d0, 4, 4, key=k[0])
        self.stem_norm = EqxChannelNorm(je.LayerNorm(d0, eps=1e-6))
        self.block1 = EqxCNBlock(d0, k[1])
        self.down_norm = EqxChannelNorm(je.LayerNorm(d0, eps=1e-6))
        self.down = eqx.nn.Conv2d(d0, d1, 2, 2, key=k[2])
        self.block2 = EqxCNBlock(d1, k[3])
        self.head_norm = je.LayerNorm(d1, eps=1e-6)
        self.head = eqx.nn.Linear(d1, 10, key=k[4])

    def __call__(self, x):
        x = self.block1(self.stem_norm(self.stem(x)))
        x = self.block2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(jnp.mean(x, axis=(1, 2))))


# ------------------------------------------------------------------------------------------- Transformer


def _attention(in_proj, out_proj, x, nhead, project):
    length, d = x.shape[-2:]
    q, k, v = (t.reshape(*t.shape[:-1], nhead, d // nhead) for t in jnp.split(project(in_proj, x), 3, axis=-1))
    weights = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(d // nhead), axis=-1)
    return project(out_proj, jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*x.shape[:-2], length, d))


def _encoder_layer(layer, x, project):
    """torch's TransformerEncoderLayer forward (ReLU, no dropout), post-norm or pre-norm; ``project(linear, x)``
    applies one of the layer's linears at every position (NNX's take any leading dims, Equinox's one vector)."""
    attention = lambda x: _attention(layer.in_proj, layer.out_proj, x, layer.nhead, project)
    feed_forward = lambda x: project(layer.linear2, jax.nn.relu(project(layer.linear1, x)))
    if layer.norm_first:
        x = x + attention(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + attention(x))
    return layer.norm2(x + feed_forward(x))


class NNXEncoderLayer(nnx.Module):
    """torch.nn.TransformerEncoderLayer (batch_first, ReLU, no dropout), declared in torch's order."""

    def __init__(self, d_model, nhead, dim_feedforward, norm_first, rngs):
        self.in_proj = nnx.Linear(d_model, 3 * d_model, rngs=rngs)  # torch's self_attn.in_proj_weight, renamed
        self.out_proj = nnx.Linear(d_model, d_model, rngs=rngs)
        self.linear1 = nnx.Linear(d_model, dim_feedforward, rngs=rngs)
        self.linear2 = nnx.Linear(dim_feedforward, d_model, rngs=rngs)
        self.norm1 = jn.LayerNorm(d_model, rngs=rngs)
        self.norm2 = jn.LayerNorm(d_model, rngs=rngs)
        self.nhead, self.norm_first = nhead, norm_first

    def __call__(self, x):
        return _encoder_layer(self, x, lambda linear, v: linear(v))


class EqxEncoderLayer(eqx.Module):
    in_proj: eqx.nn.Linear
    out_proj: eqx.nn.Linear
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    norm1: je.LayerNorm
    norm2: je.LayerNorm
    nhead: int = eqx.field(static=True)
    norm_first: bool = eqx.field(static=True)

    def __init__(self, d_model, nhead, dim_feedforward, norm_first, key):
        k = _keys(key, 4)
        self.in_proj = eqx.nn.Linear(d_model, 3 * d_model, key=k[0])
        self.out_proj = eqx.nn.Linear(d_model, d_model, key=k[1])
        self.linear1 = eqx.nn.Linear(d_model, dim_feedforward, key=k[2])
        self.linear2 = eqx.nn.Linear(dim_feedforward, d_model, key=k[3])
        self.norm1, self.norm2 = je.LayerNorm(d_model), je.LayerNorm(d_model)
        self.nhead, self.norm_first = nhead, norm_first

    def __call__(self, x):  # one sequence (L, d_model)
        return _encoder_layer(self, x, _per_position)


# ------------------------------------------------------------------------------------------- diffusion UNet


class NNXResBlock(nnx.Module):
    def __init__(self, cin, cout, temb, rngs, groups=8):
        self.norm1 = jn.GroupNorm(cin, num_groups=groups, epsilon=1e-6, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), padding=1, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb, cout, rngs=rngs)
        self.norm2 = jn.GroupNorm(cout, num_groups=groups, epsilon=1e-6, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, rngs=rngs)
        self.conv_shortcut = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class NNXUNetStage(nnx.Module):
    def __init__(self, rngs):
        self.resnets = nnx.List([NNXResBlock(16, 32, 24, rngs), NNXResBlock(32, 32, 24, rngs)])

    def __call__(self, x, temb):
        for block in self.resnets:
            x = block(x, temb)
        return x


class EqxResBlock(eqx.Module):
    norm1: je.GroupNorm
    conv1: eqx.nn.Conv2d
    time_emb_proj: eqx.nn.Linear
    norm2: je.GroupNorm
    conv2: eqx.nn.Conv2d
    conv_shortcut: eqx.nn.Conv2d | None

    def __init__(self, cin, cout, temb, key, groups=8):
        k = _keys(key, 4)
        self.norm1, self.conv1 = je.GroupNorm(groups, cin, eps=1e-6), eqx.nn.Conv2d(cin, cout, 3, padding=1, key=k[0])
        self.time_emb_proj = eqx.nn.Linear(temb, cout, key=k[1])
        self.norm2 = je.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = eqx.nn.Conv2d(cout, cout, 3, padding=1, key=k[2])
        self.conv_shortcut = eqx.nn.Conv2d(cin, cout, 1, key=k[3]) if cin != cout else None

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class EqxUNetStage(eqx.Module):
    resnets: list

    def __init__(self, key):
        k = _keys(key, 2)
        self.resnets = [EqxResBlock(16, 32, 24, k[0]), EqxResBlock(32, 32, 24, k[1])]

    def __call__(self, x, temb):
        for block in self.resnets:
            x = block(x, temb)
        return x


# ------------------------------------------------------------------------------------------- a small network
# tests/test_compare.py's TorchNet (conv, BatchNorm2d, conv, GroupNorm, Linear, LayerNorm, Linear), with faults to
# inject: a LayerNorm epsilon, a group count, and bn: "torch" (right), "flax_momentum" (flax_momentum=0.1 where
# torch_momentum=0.1 was meant) or "no_count" (Flax's own BatchNorm with momentum 0.9: no num_batches_tracked;
# jaxnorm.equinox layers always keep a count, so the Equinox twin is the right one there)


class FlaxNet(nn.Module):
    ln_eps: float = 1e-5
    groups: int = 4
    bn: str = "torch"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        if self.bn == "no_count":
            bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
        else:
            bn = jl.BatchNorm(use_running_average=not train, **({"flax_momentum": 0.1} if self.bn != "torch" else {}))
        x = nn.relu(bn(x))
        x = nn.Conv(8, (3, 3), padding="VALID")(x)
        x = nn.relu(jl.GroupNorm(num_groups=self.groups)(x))
        x = nn.Dense(16)(jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1))
        x = nn.relu(jl.LayerNorm(epsilon=self.ln_eps)(x))  # one module per statement: created in torch's order
        return nn.Dense(5)(x)


class NNXNet(nnx.Module):
    def __init__(self, ln_eps=1e-5, groups=4, bn="torch"):
        rngs = nnx.Rngs(0)
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
        self.bn = (nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs) if bn == "no_count" else
                   jn.BatchNorm(8, rngs=rngs, **({"flax_momentum": 0.1} if bn != "torch" else {})))
        self.conv2 = nnx.Conv(8, 8, (3, 3), padding="VALID", rngs=rngs)
        self.gn = jn.GroupNorm(8, num_groups=groups, rngs=rngs)
        self.fc1 = nnx.Linear(128, 16, rngs=rngs)
        self.ln = jn.LayerNorm(16, epsilon=ln_eps, rngs=rngs)
        self.fc2 = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.gn(self.conv2(jax.nn.relu(self.bn(self.conv1(x))))))
        x = self.fc1(jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1))
        return self.fc2(jax.nn.relu(self.ln(x)))


class EqxNet(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn: je.BatchNorm
    conv2: eqx.nn.Conv2d
    gn: je.GroupNorm
    fc1: eqx.nn.Linear
    ln: je.LayerNorm
    fc2: eqx.nn.Linear

    def __init__(self, ln_eps=1e-5, groups=4, bn="torch"):
        k = jax.random.split(jax.random.key(0), 4)
        f32 = {"dtype": jnp.float32}
        self.conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k[0], **f32)
        self.bn = je.BatchNorm(8, "batch", **({"flax_momentum": 0.1} if bn == "flax_momentum" else {}), **f32)
        self.conv2 = eqx.nn.Conv2d(8, 8, 3, key=k[1], **f32)
        self.gn = je.GroupNorm(groups, 8, **f32)
        self.fc1 = eqx.nn.Linear(128, 16, key=k[2], **f32)
        self.ln = je.LayerNorm(16, eps=ln_eps, **f32)
        self.fc2 = eqx.nn.Linear(16, 5, key=k[3], **f32)

    def __call__(self, x, state):
        x, state = self.bn(self.conv1(x), state)
        x = jax.nn.relu(self.gn(self.conv2(jax.nn.relu(x))))
        return self.fc2(jax.nn.relu(self.ln(self.fc1(x.reshape(-1))))), state


# ------------------------------------------------------------------------------------------- a small ViT
# torchvision's VisionTransformer: a class token on the root, a position embedding on the encoder, and
# nn.MultiheadAttention; converted with no hand-written step (bare parameters pair by name)


class NNXViTBlock(nnx.Module):
    def __init__(self, hidden, heads, mlp, rngs):
        self.ln_1 = jn.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)
        self.self_attention = nnx.MultiHeadAttention(heads, hidden, decode=False, rngs=rngs)
        self.ln_2 = jn.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)
        self.mlp = nnx.List([nnx.Linear(hidden, mlp, rngs=rngs), nnx.Linear(mlp, hidden, rngs=rngs)])

    def __call__(self, x):
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp[1](jax.nn.gelu(self.mlp[0](self.ln_2(x)), approximate=False))


class NNXViTEncoder(nnx.Module):
    def __init__(self, tokens, hidden, heads, mlp, rngs):
        self.pos_embedding = nnx.Param(jnp.zeros((1, tokens, hidden), jnp.float32))
        self.layers = nnx.List([NNXViTBlock(hidden, heads, mlp, rngs)])
        self.ln = jn.LayerNorm(hidden, epsilon=1e-6, rngs=rngs)

    def __call__(self, x):
        x = x + self.pos_embedding[...]
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


class NNXViTHeads(nnx.Module):
    def __init__(self, hidden, classes, rngs):
        self.head = nnx.Linear(hidden, classes, rngs=rngs)


class NNXViT(nnx.Module):
    """torchvision.models.VisionTransformer for NHWC images."""

    def __init__(self, rngs, image=16, patch=8, hidden=16, heads=2, mlp=32, classes=10):
        self.class_token = nnx.Param(jnp.zeros((1, 1, hidden), jnp.float32))
        self.conv_proj = nnx.Conv(3, hidden, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
        self.encoder = NNXViTEncoder((image // patch) ** 2 + 1, hidden, heads, mlp, rngs)
        self.heads = NNXViTHeads(hidden, classes, rngs)

    def __call__(self, x):
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, patches, hidden), patches row by row as torch's
        token = jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, x.shape[-1]))
        return self.heads.head(self.encoder(jnp.concatenate([token, x], 1))[:, 0])


class EqxViTBlock(eqx.Module):
    ln_1: je.LayerNorm
    self_attention: eqx.nn.MultiheadAttention
    ln_2: je.LayerNorm
    mlp: list

    def __init__(self, hidden, heads, mlp, key):
        k = _keys(key, 3)
        self.ln_1, self.ln_2 = je.LayerNorm(hidden, eps=1e-6), je.LayerNorm(hidden, eps=1e-6)
        self.self_attention = eqx.nn.MultiheadAttention(heads, hidden, use_query_bias=True, use_key_bias=True,
                                                        use_value_bias=True, use_output_bias=True, key=k[0])
        self.mlp = [eqx.nn.Linear(hidden, mlp, key=k[1]), eqx.nn.Linear(mlp, hidden, key=k[2])]

    def __call__(self, x):  # (tokens, hidden)
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h)
        return x + _per_position(self.mlp[1], jax.nn.gelu(_per_position(self.mlp[0], self.ln_2(x)), approximate=False))


class EqxViTEncoder(eqx.Module):
    pos_embedding: jax.Array
    layers: list
    ln: je.LayerNorm

    def __init__(self, tokens, hidden, heads, mlp, key):
        self.pos_embedding = jnp.zeros((1, tokens, hidden), jnp.float32)
        self.layers = [EqxViTBlock(hidden, heads, mlp, key)]
        self.ln = je.LayerNorm(hidden, eps=1e-6)

    def __call__(self, x):
        x = x + self.pos_embedding[0]
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


class EqxViTHeads(eqx.Module):
    head: eqx.nn.Linear


class EqxViT(eqx.Module):
    """torchvision.models.VisionTransformer for one (3, H, W) image."""

    class_token: jax.Array
    conv_proj: eqx.nn.Conv2d
    encoder: EqxViTEncoder
    heads: EqxViTHeads

    def __init__(self, key, image=16, patch=8, hidden=16, heads=2, mlp=32, classes=10):
        k = _keys(key, 3)
        self.class_token = jnp.zeros((1, 1, hidden), jnp.float32)
        self.conv_proj = eqx.nn.Conv2d(3, hidden, patch, stride=patch, key=k[0])
        self.encoder = EqxViTEncoder((image // patch) ** 2 + 1, hidden, heads, mlp, k[1])
        self.heads = EqxViTHeads(eqx.nn.Linear(hidden, classes, key=k[2]))

    def __call__(self, x):
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], -1).T  # (patches, hidden)
        x = self.encoder(jnp.concatenate([self.class_token[0], x], 0))
        return self.heads.head(x[0])


# ------------------------------------------------------------------------------------------- a small text model
# nn.Embedding, a TransformerEncoderLayer with its nn.MultiheadAttention as it is, and a head


class NNXTextEncoderLayer(nnx.Module):
    def __init__(self, d_model, nhead, dim_feedforward, rngs):  # torch's order: self_attn, linear1, linear2, norms
        self.self_attn = nnx.MultiHeadAttention(nhead, d_model, decode=False, rngs=rngs)
        self.linear1 = nnx.Linear(d_model, dim_feedforward, rngs=rngs)
        self.linear2 = nnx.Linear(dim_feedforward, d_model, rngs=rngs)
        self.norm1, self.norm2 = jn.LayerNorm(d_model, rngs=rngs), jn.LayerNorm(d_model, rngs=rngs)

    def __call__(self, x):
        x = self.norm1(x + self.self_attn(x))
        return self.norm2(x + self.linear2(jax.nn.relu(self.linear1(x))))


class NNXText(nnx.Module):
    def __init__(self, rngs, vocab=20, d_model=16, nhead=4, dim_feedforward=32, classes=3):
        self.embed = nnx.Embed(vocab, d_model, rngs=rngs)
        self.layer = NNXTextEncoderLayer(d_model, nhead, dim_feedforward, rngs)
        self.head = nnx.Linear(d_model, classes, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


class EqxTextEncoderLayer(eqx.Module):
    self_attn: eqx.nn.MultiheadAttention
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear
    norm1: je.LayerNorm
    norm2: je.LayerNorm

    def __init__(self, d_model, nhead, dim_feedforward, key):
        k = _keys(key, 3)
        self.self_attn = eqx.nn.MultiheadAttention(nhead, d_model, use_query_bias=True, use_key_bias=True,
                                                   use_value_bias=True, use_output_bias=True, key=k[0])
        self.linear1 = eqx.nn.Linear(d_model, dim_feedforward, key=k[1])
        self.linear2 = eqx.nn.Linear(dim_feedforward, d_model, key=k[2])
        self.norm1, self.norm2 = je.LayerNorm(d_model), je.LayerNorm(d_model)

    def __call__(self, x):  # (L, d_model)
        x = self.norm1(x + self.self_attn(x, x, x))
        return self.norm2(x + _per_position(self.linear2, jax.nn.relu(_per_position(self.linear1, x))))


class EqxText(eqx.Module):
    embed: eqx.nn.Embedding
    layer: EqxTextEncoderLayer
    head: eqx.nn.Linear

    def __init__(self, key, vocab=20, d_model=16, nhead=4, dim_feedforward=32, classes=3):
        k = _keys(key, 3)
        self.embed = eqx.nn.Embedding(vocab, d_model, key=k[0])
        self.layer = EqxTextEncoderLayer(d_model, nhead, dim_feedforward, k[1])
        self.head = eqx.nn.Linear(d_model, classes, key=k[2])

    def __call__(self, tokens):  # one sequence (L,)
        return self.head(self.layer(jax.vmap(self.embed)(tokens)).mean(0))


# ------------------------------------------------------------------------------------------- a UNet up block
# BatchNorm, a depthwise conv, a square ConvTranspose2d(16, 16, 4, stride=2, padding=1) and GroupNorm; Flax's
# padding for torch's (padding p, output_padding q) of a kernel k is (k - 1 - p, k - 1 - p + q) per side


class NNXUNetUp(nnx.Module):
    def __init__(self, rngs, c=16):
        self.norm = jn.BatchNorm(c, rngs=rngs)
        self.depthwise = nnx.Conv(c, c, (3, 3), padding=1, feature_group_count=c, rngs=rngs)
        self.up = nnx.ConvTranspose(c, c, (4, 4), strides=2, padding=((2, 2), (2, 2)), rngs=rngs)
        self.out_norm = jn.GroupNorm(c, num_groups=4, rngs=rngs)

    def __call__(self, x):
        return self.out_norm(self.up(jax.nn.silu(self.depthwise(self.norm(x)))))


class EqxUNetUp(eqx.Module):
    norm: je.BatchNorm
    depthwise: eqx.nn.Conv2d
    up: eqx.nn.ConvTranspose2d
    out_norm: je.GroupNorm

    def __init__(self, key, c=16):
        k = _keys(key, 2)
        self.norm = je.BatchNorm(c, axis_name=AXIS)
        self.depthwise = eqx.nn.Conv2d(c, c, 3, padding=1, groups=c, key=k[0])
        self.up = eqx.nn.ConvTranspose2d(c, c, 4, stride=2, padding=1, key=k[1])
        self.out_norm = je.GroupNorm(4, c)

    def __call__(self, x, state):  # one (C, H, W) example
        h, state = self.norm(x, state)
        return self.out_norm(self.up(jax.nn.silu(self.depthwise(h)))), state
