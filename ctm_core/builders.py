"""Networks, optimisers and discriminators built from a config: the one place that maps
config sections to constructors, shared by training, sampling and evaluation."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import GANConfig, ModelConfig, OptimConfig, TrainConfig
from .parameterization import CTMModel

# Images up to this size get the from-scratch patch discriminator under gan.discriminator=auto: ImageNet
# features of a 16 px image upsampled to 224 judge interpolation artefacts, not digits.
SMALL_IMAGE_PX = 16


def data_meta(dataset) -> dict[str, Any]:
    """What a checkpoint must remember of the data to rebuild its network without the data."""
    return {"data_shape": list(dataset.data_shape), "num_classes": int(dataset.num_classes), "kind": dataset.kind}


def build_backbone(model: ModelConfig, meta: dict[str, Any], class_conditional: bool) -> nn.Module:
    from .networks import MLPBackbone, UNetBackbone

    shape, kind = tuple(meta["data_shape"]), meta["kind"]
    num_classes = meta["num_classes"] if class_conditional else 0
    if class_conditional and not num_classes:
        raise ValueError("data.class_conditional is set but the dataset has no labels")
    arch = model.arch if model.arch != "auto" else ("mlp" if kind == "vector" else "unet")
    if arch == "mlp":
        if len(shape) != 1:
            raise ValueError(f"model.arch 'mlp' needs vector data (n, d); the data has shape {shape}")
        return MLPBackbone(shape[0], hidden=model.hidden, depth=model.depth, emb_dim=model.emb_dim,
                           num_classes=num_classes, dropout=model.dropout)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"model.arch 'unet' needs square images (n, c, h, h); the data has shape {shape}")
    return UNetBackbone(shape[1], shape[0], model_channels=model.model_channels, channel_mult=model.channel_mult,
                        num_blocks=model.num_blocks, attn_resolutions=model.attn_resolutions,
                        dropout=model.dropout, num_classes=num_classes)


def build_model(config: TrainConfig, meta: dict[str, Any]) -> CTMModel:
    backbone = build_backbone(config.model, meta, config.data.class_conditional)
    return CTMModel(backbone, config.process)


def build_optimizer(params, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """fused: Adam(W)'s fused kernels; RAdam has none and takes its multi-tensor (foreach) path instead."""
    kwargs: dict[str, Any] = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if optim.name == "radam":
        return torch.optim.RAdam(params, foreach=True if fused else None, **kwargs)
    if fused:
        kwargs["fused"] = True
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(params, **kwargs)


def build_discriminator(gan: GANConfig, meta: dict[str, Any], cache_dir: str | None) -> nn.Module:
    from . import discriminators

    kind, shape = gan.discriminator, tuple(meta["data_shape"])
    if kind == "auto":
        kind = "vector" if meta["kind"] == "vector" else ("patch" if shape[-1] <= SMALL_IMAGE_PX else "projected")
    if kind == "vector":
        if len(shape) != 1:
            raise ValueError(f"gan.discriminator 'vector' needs vector data; the data has shape {shape}")
        return discriminators.VectorDiscriminator(shape[0])
    if len(shape) != 3:
        raise ValueError(f"gan.discriminator {kind!r} needs images (c, h, w); the data has shape {shape}")
    augment = {} if gan.augment else {"diffaug_policy": None}
    if kind == "patch":
        return discriminators.PatchDiscriminator(shape[0], shape[-1], **augment)
    return discriminators.build_paper_discriminator(cache_dir=cache_dir, **augment)
