"""Whole PyTorch models ported to Flax models built from jaxnorm layers, end to end.

Each torch model is trained a few SGD steps (so weights and running statistics move), converted with
``jaxnorm.interop`` (the ``names`` mapping derived by ``derive_names``, never written by hand), and compared with
its Flax twin: eval outputs, training-mode outputs, loss, updated running statistics and ``num_batches_tracked``,
and every parameter gradient. The conversion is also checked to round-trip to the torch ``state_dict``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from jaxnorm import interop
from jaxnorm import linen as jl
from jaxnorm._tree import get_path, walk
from tests.tolerances import tol

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
tnn = torch.nn
MODEL_TOL = tol("float32", "model")


@pytest.fixture(autouse=True)
def float32_products():
    """The Flax twins' convolutions and matmuls in full float32, as PyTorch's on the CPU: on NVIDIA GPUs JAX's
    default is TF32 (about 1e-3 relative per product), which is the models' precision, not the norm layers'."""
    with jax.default_matmul_precision("highest"):
        yield


def torchvision_models():
    try:
        return models.torchvision_models()
    except ImportError as error:
        pytest.skip(f"{error}")


def assert_close(actual, expected, what: str, scale: float | None = None) -> None:
    """|actual - expected| <= atol * scale + rtol * |expected|, ``scale`` max|expected| unless given (a gradient's
    is its module's largest: a key projection's bias has a gradient of zero but for rounding)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max()) if scale is None else scale, 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=MODEL_TOL["rtol"], atol=MODEL_TOL["atol"] * scale,
                               err_msg=what)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, *range(2, a.ndim), 1)) if a.ndim >= 3 else a


def train_torch(module, make_inputs, loss_of, steps: int = 3, seed: int = 1) -> None:
    """A few SGD-with-momentum steps on random batches, so weights and running statistics move."""
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    module.train()
    for _ in range(steps):
        loss = loss_of(module(*make_inputs(rng)))
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_torch(torch_model, make_inputs):
    """Train ``torch_model`` a few steps on a fixed random loss; returns (weights, loss_of) of that loss."""
    rng = np.random.default_rng(0)
    torch_model.eval()  # a shape probe that must not count as a training batch
    with torch.no_grad():
        out_shape = torch_model(*[torch.from_numpy(a) for a in make_inputs(rng)]).shape
    weights = torch.from_numpy(rng.normal(size=tuple(out_shape)).astype(np.float32))
    loss_of = lambda out: (out * weights).sum() / out.shape[0]
    train_torch(torch_model, lambda r: [torch.from_numpy(a) for a in make_inputs(r)], loss_of)
    return weights, loss_of


def torch_outputs(torch_model, inputs, loss_of):
    """PyTorch's reference for ``inputs``: the eval output, then one training-mode forward (which moves the running
    statistics) and backward (which fills ``.grad``); returns (eval output, training output, loss)."""
    torch_model.eval()
    with torch.no_grad():
        t_eval = torch_model(*[torch.from_numpy(a) for a in inputs]).numpy()
    torch_model.train()
    t_out = torch_model(*[torch.from_numpy(a) for a in inputs])
    t_loss = loss_of(t_out)
    torch_model.zero_grad()
    t_loss.backward()
    return t_eval, t_out, t_loss


