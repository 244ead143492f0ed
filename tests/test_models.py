"""Image model families: every ``conf/model`` option composes, builds on every image data set and
trains one step; parameter counts, layer math and config errors against independent references."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models.vgg import cfgs as tv_vgg_cfgs
from torchvision.models.vgg import make_layers as tv_vgg_layers
from torchvision.transforms import Normalize

import ngexp.models
from ngexp.config import register_all
from ngexp.data.spec import DataSpec
from ngexp.hydra_compat import VERSION_BASE
from ngexp.models import build_model
from ngexp.models.autoencoder import Autoencoder
from ngexp.models.layers import PadTo, Standardize, input_layers, sparse_init_
from ngexp.models.lenet import LeNet5
from ngexp.models.mlp import MLP
from ngexp.models.resnet import ZeroPadShortcut, cifar_resnet, preact_resnet
from ngexp.models.vgg import VGG

CONF = Path(__file__).resolve().parents[1] / "conf"

SPECS = {
    "fashion_mnist": DataSpec("fashion_mnist", (1, 28, 28), 10, mean=(0.2860,), std=(0.3530,)),
    "mnist": DataSpec("mnist", (1, 28, 28), 10, mean=(0.1307,), std=(0.3081,)),
    "cifar10": DataSpec("cifar10", (3, 32, 32), 10, mean=(0.4914, 0.4822, 0.4465),
                        std=(0.2470, 0.2435, 0.2616)),
    "svhn": DataSpec("svhn", (3, 32, 32), 10, mean=(0.4377, 0.4438, 0.4728),
                     std=(0.1980, 0.2010, 0.1970)),
    "cifar100": DataSpec("cifar100", (3, 32, 32), 100, mean=(0.5071, 0.4865, 0.4409),
                         std=(0.2673, 0.2564, 0.2762)),
}

OPTIONS = (
    "mlp", "lenet300_100", "autoencoder", "lenet5",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet20", "resnet32", "resnet56", "preact_resnet18", "preact_resnet34", "vit",
)


@functools.cache
def compose_model(option: str, *overrides: str) -> DictConfig:
    """``cfg.model`` as a run composes it: the option YAML over its registered schema."""
    register_all()
    with initialize_config_dir(config_dir=str(CONF), **VERSION_BASE):
        return compose(overrides=[f"+model={option}", *overrides]).model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_options_exist() -> None:
    assert set(OPTIONS) <= {path.stem for path in (CONF / "model").glob("*.yaml")}


def output_shape(option: str, spec: DataSpec) -> tuple[int, ...]:
    return (2, spec.input_dim) if option == "autoencoder" else (2, spec.num_classes)


@pytest.mark.parametrize("data", list(SPECS))
@pytest.mark.parametrize("option", OPTIONS)
def test_option_builds_on_every_data_set(option: str, data: str) -> None:
    """Shapes only: built on the meta device (no initialization cost), then given uninitialized
    CPU memory for one forward pass."""
    cfg = compose_model(option)
    OmegaConf.to_object(cfg)  # runs the schema's range checks
    spec = SPECS[data]
    with torch.device("meta"):
        model = build_model(cfg, spec)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        assert model(torch.rand(2, *spec.input_shape)).shape == output_shape(option, spec)
    expected_task = "reconstruction" if option == "autoencoder" else "classification"
    assert getattr(model, "task", spec.task) == expected_task


@pytest.mark.parametrize("option", OPTIONS)
def test_option_trains_one_step(option: str) -> None:
    """Forward + backward on CPU on 28x28 gray images (the padded path) gives finite gradients
    for every parameter."""
    torch.manual_seed(0)
    spec = SPECS["fashion_mnist"]
    model = build_model(compose_model(option), spec)
    inputs, labels = torch.rand(4, *spec.input_shape), torch.tensor([0, 1, 2, 3])
    outputs = model(inputs)
    assert outputs.shape == (4, *output_shape(option, spec)[1:])
    if option == "autoencoder":
        loss = F.binary_cross_entropy_with_logits(outputs, inputs.flatten(1))
    else:
        loss = F.cross_entropy(outputs, labels)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def vit_params(patches: int, cls: bool, channels: int, patch: int, dim: int, depth: int,
               hidden: int, classes: int) -> int:
    """Hand count: patch conv, class token and one position row per token, per block 2
    LayerNorms, the attention's q/k/v and output projections, the MLP; final LayerNorm, head."""
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) \
        + (dim * hidden + hidden) + (hidden * dim + dim)
    patch_embedding = channels * patch * patch * dim + dim
    tokens = patches + cls
    return (patch_embedding + cls * dim + tokens * dim + depth * block + 2 * dim
            + dim * classes + classes)


