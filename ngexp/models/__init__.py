"""Model families. Importing this package registers every ``schema/model/*`` config schema."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from ngexp.data.spec import DataSpec
from ngexp.models import autoencoder as autoencoder
from ngexp.models import bnlstm as bnlstm
from ngexp.models import gpt as gpt
from ngexp.models import lenet as lenet
from ngexp.models import mlp as mlp
from ngexp.models import resnet as resnet
from ngexp.models import vgg as vgg
from ngexp.models import vit as vit
from ngexp.targets import instantiate


def build_model(cfg: DictConfig, spec: DataSpec) -> nn.Module:
    """The model of config node ``cfg`` (``cfg.model`` of a run) for data described by ``spec``."""
    return instantiate(cfg, key="model", _partial_=True)(spec=spec)