def check_port(torch_model, flax_model, make_inputs, *, channels_last_inputs=(), channels_first_output=False,
               rename=None, kinds=None):
    """Train, convert, compare. ``make_inputs(rng)`` gives torch-layout NumPy inputs; those whose index is in
    ``channels_last_inputs`` are moved to channels-last for Flax, and so is the output if
    ``channels_first_output``. ``rename`` maps state_dict keys interop does not
    know to keys it does."""
    weights, loss_of = trained_torch(torch_model, make_inputs)

    def to_flax_inputs(arrays):
        return [jnp.asarray(nhwc(a) if i in channels_last_inputs else a) for i, a in enumerate(arrays)]

    def state_dict():
        sd = {k: v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
        return {(rename or {}).get(k, k): v for k, v in sd.items()}

    layout = nhwc if channels_first_output else (lambda a: a)
    inputs = make_inputs(np.random.default_rng(2))
    x_flax = to_flax_inputs(inputs)
    sd = state_dict()
    names = interop.derive_names(sd, flax_model, *x_flax, kinds=kinds)
    variables = interop.torch_to_flax(sd, names, kinds=kinds)
    variables = jax.tree.map(jnp.asarray, variables)
    template = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), *x_flax))
    got = {path: (a.shape, a.dtype) for path, a in walk(variables)}
    want = {path: (a.shape, a.dtype) for path, a in walk(template)}
    assert got == want, {p: (got.get(p), want.get(p)) for p in got.keys() | want.keys() if got.get(p) != want.get(p)}
    back = interop.flax_to_torch(variables, names, kinds=kinds)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], value, err_msg=f"round trip of {key}")

    t_eval, t_out, t_loss = torch_outputs(torch_model, inputs, loss_of)
    f_eval = jax.jit(lambda v, *x: flax_model.apply(v, *x))(variables, *x_flax)
    assert_close(f_eval, layout(t_eval), "eval output")

    # one training-mode forward and backward
    w_flax = jnp.asarray(layout(weights.numpy()))
    mutable = ["batch_stats"] if "batch_stats" in variables else False

    @jax.jit
    def train_step(variables, *x):
        def loss(params):
            out = flax_model.apply({**variables, "params": params}, *x, train=True, mutable=mutable)
            out, updates = out if mutable else (out, {})
            return jnp.sum(out * w_flax) / out.shape[0], (out, updates)

        return jax.value_and_grad(loss, has_aux=True)(variables["params"])

    (f_loss, (f_out, updates)), grads = train_step(variables, *x_flax)
    assert_close(f_out, layout(t_out.detach().numpy()), "training-mode output")
    assert_close(f_loss, t_loss.item(), "loss")
    t_grads = interop.torch_to_flax(
        {(rename or {}).get(k, k): p.grad for k, p in torch_model.named_parameters() if (rename or {}).get(k, k) in sd},
        names, kinds=kinds)["params"]
    module_scale: dict[str, float] = {}
    for path, g in walk(t_grads):
        module = path.rpartition("/")[0]
        module_scale[module] = max(module_scale.get(module, 0.0), float(np.abs(np.asarray(g)).max()))
    for path, g in walk(t_grads):
        assert_close(get_path(grads, path), g, f"gradient of {path}", scale=module_scale[path.rpartition("/")[0]])
    if mutable:
        t_stats = interop.torch_to_flax(state_dict(), names, kinds=kinds)["batch_stats"]
        for path, s in walk(t_stats):
            if path.endswith("/count"):
                assert int(get_path(updates["batch_stats"], path)) == int(s) == 4, path
            else:
                assert_close(get_path(updates["batch_stats"], path), s, f"running statistic {path}")
    return names


# ------------------------------------------------------------------------------------------- a small CNN


class TorchNet(tnn.Module):
    """Conv2d, BatchNorm2d, Conv2d, GroupNorm, Linear, LayerNorm, Linear (tests/test_interop.py end to end,
    tests/test_compare.py's faults)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn = tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8)
        self.conv2, self.gn = tnn.Conv2d(8, 8, 3), tnn.GroupNorm(4, 8)
        self.fc1, self.ln, self.fc2 = tnn.Linear(8 * 4 * 4, 16), tnn.LayerNorm(16), tnn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        return self.fc2(torch.relu(self.ln(self.fc1(x.flatten(1)))))


def torch_net(num_batches_tracked: int = 0) -> TorchNet:
    """A seeded TorchNet with its norm parameters and running statistics away from their initial values."""
    torch.manual_seed(0)
    net = TorchNet()
    with torch.no_grad():
        for module in (net.bn, net.gn, net.ln):
            module.weight.add_(0.3 * torch.randn_like(module.weight))
            module.bias.add_(0.3 * torch.randn_like(module.bias))
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(num_batches_tracked)
    return net


# ------------------------------------------------------------------------------------------- ResNet


def test_torchvision_resnet18():
    """BatchNorm2d everywhere, downsample branches: torchvision's resnet18, 10 classes, 64x64 inputs."""
    torch.manual_seed(0)
    names = check_port(torchvision_models().resnet18(num_classes=10), models.ResNet18(num_classes=10),
                       lambda r: [r.normal(size=(4, 3, 64, 64)).astype(np.float32)], channels_last_inputs=(0,))
    assert names["layer2.0.downsample.1"] == "BasicBlock_2/BatchNorm_2"
    assert names["fc"] == "Dense_0" and len(names) == 41  # 20 conv, 20 BatchNorm, fc