@pytest.mark.parametrize(
    ("option", "overrides", "data", "expected"),
    [
        ("lenet300_100", (), "mnist", 266_610),  # LeCun et al. 1998; Han et al. 2015, Table 2
        ("lenet5", (), "mnist", 61_706),
        ("mlp", (), "fashion_mnist", 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10),
        ("autoencoder", (), "mnist", 2_837_314),
        ("vgg16", (), "cifar10", 14_719_818),  # 14,714,688 conv + 512 * 10 + 10
        ("resnet20", (), "cifar10", 269_722),  # "0.27M" of He et al. 2016a, Table 6 (option A)
        ("resnet20", ("model.shortcut=B",), "cifar10", 272_474),  # + 2 projections with BN
        ("preact_resnet18", (), "cifar10", 11_172_170),
        ("vit", (), "fashion_mnist", vit_params(16, True, 1, 7, 64, 3, 128, 10)),
        ("vit", ("model.pool=mean",), "cifar10", vit_params(25, False, 3, 7, 64, 3, 128, 10)),
    ],
)
def test_parameter_count_known_values(
    option: str, overrides: tuple[str, ...], data: str, expected: int
) -> None:
    with torch.device("meta"):
        model = build_model(compose_model(option, *overrides), SPECS[data])
    assert count_parameters(model) == expected


def cifar_resnet_params(n: int, shortcut: str, classes: int) -> int:
    """Hand count: stem conv+BN, 3 stages of n blocks (2 conv3x3 + 2 BN), option-B projections."""
    conv, bn = (lambda i, o, k=3: i * o * k * k), (lambda c: 2 * c)
    total = conv(3, 16) + bn(16) + 64 * classes + classes
    in_ch = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(in_ch, width) + conv(width, width) + 2 * bn(width)
            if in_ch != width and shortcut == "B":
                total += conv(in_ch, width, 1) + bn(width)
            in_ch = width
    return total


def preact_resnet_params(blocks: tuple[int, ...], classes: int) -> int:
    """Hand count: stem conv, blocks of BN(in)+conv3x3+BN(out)+conv3x3 (+1x1 projection),
    final BN, linear."""
    total, in_ch = 3 * 64 * 9, 64
    for width, n in zip((64, 128, 256, 512), blocks, strict=True):
        for _ in range(n):
            total += 2 * in_ch + in_ch * width * 9 + 2 * width + width * width * 9
            if in_ch != width:
                total += in_ch * width
            in_ch = width
    return total + 2 * 512 + 512 * classes + classes


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("depth", [20, 32, 56])
def test_cifar_resnet_structure(depth: int, shortcut: str) -> None:
    with torch.device("meta"):
        model = cifar_resnet(SPECS["cifar100"], depth, shortcut)
    assert count_parameters(model) == cifar_resnet_params((depth - 2) // 6, shortcut, 100)
    weight_layers = [m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     and "shortcut" not in name]
    assert len(weight_layers) == depth


@pytest.mark.parametrize("depth", [18, 34])
def test_preact_resnet_structure(depth: int) -> None:
    with torch.device("meta"):
        model = preact_resnet(SPECS["cifar10"], depth)
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    assert count_parameters(model) == preact_resnet_params(blocks, 10)
    weight_layers = [m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     and "shortcut" not in name]
    assert len(weight_layers) == depth


def test_zero_pad_shortcut() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, 0::2, 0::2])
    assert (out[:, 16:] == 0).all()


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("depth,tv_key", [(11, "A"), (13, "B"), (16, "D"), (19, "E")])
def test_vgg_matches_torchvision_features(depth: int, tv_key: str, batch_norm: bool) -> None:
    with torch.device("meta"):
        model = VGG(SPECS["cifar10"], depth, batch_norm)
        reference = tv_vgg_layers(tv_vgg_cfgs[tv_key], batch_norm=batch_norm)
    ours = [(type(m), getattr(m, "weight", torch.empty(0)).shape) for m in model.features]
    theirs = [(type(m), getattr(m, "weight", torch.empty(0)).shape) for m in reference]
    assert ours == theirs
    conv_biases = sum(m.out_channels for m in reference if isinstance(m, nn.Conv2d))
    expected = count_parameters(reference) - (conv_biases if batch_norm else 0) + 512 * 10 + 10
    assert count_parameters(model) == expected
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == depth - 3


