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


def _port_and_check(framework, model, sd, x, want):
    """Convert ``sd`` into ``model`` (a linen, NNX or Equinox model of one example), check its output against
    torch's and the exact way back; returns the names."""
    if framework == "linen":
        names = interop.derive_names(sd, model, x)
        variables = interop.torch_to_flax(sd, names)
        got, back = model.apply(variables, x), interop.flax_to_torch(variables, names)
    elif framework == "nnx":
        model = interop.torch_to_nnx(sd, model)
        names = interop.derive_names(sd, model)
        got, back = model(x), interop.nnx_to_torch(model, names)
    else:
        model, _ = interop.torch_to_equinox(sd, model)
        names = interop.derive_names(sd, model)
        got, back = jax.vmap(model)(x), interop.equinox_to_torch(model, None, names)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    _exact(back, sd)
    return names


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


# ------------------------------------------------------------------------------------------ attention

E, HEADS = 8, 2


class TorchAttention(torch.nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.head = torch.nn.Linear(E, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (N, L, E)
        h = x if self.batch_first else x.transpose(0, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h if self.batch_first else h.transpose(0, 1))


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS)(x)
        return nn.Dense(3)(h)


class NNXAttention(nnx.Module):
    def __init__(self):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=E, decode=False, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(E, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(self.attn(x))


class EquinoxAttention(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    head: eqx.nn.Linear

    def __init__(self):
        k1, k2 = jax.random.split(jax.random.key(0))
        self.attn = eqx.nn.MultiheadAttention(HEADS, E, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k1)
        self.head = eqx.nn.Linear(E, 3, key=k2)

    def __call__(self, x):  # one example (L, E)
        return jax.vmap(self.head)(self.attn(x, x, x))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_multihead_attention_into_each_frameworks_attention(framework, batch_first):
    """q/k/v split from in_proj, the output projection and every bias; batch_first changes the call, not the
    weights. Both directions exact."""
    torch.manual_seed(1)
    net = TorchAttention(batch_first).eval()
    for p in net.parameters():  # torch zero-initializes the attention's biases: make them count
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        want = net(x).numpy()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    xj = jnp.asarray(x.numpy())
    model = {"linen": LinenAttention, "nnx": NNXAttention, "equinox": EquinoxAttention}[framework]()
    names = _port_and_check(framework, model, sd, xj, want)
    if framework == "linen":
        assert dict(names) == {"attn": "MultiHeadDotProductAttention_0", "head": "Dense_0"}


def test_attention_with_its_own_key_and_value_sizes_round_trips():
    """kdim/vdim != embed_dim: torch keeps q/k/v_proj_weight apart, and so does the way back."""
    torch.manual_seed(2)
    mha = torch.nn.MultiheadAttention(E, HEADS, kdim=6, vdim=4, batch_first=True).eval()
    for p in mha.parameters():
        torch.nn.init.normal_(p, std=0.3)
    q, k, v = torch.randn(2, 5, E), torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    with torch.no_grad():
        want = mha(q, k, v, need_weights=False)[0].numpy()
    sd = {f"attn.{k_}": t.numpy() for k_, t in mha.state_dict().items()}

    class Cross(nn.Module):
        @nn.compact
        def __call__(self, q, k, v):
            return nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(q, k, v)

    args = [jnp.asarray(t.numpy()) for t in (q, k, v)]
    names = interop.derive_names(sd, Cross(), *args)
    variables = interop.torch_to_flax(sd, names)
    np.testing.assert_allclose(Cross().apply(variables, *args), want, rtol=1e-5, atol=1e-5)
    _exact(interop.flax_to_torch(variables, names), sd)


# ------------------------------------------------------------------------------------------ bare parameters


class TorchTokens(torch.nn.Module):
    """A ViT's bare parameters: a class token on the root, a position embedding on a submodule."""

    def __init__(self):
        super().__init__()
        self.class_token = torch.nn.Parameter(torch.randn(1, 1, E))
        self.encoder = torch.nn.Module()
        self.encoder.pos_embedding = torch.nn.Parameter(torch.randn(1, 4, E))
        self.encoder.norm = torch.nn.LayerNorm(E)
        self.head = torch.nn.Linear(E, 3)

    def forward(self, x):  # x: (N, 3, E)
        h = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.encoder.pos_embedding
        return self.head(self.encoder.norm(h)[:, 0])


class LinenEncoder(nn.Module):
    @nn.compact
    def __call__(self, h):
        h = h + self.param("pos_embedding", nn.initializers.zeros, (1, 4, E))
        return nn.LayerNorm(epsilon=1e-5, name="norm")(h)


class LinenTokens(nn.Module):
    @nn.compact
    def __call__(self, x):
        token = self.param("class_token", nn.initializers.zeros, (1, 1, E))
        h = LinenEncoder(name="encoder")(jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, E)), x], 1))
        return nn.Dense(3, name="head")(h[:, 0])


class NNXEncoder(nnx.Module):
    def __init__(self):
        self.pos_embedding = nnx.Param(jnp.zeros((1, 4, E)))
        self.norm = nnx.LayerNorm(E, epsilon=1e-5, rngs=nnx.Rngs(0))


