"""Kinds a state_dict's shapes cannot tell apart (ConvTranspose vs Conv, Embedding vs Linear), grouped convs, and
declaration order at every level of a linen model: each conversion right, or refused with the fix."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import interop

torch = pytest.importorskip("torch")
eqx = pytest.importorskip("equinox", reason="jaxnorm.equinox needs the optional extra: pip install 'jaxnorm[equinox]'")

C, L = 4, 6  # a square ConvTranspose (in == out), the case a conv's layout would convert silently wrong


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, C)
        self.up = torch.nn.ConvTranspose1d(C, C, 3, stride=2, padding=1, output_padding=1)
        self.group = torch.nn.Conv1d(C, 6, 3, padding=1, groups=2)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)  # (N, C, L)
        return self.head(self.group(self.up(h)).mean(-1))


# torch's ConvTranspose padding p, output_padding q -> Flax's explicit padding (k - 1 - p, k - 1 - p + q)
TRANSPOSE_PADDING = ((1, 2),)


class LinenNet(nn.Module):
    transpose_kernel: bool = False

    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(10, C)(tokens)  # (N, L, C)
        h = nn.ConvTranspose(C, (3,), strides=(2,), padding=TRANSPOSE_PADDING,
                             transpose_kernel=self.transpose_kernel)(h)
        h = nn.Conv(6, (3,), padding=1, feature_group_count=2)(h)
        return nn.Dense(3)(h.mean(1))


class NNXNet(nnx.Module):
    def __init__(self, transpose_kernel=False):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(10, C, rngs=rngs)
        self.up = nnx.ConvTranspose(C, C, (3,), strides=(2,), padding=TRANSPOSE_PADDING,
                                    transpose_kernel=transpose_kernel, rngs=rngs)
        self.group = nnx.Conv(C, 6, (3,), padding=1, feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.group(self.up(self.embed(tokens))).mean(1))


class EquinoxNet(eqx.Module):
    embed: eqx.nn.Embedding
    up: eqx.nn.ConvTranspose1d
    group: eqx.nn.Conv1d
    head: eqx.nn.Linear

    def __init__(self):
        keys = jax.random.split(jax.random.key(0), 4)
        self.embed = eqx.nn.Embedding(10, C, key=keys[0])
        self.up = eqx.nn.ConvTranspose1d(C, C, 3, stride=2, padding=1, output_padding=1, key=keys[1])
        self.group = eqx.nn.Conv1d(C, 6, 3, padding=1, groups=2, key=keys[2])
        self.head = eqx.nn.Linear(6, 3, key=keys[3])

    def __call__(self, tokens):  # one example
        return self.head(self.group(self.up(jax.vmap(self.embed)(tokens).T)).mean(-1))


@pytest.fixture(scope="module")
def torch_net():
    torch.manual_seed(0)
    net = TorchNet().eval()
    tokens = torch.randint(0, 10, (2, L))
    with torch.no_grad():
        want = net(tokens).numpy()
    return net, {k: v.numpy() for k, v in net.state_dict().items()}, tokens.numpy(), want


def _exact(back, state_dict):
    assert list(back) == list(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_linen_conv_transpose_embedding_and_grouped_conv(torch_net, transpose_kernel):
    _, sd, tokens, want = torch_net
    model = LinenNet(transpose_kernel)
    names = interop.derive_names(sd, model, jnp.asarray(tokens))
    assert dict(names) == {"embed": "Embed_0", "up": "ConvTranspose_0", "group": "Conv_0", "head": "Dense_0"}
    assert names.kinds["up"] == ("conv_transpose:transpose_kernel" if transpose_kernel else "conv_transpose")
    variables = interop.torch_to_flax(sd, names)
    np.testing.assert_allclose(model.apply(variables, jnp.asarray(tokens)), want, rtol=1e-5, atol=1e-5)
    _exact(interop.flax_to_torch(variables, names), sd)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_nnx_conv_transpose_embedding_and_grouped_conv(torch_net, transpose_kernel):
    _, sd, tokens, want = torch_net
    model = interop.torch_to_nnx(sd, NNXNet(transpose_kernel))
    np.testing.assert_allclose(model(jnp.asarray(tokens)), want, rtol=1e-5, atol=1e-5)
    _exact(interop.nnx_to_torch(model, interop.derive_names(sd, model)), sd)


def test_equinox_conv_transpose_embedding_and_grouped_conv(torch_net):
    _, sd, tokens, want = torch_net
    model, _ = interop.torch_to_equinox(sd, EquinoxNet())
    np.testing.assert_allclose(jax.vmap(model)(jnp.asarray(tokens)), want, rtol=1e-5, atol=1e-5)
    _exact(interop.equinox_to_torch(model, None, interop.derive_names(sd, model)), sd)


def test_a_torch_conv_transpose_into_a_jax_conv_is_refused_with_the_fix(torch_net):
    net, sd, tokens, _ = torch_net

    class ConvInstead(nn.Module):  # the port's mistake: a Conv where torch has a ConvTranspose
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(10, C)(tokens)
            h = nn.Conv(C, (3,), padding=1)(h)
            h = nn.Conv(6, (3,), padding=1, feature_group_count=2)(h)
            return nn.Dense(3)(h.mean(1))

    # from the state_dict alone the square weight reads as a conv's; the torch model says what it is
    assert interop.torch_kinds(net) == {"embed": "embedding", "up": "conv_transpose"}
    with pytest.raises(ValueError, match=r"torch module 'up'.*a conv_transpose layer, the Flax module a conv layer.*"
                                         r"a torch ConvTranspose pairs with a Flax or NNX ConvTranspose"):
        interop.derive_names(sd, ConvInstead(), jnp.asarray(tokens), kinds=interop.torch_kinds(net))


def test_hand_written_names_take_the_kind_from_kinds(torch_net):
    """Without derive_names' kinds, ``kinds=`` says what a 3-D weight is; Flax's variant is the JAX module's."""
    _, sd, tokens, want = torch_net
    names = {"embed": "Embed_0", "up": "ConvTranspose_0", "group": "Conv_0", "head": "Dense_0"}
    kinds = {"embed": "embedding", "up": "conv_transpose:transpose_kernel"}
    variables = interop.torch_to_flax(sd, names, kinds=kinds)
    np.testing.assert_allclose(LinenNet(True).apply(variables, jnp.asarray(tokens)), want, rtol=1e-5, atol=1e-5)
    _exact(interop.flax_to_torch(variables, names, kinds=kinds), sd)