def test_vgg_head_widths() -> None:
    model = VGG(SPECS["cifar10"], 11, batch_norm=True, head_widths=[512, 512])
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.classifier) == 2
    model.eval()
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_vgg_width_scales_every_convolution() -> None:
    model = VGG(SPECS["cifar10"], 11, batch_norm=True, width=0.25)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [16, 32, 64, 64, 128, 128, 128, 128]
    norms = [m.num_features for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert norms == convs and model.classifier[0].in_features == 128
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_standardize_images_matches_torchvision() -> None:
    spec = SPECS["cifar10"]
    x = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(Standardize(spec)(x), Normalize(spec.mean, spec.std)(x))


def test_standardize_flattened_and_channels_last() -> None:
    spec = SPECS["svhn"]
    layer = Standardize(spec)
    x = torch.rand(4, 3, 6, 6)
    expected = Normalize(spec.mean, spec.std)(x)
    torch.testing.assert_close(layer(x.flatten(1)), expected.flatten(1))
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)
    one_value = DataSpec("gray", (3, 2, 2), 10, mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(Standardize(one_value)(x[:, :, :2, :2]), (x[:, :, :2, :2] - 0.5) * 4)
    assert not Standardize(spec).state_dict()  # statistics come from the spec, not checkpoints
    with pytest.raises(ValueError, match="need 1 or 3 values"):
        Standardize(DataSpec("bad", (3, 2, 2), 10, mean=(0.1, 0.2), std=(1.0, 1.0)))


def test_pad_to_32() -> None:
    x = torch.rand(2, 1, 28, 28)
    out = PadTo(28, 28, 32)(x)
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out[:, :, 2:30, 2:30], x)
    out[:, :, 2:30, 2:30] = 0
    assert (out == 0).all()  # the border is zero
    assert not any(isinstance(m, PadTo) for m in input_layers(SPECS["cifar10"], min_size=32))
    assert isinstance(input_layers(SPECS["mnist"], min_size=32)[0], PadTo)


def test_mlp_forward_matches_hand_computation() -> None:
    spec = SPECS["mnist"]
    model = build_model(compose_model("lenet300_100"), spec)
    x = torch.rand(3, 1, 28, 28)
    fc1, fc2, fc3 = (m for m in model.modules() if isinstance(m, nn.Linear))
    h = ((x - spec.mean[0]) / spec.std[0]).flatten(1)
    h = torch.tanh(h @ fc1.weight.T + fc1.bias)
    h = torch.tanh(h @ fc2.weight.T + fc2.bias)
    torch.testing.assert_close(model(x), h @ fc3.weight.T + fc3.bias)


