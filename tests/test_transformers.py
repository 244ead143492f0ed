"""The transformer family (model=vit, model=gpt): blocks against torch's own
``nn.TransformerEncoderLayer``, shapes, causality, training, and model x data errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngexp.optim
from ngexp.cli import main
from ngexp.data.spec import DataSpec
from ngexp.errors import IncompatibleData
from ngexp.models.gpt import GPT
from ngexp.models.transformer import Block, Encoder
from ngexp.models.vit import ViT
from tests.helpers import read_summary, requires_fashion_mnist, run_dirs

FASHION = DataSpec("fashion_mnist", (1, 28, 28), 10, mean=(0.2860,), std=(0.3530,))
CIFAR = DataSpec("cifar10", (3, 32, 32), 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TEXT = DataSpec("text", (12,), 7, "language_model")


def torch_layer(block: Block) -> nn.TransformerEncoderLayer:
    """torch's pre-norm encoder layer (GELU) holding ``block``'s weights."""
    dim = block.norm1.normalized_shape[0]
    layer = nn.TransformerEncoderLayer(dim, block.attention.num_heads, block.mlp[0].out_features,
                                       dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True, dtype=block.norm1.weight.dtype)
    pairs = {"self_attn": "attention", "linear1": "mlp.0", "linear2": "mlp.2", "norm1": "norm1",
             "norm2": "norm2"}
    state = block.state_dict()
    layer.load_state_dict({key: state[key.replace(theirs, ours, 1)]
                           for key in layer.state_dict()
                           for theirs, ours in pairs.items() if key.startswith(theirs)})
    return layer.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_block_matches_torch_encoder_layer(causal: bool) -> None:
    torch.manual_seed(0)
    block = Block(16, heads=4, mlp_ratio=2.0, dropout=0.0).double()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for norm in (block.norm1, block.norm2):
            norm.weight.normal_()
            norm.bias.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1) if causal else None
    expected = torch_layer(block)(x, src_mask=mask, is_causal=causal)
    torch.testing.assert_close(block(x, mask), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("spec", [FASHION, CIFAR], ids=["28x28", "32x32"])
def test_vit_shapes(pool: str, spec: DataSpec) -> None:
    model = ViT(spec, pool=pool)
    patches = 16 if spec is FASHION else 25  # 32x32 is padded to 35x35: 5x5 patches of 7x7
    assert model.position.num_embeddings == patches + (pool == "cls")
    assert model(torch.rand(2, *spec.input_shape)).shape == (2, 10)


def test_vit_parameters_are_all_in_known_layers() -> None:
    """No raw nn.Parameter: every parameter belongs to a Conv2d, Embedding, LayerNorm,
    MultiheadAttention or Linear (the layer types the curvature capture covers)."""
    model = ViT(FASHION)
    covered = (nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention, nn.Linear)
    owned = {id(p) for m in model.modules() if isinstance(m, covered)
             for p in m.parameters(recurse=False)}
    assert all(id(p) in owned for p in model.parameters())


def test_vit_mean_pool_is_permutation_invariant_without_positions() -> None:
    """With the position embedding zeroed, mean pooling cannot tell patches apart: permuting
    the 4 quadrants of a 14x14 image (7x7 patches) leaves the logits unchanged."""
    torch.manual_seed(0)
    spec = DataSpec("small", (1, 14, 14), 3)
    model = ViT(spec, pool="mean").double()
    with torch.no_grad():
        model.position.weight.zero_()
    x = torch.rand(2, 1, 14, 14, dtype=torch.float64)
    swapped = x.clone()
    swapped[..., :7, :], swapped[..., 7:, :] = x[..., 7:, :], x[..., :7, :]
    torch.testing.assert_close(model(swapped), model(x))


def test_gpt_shapes_and_causality() -> None:
    """Changing token t changes the logits at t.. only, never those before it."""
    torch.manual_seed(0)
    model = GPT(TEXT, dim=16, heads=2).double().eval()
    tokens = torch.randint(0, 7, (2, 12))
    outputs = model(tokens)
    assert outputs.shape == (2, 12, 7)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 7
        other = model(changed)
        torch.testing.assert_close(other[:, :t], outputs[:, :t], rtol=0, atol=0)
        assert (other[:, t] - outputs[:, t]).abs().max() > 1e-6


def test_gpt_shorter_sequences_and_too_long() -> None:
    model = GPT(TEXT, dim=16, heads=2)
    assert model(torch.randint(0, 7, (1, 4))).shape == (1, 4, 7)
    with pytest.raises(ValueError, match="13 tokens is longer than the 12 positions"):
        model(torch.randint(0, 7, (1, 13)))


def test_gpt_tied_weights() -> None:
    untied, tied = GPT(TEXT, dim=16, heads=2), GPT(TEXT, dim=16, heads=2, tie_weights=True)
    assert tied.head.weight is tied.token.weight
    assert (sum(p.numel() for p in untied.parameters())
            - sum(p.numel() for p in tied.parameters())) == 7 * 16


@pytest.mark.parametrize("family", ["vit", "gpt"])
def test_few_steps_reduce_the_loss(family: str) -> None:
    torch.manual_seed(0)
    if family == "vit":
        model: nn.Module = ViT(DataSpec("small", (1, 14, 14), 4), dim=32, depth=2)
        inputs, targets = torch.rand(32, 1, 14, 14), torch.randint(0, 4, (32,))
    else:
        model = GPT(TEXT, dim=32, heads=4)  # text counting up mod 7 from random starts
        inputs = (torch.randint(0, 7, (16, 1)) + torch.arange(13)) % 7
        inputs, targets = inputs[:, :-1], inputs[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        outputs = model(inputs)
        return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())

    first = float(loss().detach())
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.5 * first


@pytest.mark.parametrize(("build", "spec", "message"), [
    (ViT, TEXT, "the ViT needs image data, but data 'text' has token ids of shape (12,)"),
    (GPT, FASHION, "the GPT needs tokens data, but data 'fashion_mnist' has images of shape"),
])
def test_model_data_mismatch_names_both(build: type, spec: DataSpec, message: str) -> None:
    with pytest.raises(IncompatibleData) as error:
        build(spec)
    assert str(error.value).startswith(message)


def test_encoder_causal_mask_is_upper_triangle() -> None:
    """The causal encoder equals the plain one given the mask explicitly."""
    torch.manual_seed(0)
    causal = Encoder(8, 1, 2, 2.0, 0.0, causal=True).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    expected = causal.norm(causal.blocks[0](x, mask))
    torch.testing.assert_close(causal(x), expected)


@pytest.mark.parametrize("preconditioner", ["KFAC", "EKFAC", "NaturalGradient"])
def test_every_parameter_is_preconditioned(preconditioner: str) -> None:
    """The transformer models are built from layers the curvature capture covers: no parameter
    of the ViT or the (untied) GPT keeps the plain gradient."""
    build = getattr(ngexp.optim, preconditioner)
    for model, task in ((ViT(DataSpec("small", (1, 14, 14), 3)), "classification"),
                        (GPT(TEXT, dim=16, heads=2), "language_model")):
        coverage = build(model, task=task).coverage
        assert coverage.plain == [] and coverage.share == 1.0, coverage.plain


@requires_fashion_mnist
@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_vit_learns_fashion_mnist_from_the_cli(optimizer: str, tmp_path: Path) -> None:
    """``ngexp train model=vit optimizer=kfac|ekfac`` (the ViT presets) on real Fashion-MNIST:
    60 steps on 4,000 images reach a test accuracy far above chance (0.1), with every
    parameter preconditioned."""
    assert main(["train", f"+experiment=vit_{optimizer}", "data.subset=4000",
                 "trainer.max_steps=60", "trainer.progress=none", "logger=[]",
                 f"output_root={tmp_path}"]) == 0
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["final"]["test/acc"] > 0.4
    log = (run / "train.log").read_text()
    assert "preconditions 44 parameter tensors" in log and "values, 100.0%)" in log
    assert "keep the plain gradient" not in log