# ------------------------------------------------------------------------------------------ declaration order


class SetupInner(nn.Module):
    def setup(self):
        self.b = nn.Dense(4)  # declared first, called second: same shapes, so only the order tells them apart
        self.a = nn.Dense(4)

    def __call__(self, x):
        return self.b(self.a(x))


class CompactInner(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, a = nn.Dense(4, name="b"), nn.Dense(4, name="a")
        return b(a(x))


def _outer(inner_cls, setup: bool):
    if setup:
        class Outer(nn.Module):
            def setup(self):
                self.head = nn.Dense(4)
                self.inner = inner_cls()

            def __call__(self, x):
                return self.head(self.inner(x))
    else:
        class Outer(nn.Module):
            @nn.compact
            def __call__(self, x):
                head, inner = nn.Dense(4, name="head"), inner_cls(name="inner")
                return head(inner(x))
    return Outer()


@pytest.mark.parametrize("outer_setup", [True, False], ids=["setup-outer", "compact-outer"])
@pytest.mark.parametrize("inner_cls", [SetupInner, CompactInner], ids=["setup-inner", "compact-inner"])
def test_derive_names_follows_declaration_order_at_every_level(outer_setup, inner_cls):
    rng = np.random.default_rng(0)
    sd = {f"{m}.{leaf}": rng.normal(size=(4, 4) if leaf == "weight" else (4,))
          for m in ("head", "inner.b", "inner.a") for leaf in ("weight", "bias")}
    names = interop.derive_names(sd, _outer(inner_cls, outer_setup), jnp.ones((1, 4)))
    assert dict(names) == {"head": "head", "inner.b": "inner/b", "inner.a": "inner/a"}