def test_mlp_batch_norm() -> None:
    model = MLP(SPECS["fashion_mnist"], [64, 32], "gelu", batch_norm=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    hidden = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    assert [m.num_features for m in norms] == [64, 32]
    assert all(m.bias is None for m in hidden)
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_autoencoder_forward_matches_hand_computation() -> None:
    spec = DataSpec("mnist", (1, 28, 28), 10, task="classification", mean=(0.5,), std=(0.2,))
    model = Autoencoder(spec)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    sizes = [(m.in_features, m.out_features) for m in layers]
    assert sizes == [(784, 1000), (1000, 500), (500, 250), (250, 30),
                     (30, 250), (250, 500), (500, 1000), (1000, 784)]
    x = torch.rand(3, 1, 28, 28)
    h = x.flatten(1)  # raw pixels: no standardization, whatever the spec's statistics
    for index, layer in enumerate(layers):
        h = h @ layer.weight.T + layer.bias
        if index not in (3, 7):  # linear code layer and logit outputs
            h = torch.sigmoid(h)
        if index == 3:
            torch.testing.assert_close(model.encode(x), h)
    torch.testing.assert_close(model(x), h)
    assert model(x.flatten(1)).shape == (3, 784)


def test_autoencoder_sparse_and_xavier_init() -> None:
    spec = SPECS["mnist"]
    model = Autoencoder(spec, [100, 10], init="sparse")
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        nonzero = (layer.weight != 0).sum(dim=1)
        assert (nonzero == min(15, layer.in_features)).all()
        assert (layer.bias == 0).all()
    dense = Autoencoder(spec, [100, 10], init="xavier")
    assert (dense.encoder[0].weight != 0).all()
    weight = sparse_init_(torch.empty(2000, 400))
    values = weight[weight != 0]
    assert values.numel() == 2000 * 15
    assert abs(values.std().item() - 1.0) < 0.03


def test_lenet5_shapes_and_padding() -> None:
    model = LeNet5(SPECS["fashion_mnist"])
    assert model.classifier[0].in_features == 16 * 5 * 5
    assert isinstance(model.input[0], PadTo)
    avg = LeNet5(SPECS["cifar10"], activation="tanh", pool="avg")
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.modules()) == 2
    assert sum(isinstance(m, nn.Tanh) for m in avg.modules()) == 4


def test_kaiming_and_xavier_init() -> None:
    torch.manual_seed(0)
    resnet = cifar_resnet(SPECS["cifar10"], 20)
    conv = resnet.stages[-1].conv2  # 64 x 64 x 3 x 3, fan_in 576
    assert abs(conv.weight.std().item() / math.sqrt(2 / 576) - 1) < 0.03
    mlp = MLP(SPECS["mnist"], [300, 100], "tanh")
    first = mlp.layers[0].weight
    bound = 5 / 3 * math.sqrt(6 / (784 + 300))
    assert first.abs().max() <= bound and first.abs().max() > 0.99 * bound
    assert all((m.bias == 0).all() for m in mlp.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("option", ["lenet5", "vgg11_bn", "resnet20", "preact_resnet18"])
def test_channels_last_matches_contiguous(option: str) -> None:
    torch.manual_seed(0)
    model = build_model(compose_model(option), SPECS["cifar10"]).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("option", "override", "message"),
    [
        ("mlp", "model.activation=foo",
         r"^model\.activation='foo' is invalid: expected one of relu, "),
        ("mlp", "model.widths=[10,0]", r"^model\.widths=\[10, 0\] is invalid"),
        ("lenet5", "model.pool=sum", r"^model\.pool='sum' is invalid: expected one of max, avg$"),
        ("vgg16", "model.depth=12",
         r"^model\.depth=12 is invalid: expected one of 11, 13, 16, 19$"),
        ("resnet20", "model.depth=21", r"^model\.depth=21 is invalid: expected 6n \+ 2"),
        ("resnet20", "model.shortcut=C", r"^model\.shortcut='C' is invalid: expected one of A, B$"),
        ("preact_resnet18", "model.depth=50",
         r"^model\.depth=50 is invalid: expected one of 18, 34$"),
        ("autoencoder", "model.init=zeros",
         r"^model\.init='zeros' is invalid: expected one of sparse"),
        ("vit", "model.heads=3", r"^model\.dim=64 is invalid: expected a multiple of heads=3$"),
        ("vit", "model.pool=max", r"^model\.pool='max' is invalid: expected one of cls, mean$"),
        ("vit", "model.patch_size=0", r"^model\.patch_size=0 is invalid: expected an integer"),
    ],
)
def test_bad_config_values(option: str, override: str, message: str) -> None:
    cfg = compose_model(option, override)
    with pytest.raises(ValueError, match=message):
        OmegaConf.to_object(cfg)  # what the engine's validation runs before any work
    # the same check runs when a model is built from Python, naming the argument
    with pytest.raises(ValueError, match=message.replace(r"^model\.", "^")):
        build_model(cfg, SPECS["cifar10"])


def test_models_package_registers_schemas() -> None:
    from ngexp.options import REGISTRY

    assert {"mlp", "autoencoder", "lenet5", "vgg", "resnet", "preact_resnet", "vit", "gpt"} <= set(
        REGISTRY["model"])
    assert ngexp.models.build_model is build_model