# ------------------------------------------------------------------------------------------- ConvNeXt


class FlaxCNBlock(nn.Module):
    """torchvision's CNBlock: depthwise 7x7 conv, LayerNorm over channels, MLP, layer scale, residual."""

    dim: int

    @nn.compact
    def __call__(self, x):
        layer_scale = self.param("layer_scale", nn.initializers.constant(1e-6), (self.dim, 1, 1), jnp.float32)
        y = nn.Conv(self.dim, (7, 7), padding=3, feature_group_count=self.dim)(x)
        y = jl.LayerNorm(epsilon=1e-6)(y)
        y = nn.gelu(nn.Dense(4 * self.dim)(y), approximate=False)
        y = nn.Dense(self.dim)(y)
        return x + y * layer_scale.reshape(1, 1, 1, -1)


class FlaxConvNeXt(nn.Module):
    """Stem (4x4/4 conv, LayerNorm2d), CNBlock, downsample (LayerNorm2d, 2x2/2 conv), CNBlock, head."""

    dims: tuple[int, int] = (16, 32)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.dims[0], (4, 4), 4, padding="VALID")(x)
        x = jl.LayerNorm(epsilon=1e-6)(x)
        x = FlaxCNBlock(self.dims[0])(x)
        x = jl.LayerNorm(epsilon=1e-6)(x)
        x = nn.Conv(self.dims[1], (2, 2), 2, padding="VALID")(x)
        x = FlaxCNBlock(self.dims[1])(x)
        x = jl.LayerNorm(epsilon=1e-6)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(10)(x)


def test_convnext_style_blocks():
    """LayerNorm over channels (LayerNorm2d, and inside CNBlock after a permute), with torchvision's CNBlock."""
    convnext = torchvision_models().convnext
    torch.manual_seed(0)
    d0, d1 = 16, 32
    torch_model = tnn.Sequential(
        tnn.Sequential(tnn.Conv2d(3, d0, 4, 4), convnext.LayerNorm2d(d0, eps=1e-6)),
        convnext.CNBlock(d0, layer_scale=0.5, stochastic_depth_prob=0.0),
        tnn.Sequential(convnext.LayerNorm2d(d0, eps=1e-6), tnn.Conv2d(d0, d1, 2, 2)),
        convnext.CNBlock(d1, layer_scale=0.5, stochastic_depth_prob=0.0),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(1), tnn.LayerNorm(d1, eps=1e-6), tnn.Linear(d1, 10))
    names = check_port(torch_model, FlaxConvNeXt((d0, d1)),
                       lambda r: [r.normal(size=(4, 3, 32, 32)).astype(np.float32)], channels_last_inputs=(0,))
    assert names["0.1"] == "LayerNorm_0" and names["1.block.2"] == "FlaxCNBlock_0/LayerNorm_0"


# ------------------------------------------------------------------------------------------- Transformer


