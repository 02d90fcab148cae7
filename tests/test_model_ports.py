"""The four PyTorch architectures of tests/test_models.py ported to Flax NNX and to Equinox (tests/twins.py).

As for the linen ports: the torch model is trained a few SGD steps, converted with ``interop.torch_to_nnx`` /
``interop.torch_to_equinox`` (names derived by declaration order), converted back exactly, and compared with its
twin by hand: eval outputs, training-mode outputs and loss, the updated running statistics and
``num_batches_tracked``, and every parameter gradient. ``interop.compare`` must then find the port within
tolerance too (no false alarm on a correct port).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import interop
from jaxnorm.interop._pairing import attention_prefixes, split_key
from tests.test_models import (  # noqa: F401 - a fixture
    TorchUNetStage,
    assert_close,
    float32_products,
    nhwc,
    torch_outputs,
    torchvision_models,
    trained_torch,
)

torch = pytest.importorskip("torch")
eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'")
from tests import twins  # noqa: E402 - needs equinox

pytestmark = pytest.mark.torch
tnn = torch.nn
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
TRANSFORMER_RENAME = {f"self_attn.in_proj_{leaf}": f"self_attn.in_proj.{leaf}" for leaf in ("weight", "bias")}


class _NNX:
    """The NNX side of a port; running it works on copies (nnx.clone)."""

    def __init__(self, model):
        self.model = model

    def load(self, sd):
        names = interop.derive_names(sd, self.model)
        interop.torch_to_nnx(sd, self.model, names)
        return names

    def back(self, names):
        return interop.nnx_to_torch(self.model, names)

    def eval(self, inputs):
        model = nnx.clone(self.model)
        model.eval()
        return model(*inputs)

    def train(self, inputs, loss_of, names):
        model = nnx.clone(self.model)
        model.train()

        def loss(m):
            out = m(*inputs)
            return loss_of(out), out

        (value, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return out, value, interop.nnx_to_torch(model, names, state=grads), interop.nnx_to_torch(model, names)


class _Equinox:
    def __init__(self, model, stateful):
        # equinox's layers are float64 when x64 is on (as in these tests); torch's model is float32
        model = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)
        self.model, self.state = (eqx.nn.make_with_state(lambda: model)() if stateful else (model, None))

    def load(self, sd):
        names = interop.derive_names(sd, self.model, *([self.state] if self.state is not None else []))
        self.model, self.state = interop.torch_to_equinox(sd, self.model, self.state, names)
        return names

    def back(self, names):
        return interop.equinox_to_torch(self.model, self.state, names)

    def _batched(self, model, inputs):
        if self.state is None:
            return jax.vmap(model, axis_name=twins.AXIS)(*inputs), None
        state = jax.tree.map(lambda a: a, self.state)  # a copy: the layers' State.set uses up the one they get
        return jax.vmap(lambda *xs: model(*xs, state), axis_name=twins.AXIS, out_axes=(0, None))(*inputs)

    def eval(self, inputs):
        return self._batched(eqx.nn.inference_mode(self.model), inputs)[0]

    def train(self, inputs, loss_of, names):
        @eqx.filter_value_and_grad(has_aux=True)
        def loss(model):
            out, state = self._batched(model, inputs)
            return loss_of(out), (out, state)

        (value, (out, state)), grads = loss(eqx.nn.inference_mode(self.model, value=False))
        stats = interop.equinox_to_torch(self.model, state, names) if state is not None else {}
        return out, value, interop.equinox_to_torch(grads, None, names), stats


def check_port(torch_model, port, make_inputs, *, channels_last=False, rename=None, compare=None):
    """Train, convert, compare by hand (and with ``interop.compare`` when ``compare`` gives its arguments)."""
    layout = nhwc if channels_last else (lambda a: a)
    weights, loss_of = trained_torch(torch_model, make_inputs)

    rename = rename or {}
    sd = {rename.get(k, k): v.detach().numpy().copy() for k, v in torch_model.state_dict().items()}
    names = port.load(sd)
    back = port.back(names)
    attention = attention_prefixes(sd)  # a MultiheadAttention's out_proj converts with it
    converted = {k: v for k, v in sd.items() if split_key(k, attention)[0] in names}
    assert set(back) == set(converted) == set(sd), set(back) ^ set(converted)
    for key, value in converted.items():
        np.testing.assert_array_equal(back[key], value, err_msg=f"round trip of {key}")
        assert back[key].dtype == value.dtype, key

    inputs = make_inputs(np.random.default_rng(2))
    jax_inputs = [jnp.asarray(layout(a) if a.ndim >= 3 else a) for a in inputs]
    t_eval, t_out, t_loss = torch_outputs(torch_model, inputs, loss_of)
    assert_close(port.eval(jax_inputs), layout(t_eval), "eval output")
    w_jax = jnp.asarray(layout(weights.numpy()))
    out, loss, grads, stats = port.train(jax_inputs, lambda y: jnp.sum(y * w_jax) / y.shape[0], names)
    assert_close(out, layout(t_out.detach().numpy()), "training-mode output")
    assert_close(loss, t_loss.item(), "loss")
    t_grads = {rename.get(k, k): p.grad.numpy() for k, p in torch_model.named_parameters()}
    assert set(grads) == set(t_grads)
    for key, g in grads.items():
        assert_close(g, t_grads[key], f"gradient of {key}")
    t_state = {rename.get(k, k): v.numpy() for k, v in torch_model.state_dict().items()}
    buffers = [k for k in t_state if k.rpartition(".")[2] in BUFFERS]
    assert {k for k in stats if k.rpartition(".")[2] in BUFFERS} == set(buffers)
    for key in buffers:
        if key.endswith("num_batches_tracked"):
            assert int(stats[key]) == int(t_state[key]) == 4, key
        else:
            assert_close(stats[key], t_state[key], f"running statistic {key}")
    if compare is not None:
        # the torch model is now one training step on: load it again, then ask compare
        port.load({rename.get(k, k): v.detach().numpy().copy() for k, v in torch_model.state_dict().items()})
        report = interop.compare(torch_model, port.model, tuple(inputs), state=getattr(port, "state", None),
                                 names=names, rename=rename, loss=(loss_of, lambda y: jnp.sum(y * w_jax) / y.shape[0]),
                                 **compare)
        report.assert_close()
        assert {row.module for row in report.rows} >= {p for p in names if p in report.order}
    return names


# ------------------------------------------------------------------------------------------- the four models


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
@pytest.mark.slow
def test_torchvision_resnet18(framework):
    torch.manual_seed(0)
    port = (_NNX(twins.NNXResNet18(10, nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxResNet18(10, jax.random.key(0)), stateful=True))
    names = check_port(torchvision_models().resnet18(num_classes=10), port,
                       lambda r: [r.normal(size=(4, 3, 64, 64)).astype(np.float32)], channels_last=framework == "nnx")
    assert len(names) == 41
    assert names["layer2.0.downsample.1"] == ("layer2/0/downsample/layers/1" if framework == "nnx"
                                              else "layer2/0/downsample/1")


def _torch_convnext(d0, d1):
    convnext = torchvision_models().convnext
    return tnn.Sequential(
        tnn.Sequential(tnn.Conv2d(3, d0, 4, 4), convnext.LayerNorm2d(d0, eps=1e-6)),
        convnext.CNBlock(d0, layer_scale=0.5, stochastic_depth_prob=0.0),
        tnn.Sequential(convnext.LayerNorm2d(d0, eps=1e-6), tnn.Conv2d(d0, d1, 2, 2)),
        convnext.CNBlock(d1, layer_scale=0.5, stochastic_depth_prob=0.0),
        tnn.AdaptiveAvgPool2d(1), tnn.Flatten(1), tnn.LayerNorm(d1, eps=1e-6), tnn.Linear(d1, 10))


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_convnext_style_blocks(framework):
    torch.manual_seed(0)
    d0, d1 = 16, 32
    inside_blocks = {f"{b}.block.{i}": None for b in (1, 3) for i in (2, 3, 5)}  # NHWC in torch, after a permute
    if framework == "nnx":
        port = _NNX(twins.NNXConvNeXt(d0, d1, nnx.Rngs(0)))  # the layer scales: bare parameters, converted
        compare = {"layout": "channels_last", "layouts": inside_blocks}
    else:
        port = _Equinox(twins.EqxConvNeXt(d0, d1, jax.random.key(0)), stateful=False)
        # LayerNorm2d's twin normalizes an (H, W, C) view of the example: its arrays are channels-last there
        compare = {"layouts": {"0.1": "channels_last", "2.0": "channels_last"}}
    names = check_port(_torch_convnext(d0, d1), port, lambda r: [r.normal(size=(4, 3, 32, 32)).astype(np.float32)],
                       channels_last=framework == "nnx", compare=compare)
    assert names["0.1"] == "stem_norm" + ("" if framework == "nnx" else "/norm")
    assert names["1.block.2"] == "block1/norm"


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_torch_transformer_encoder_layer(framework, norm_first):
    torch.manual_seed(0)
    torch_model = tnn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    port = (_NNX(twins.NNXEncoderLayer(16, 4, 32, norm_first, nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxEncoderLayer(16, 4, 32, norm_first, jax.random.key(0)), stateful=False))
    names = check_port(torch_model, port, lambda r: [r.normal(size=(4, 6, 16)).astype(np.float32)],
                       rename=TRANSFORMER_RENAME, compare={})
    assert names == {"self_attn.in_proj": "in_proj", "self_attn.out_proj": "out_proj", "linear1": "linear1",
                     "linear2": "linear2", "norm1": "norm1", "norm2": "norm2"}


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_diffusion_unet_residual_blocks(framework):
    torch.manual_seed(0)
    port = (_NNX(twins.NNXUNetStage(nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxUNetStage(jax.random.key(0)), stateful=False))
    names = check_port(TorchUNetStage(), port, lambda r: [r.normal(size=(4, 16, 8, 8)).astype(np.float32),
                                                          r.normal(size=(4, 24)).astype(np.float32)],
                       channels_last=framework == "nnx",
                       compare={"layout": "channels_last"} if framework == "nnx" else {})
    assert names["resnets.0.conv_shortcut"] == "resnets/0/conv_shortcut"
    assert names["resnets.1.norm2"] == "resnets/1/norm2"


# ------------------------------------------------------------------------------------------- no hand-written step


class TorchText(tnn.Module):
    def __init__(self, vocab=20, d_model=16, nhead=4, dim_feedforward=32, classes=3):
        super().__init__()
        self.embed = tnn.Embedding(vocab, d_model)
        self.layer = tnn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True)
        self.head = tnn.Linear(d_model, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_torchvision_vit(framework):
    """A class token and a position embedding (bare parameters) and nn.MultiheadAttention, as they are."""
    torch.manual_seed(0)
    torch_model = torchvision_models().VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                         hidden_dim=16, mlp_dim=32, num_classes=10)
    port = (_NNX(twins.NNXViT(nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxViT(jax.random.key(0)), stateful=False))
    # images channels-last for NNX; the encoder's (N, tokens, hidden) arrays stay as they are (compare: NNX here,
    # Equinox on the text model, to keep the tier fast)
    names = check_port(torch_model, port, lambda r: [r.normal(size=(4, 3, 16, 16)).astype(np.float32)],
                       channels_last=framework == "nnx",
                       compare={"layout": "channels_last"} if framework == "nnx" else None)
    attention = "encoder.layers.encoder_layer_0.self_attention"
    assert names[""] == "" and names["encoder"] == "encoder" and names[attention] == "encoder/layers/0/self_attention"


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_text_model_with_embedding_and_attention(framework):
    torch.manual_seed(0)
    port = (_NNX(twins.NNXText(nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxText(jax.random.key(0)), stateful=False))
    names = check_port(TorchText(), port, lambda r: [r.integers(0, 20, size=(4, 6))], compare={})
    assert names == {"embed": "embed", "layer.self_attn": "layer/self_attn", "layer.linear1": "layer/linear1",
                     "layer.linear2": "layer/linear2", "layer.norm1": "layer/norm1", "layer.norm2": "layer/norm2",
                     "head": "head"}


class TorchUNetUp(tnn.Module):
    """A UNet up block: BatchNorm, a depthwise conv, a square ConvTranspose2d (in == out) and GroupNorm."""

    def __init__(self, c=16):
        super().__init__()
        self.norm = tnn.BatchNorm2d(c)
        self.depthwise = tnn.Conv2d(c, c, 3, padding=1, groups=c)
        self.up = tnn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.out_norm = tnn.GroupNorm(4, c)

    def forward(self, x):
        return self.out_norm(self.up(tnn.functional.silu(self.depthwise(self.norm(x)))))


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_unet_up_block_with_a_square_conv_transpose(framework):
    torch.manual_seed(0)
    port = (_NNX(twins.NNXUNetUp(nnx.Rngs(0))) if framework == "nnx"
            else _Equinox(twins.EqxUNetUp(jax.random.key(0)), stateful=True))
    names = check_port(TorchUNetUp(), port, lambda r: [r.normal(size=(4, 16, 8, 8)).astype(np.float32)],
                       channels_last=framework == "nnx", compare={} if framework == "equinox" else None)
    assert names == {"norm": "norm", "depthwise": "depthwise", "up": "up", "out_norm": "out_norm"}
    assert names.kinds["up"] == "conv_transpose"


def _vit_fault(model, fault):
    block = model.encoder.layers[0]
    if fault == "ln_eps":
        block.ln_1.epsilon = 0.5
    else:  # one attention projection: the value's kernel
        block.self_attention.value.kernel[...] = block.self_attention.value.kernel[...] * 1.5


@pytest.mark.parametrize("isolated", [False, True], ids=["chained", "isolated"])
@pytest.mark.parametrize("fault", ["ln_eps", "attention_value", "conv_transpose_kernel"])
def test_compare_names_the_injected_fault_first(fault, isolated):
    """In a converted ViT a LayerNorm epsilon or one attention projection, in a UNet up block a ConvTranspose
    kernel with its in and out axes swapped (the same shape: in == out): compare's first failure is that module."""
    torch.manual_seed(0)
    if fault == "conv_transpose_kernel":
        torch_model, model, make = TorchUNetUp(), twins.NNXUNetUp(nnx.Rngs(0)), (4, 16, 8, 8)
    else:
        torch_model = torchvision_models().VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                                             hidden_dim=16, mlp_dim=32, num_classes=10)
        model, make = twins.NNXViT(nnx.Rngs(0)), (4, 3, 16, 16)
    for p in torch_model.parameters():  # torchvision zero-initializes the head: a fault would not show
        torch.nn.init.normal_(p, std=0.3)
    interop.torch_to_nnx({k: v.numpy() for k, v in torch_model.state_dict().items()}, model)
    if fault == "conv_transpose_kernel":
        model.up.kernel[...] = jnp.swapaxes(model.up.kernel[...], 2, 3)
        want = "up"
    else:
        _vit_fault(model, fault)
        want = "encoder.layers.encoder_layer_0." + ("ln_1" if fault == "ln_eps" else "self_attention")
    x = np.random.default_rng(0).normal(size=make).astype(np.float32)
    # eval mode shows each of these faults where it is; one program per run keeps the tier fast
    report = interop.compare(torch_model, model, x, layout="channels_last", isolated=isolated, modes=("eval",))
    assert not report.ok and report.first.module == want, report