class NNXTokens(nnx.Module):
    def __init__(self):
        self.class_token = nnx.Param(jnp.zeros((1, 1, E)))
        self.encoder = NNXEncoder()
        self.head = nnx.Linear(E, 3, rngs=nnx.Rngs(0))

    def __call__(self, x):
        token = jnp.broadcast_to(self.class_token[...], (x.shape[0], 1, E))
        h = jnp.concatenate([token, x], 1) + self.encoder.pos_embedding[...]
        return self.head(self.encoder.norm(h)[:, 0])


class EquinoxEncoder(eqx.Module):
    pos_embedding: jax.Array
    norm: eqx.nn.LayerNorm

    def __init__(self):
        self.pos_embedding, self.norm = jnp.zeros((1, 4, E)), eqx.nn.LayerNorm(E)


class EquinoxTokens(eqx.Module):
    class_token: jax.Array
    encoder: EquinoxEncoder
    head: eqx.nn.Linear

    def __init__(self):
        self.class_token, self.encoder = jnp.zeros((1, 1, E)), EquinoxEncoder()
        self.head = eqx.nn.Linear(E, 3, key=jax.random.key(0))

    def __call__(self, x):  # one example (3, E)
        h = jnp.concatenate([self.class_token[0], x], 0) + self.encoder.pos_embedding[0]
        return self.head(self.encoder.norm(h[0]))


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_bare_parameters_on_the_root_and_on_submodules(framework):
    torch.manual_seed(3)
    net = TorchTokens().eval()
    x = torch.randn(2, 3, E)
    with torch.no_grad():
        want = net(x).numpy()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    assert list(sd)[:2] == ["class_token", "encoder.pos_embedding"]
    xj = jnp.asarray(x.numpy())
    model = {"linen": LinenTokens, "nnx": NNXTokens, "equinox": EquinoxTokens}[framework]()
    names = _port_and_check(framework, model, sd, xj, want)
    if framework == "linen":
        assert dict(names) == {"": "", "encoder": "encoder", "encoder.norm": "encoder/norm", "head": "head"}


def test_bare_parameters_pair_by_name():
    sd = {"cls": np.zeros((1, 1, E), np.float32), "head.weight": np.zeros((3, E), np.float32),
          "head.bias": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"torch module '' .*converts to \{'cls': \(1, 1, 8\)\}, the Flax module "
                                         r"holds \{'class_token': \(1, 1, 8\)\}.*pair by name"):
        interop.derive_names(sd, LinenTokens(), jnp.zeros((2, 3, E)))


# ------------------------------------------------------------------------------------------ compare's options


def test_compare_options_match_module_prefixes_and_leave_token_arrays_alone():
    from jaxnorm.interop._compare import _by_prefix, _layout_fn
    from jaxnorm.interop._record import renamed as _renamed

    table = {"encoder": 1, "encoder.layers.0": 2}
    assert [_by_prefix(table, p, 0) for p in ("encoder.layers.0.ln", "encoder.layers.01", "encoder", "encoders")] \
        == [2, 1, 1, 0]
    last = _layout_fn("channels_last")
    assert last(np.zeros((2, 5, 8))).shape == (2, 5, 8)  # tokens (N, L, D): not an image
    assert last(np.zeros((2, 3, 4, 5))).shape == (2, 4, 5, 3)
    qkv = np.arange(12.0).reshape(6, 2)
    out = _renamed({"qkv.weight": qkv, "drop.me": 1, "keep": 2},
                   {"qkv.weight": ("q.weight", "k.weight", "v.weight"), "drop.me": None})
    assert list(out) == ["q.weight", "k.weight", "v.weight", "keep"]
    np.testing.assert_array_equal(out["k.weight"], qkv[2:4])


def test_a_module_torch_never_called_ranks_after_the_modules_that_ran():
    from jaxnorm.interop import Report, Row

    row = lambda module, quantity, mode="train": Row(module, module, mode, quantity, 1.0, 1.0, 0.0, 0.0, False)
    report = Report([row("never_called", "grad weight"), row("head", "grad weight"), row("encoder", "grad weight")],
                    order=["encoder", "head"], framework="linen", isolated=False, names={})
    # gradients in backward order (head before encoder), the module that never ran last
    assert [r.module for r in report.failures] == ["head", "encoder", "never_called"]


def test_a_paired_module_torch_never_calls_is_reported_as_such():
    """A Linear whose weight its parent uses with F.linear: no output row to compare, a note that says why."""
    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.proj.weight, self.proj.bias) * 2

    class Port(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="proj")(x) * 2

    torch.manual_seed(0)
    net = Parent()
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    names = interop.derive_names({k: v.numpy() for k, v in net.state_dict().items()}, Port(), jnp.asarray(x))
    variables = interop.torch_to_flax({k: v.numpy() for k, v in net.state_dict().items()}, names)
    report = interop.compare(net, Port(), x, variables=variables, loss=lambda y: (y * y).sum())
    report.assert_close()
    skipped = [r for r in report.rows if r.module == "proj" and r.quantity == "output"]
    assert skipped and all(r.skipped and "never called" in r.note for r in skipped)
    assert "n/a (never called)" in report.table()
    assert any(r.module == "proj" and r.quantity == "grad weight" and r.ok for r in report.rows)