class FlaxEncoderLayer(nn.Module):
    """torch.nn.TransformerEncoderLayer (batch_first, ReLU, no dropout), declared in torch's order."""

    d_model: int
    nhead: int
    dim_feedforward: int
    norm_first: bool = False

    def setup(self):
        self.in_proj = nn.Dense(3 * self.d_model)  # torch's self_attn.in_proj_weight, renamed
        self.out_proj = nn.Dense(self.d_model)
        self.linear1 = nn.Dense(self.dim_feedforward)
        self.linear2 = nn.Dense(self.d_model)
        self.norm1 = jl.LayerNorm()
        self.norm2 = jl.LayerNorm()

    def attention(self, x):
        n, length, d = x.shape
        heads = lambda t: t.reshape(n, length, self.nhead, d // self.nhead)
        q, k, v = map(heads, jnp.split(self.in_proj(x), 3, axis=-1))
        weights = jax.nn.softmax(jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d // self.nhead), axis=-1)
        return self.out_proj(jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, length, d))

    def feed_forward(self, x):
        return self.linear2(nn.relu(self.linear1(x)))

    def __call__(self, x, train: bool = False):
        if self.norm_first:
            x = x + self.attention(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.feed_forward(x))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(0)
    torch_model = tnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    rename = {f"self_attn.in_proj_{leaf}": f"self_attn.in_proj.{leaf}" for leaf in ("weight", "bias")}
    names = check_port(torch_model, FlaxEncoderLayer(16, 4, 32, norm_first),
                       lambda r: [r.normal(size=(4, 6, 16)).astype(np.float32)], rename=rename)
    assert names == {"self_attn.in_proj": "in_proj", "self_attn.out_proj": "out_proj", "linear1": "linear1",
                     "linear2": "linear2", "norm1": "norm1", "norm2": "norm2"}


# ------------------------------------------------------------------------------------------- diffusion UNet


class TorchResBlock(tnn.Module):
    """A diffusion-UNet residual block (as diffusers' ResnetBlock2D): GroupNorm, SiLU, conv, time embedding."""

    def __init__(self, cin, cout, temb, groups=8):
        super().__init__()
        self.norm1, self.conv1 = tnn.GroupNorm(groups, cin, eps=1e-6), tnn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = tnn.Linear(temb, cout)
        self.norm2, self.conv2 = tnn.GroupNorm(groups, cout, eps=1e-6), tnn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = tnn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(tnn.functional.silu(self.norm1(x)))
        h = h + self.time_emb_proj(tnn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(tnn.functional.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class TorchUNetStage(tnn.Module):
    def __init__(self):
        super().__init__()
        self.resnets = tnn.ModuleList([TorchResBlock(16, 32, 24), TorchResBlock(32, 32, 24)])

    def forward(self, x, temb):
        for block in self.resnets:
            x = block(x, temb)
        return x


class FlaxResBlock(nn.Module):
    cout: int
    groups: int = 8

    @nn.compact
    def __call__(self, x, temb):
        # one module per statement, in torch's order: in ``Conv(...)(norm()(x))`` the Conv would be created first
        norm = functools.partial(jl.GroupNorm, num_groups=self.groups, epsilon=1e-6)
        h = nn.silu(norm()(x))
        h = nn.Conv(self.cout, (3, 3), padding=1)(h)
        h = h + nn.Dense(self.cout)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(norm()(h))
        h = nn.Conv(self.cout, (3, 3), padding=1)(h)
        return (x if x.shape[-1] == self.cout else nn.Conv(self.cout, (1, 1))(x)) + h


class FlaxUNetStage(nn.Module):
    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        for _ in range(2):
            x = FlaxResBlock(32)(x, temb)
        return x


def test_diffusion_unet_residual_blocks():
    """GroupNorm + SiLU with a time embedding and a 1x1 shortcut, two blocks."""
    torch.manual_seed(0)
    names = check_port(TorchUNetStage(), FlaxUNetStage(),
                       lambda r: [r.normal(size=(4, 16, 8, 8)).astype(np.float32),
                                  r.normal(size=(4, 24)).astype(np.float32)], channels_last_inputs=(0,),
                       channels_first_output=True)
    assert names["resnets.0.conv_shortcut"] == "FlaxResBlock_0/Conv_2"
    assert names["resnets.1.norm2"] == "FlaxResBlock_1/GroupNorm_1"


# ------------------------------------------------------------------------------------------- no hand-written step


class FlaxViTBlock(nn.Module):
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        h = jl.LayerNorm(epsilon=1e-6, name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="self_attention")(h)
        h = jl.LayerNorm(epsilon=1e-6, name="ln_2")(x)
        h = nn.Dense(self.mlp, name="mlp_0")(h)
        return x + nn.Dense(x.shape[-1], name="mlp_3")(nn.gelu(h, approximate=False))


class FlaxViTEncoder(nn.Module):
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        x = x + self.param("pos_embedding", nn.initializers.zeros, (1, *x.shape[1:]), jnp.float32)
        x = FlaxViTBlock(self.heads, self.mlp, name="layers_0")(x)
        return jl.LayerNorm(epsilon=1e-6, name="ln")(x)


class FlaxViT(nn.Module):
    """torchvision.models.VisionTransformer for NHWC images: a class token, a position embedding, attention."""

    patch: int = 8
    hidden: int = 16
    heads: int = 2
    mlp: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        token = self.param("class_token", nn.initializers.zeros, (1, 1, self.hidden), jnp.float32)
        x = nn.Conv(self.hidden, (self.patch, self.patch), self.patch, padding="VALID", name="conv_proj")(x)
        x = x.reshape(x.shape[0], -1, self.hidden)
        x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, self.hidden)), x], 1)
        x = FlaxViTEncoder(self.heads, self.mlp, name="encoder")(x)
        return nn.Dense(self.classes, name="head")(x[:, 0])


def test_torchvision_vit():
    """A class token on the root, a position embedding on the encoder, nn.MultiheadAttention: no hand work."""
    torch.manual_seed(0)
    torch_model = torchvision_models().VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                         hidden_dim=16, mlp_dim=32, num_classes=10)
    names = check_port(torch_model, FlaxViT(), lambda r: [r.normal(size=(4, 3, 16, 16)).astype(np.float32)],
                       channels_last_inputs=(0,))
    assert names[""] == "" and names["encoder.layers.encoder_layer_0.self_attention"] == \
        "encoder/layers_0/self_attention"


class FlaxText(nn.Module):
    @nn.compact
    def __call__(self, tokens, train: bool = False):
        x = nn.Embed(20, 16, name="embed")(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=4, name="self_attn")(x)
        linear1, linear2 = nn.Dense(32, name="linear1"), nn.Dense(16, name="linear2")
        norm1, norm2 = jl.LayerNorm(name="norm1"), jl.LayerNorm(name="norm2")
        x = norm1(x + h)
        x = norm2(x + linear2(nn.relu(linear1(x))))
        return nn.Dense(3, name="head")(x.mean(1))


def test_text_model_with_embedding_and_attention():
    from tests.test_model_ports import TorchText

    torch.manual_seed(0)
    names = check_port(TorchText(), FlaxText(), lambda r: [r.integers(0, 20, size=(4, 6))])
    assert names == {"embed": "embed", "layer.self_attn": "self_attn", "layer.linear1": "linear1",
                     "layer.linear2": "linear2", "layer.norm1": "norm1", "layer.norm2": "norm2", "head": "head"}


class FlaxUNetUp(nn.Module):
    transpose_kernel: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jl.BatchNorm(use_running_average=not train, name="norm")(x)
        x = nn.Conv(16, (3, 3), padding=1, feature_group_count=16, name="depthwise")(x)
        x = nn.ConvTranspose(16, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                             transpose_kernel=self.transpose_kernel, name="up")(nn.silu(x))
        return jl.GroupNorm(num_groups=4, name="out_norm")(x)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_unet_up_block_with_a_square_conv_transpose(transpose_kernel):
    """BatchNorm, a depthwise conv, ConvTranspose2d(16, 16, 4, stride=2, padding=1) in either Flax convention."""
    from tests.test_model_ports import TorchUNetUp

    torch.manual_seed(0)
    names = check_port(TorchUNetUp(), FlaxUNetUp(transpose_kernel),
                       lambda r: [r.normal(size=(4, 16, 8, 8)).astype(np.float32)], channels_last_inputs=(0,),
                       channels_first_output=True)
    assert names.kinds["up"] == ("conv_transpose:transpose_kernel" if transpose_kernel else "conv_transpose")
