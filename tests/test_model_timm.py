"""The encoder's weights map one-to-one onto timm's ViTs (the export relies on it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from selectivemae_ds.models import ModelConfig, build_model, timm_model_name
from selectivemae_ds.models.vit import ViTEncoder


def test_tiny_encoder_loads_strictly_into_timm_with_identical_features(assets_dir: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", img_size=96, decoder_depth=1, decoder_dim=64))
    model.eval()
    reference = timm.create_model(timm_model_name(model.model_cfg), pretrained=False, num_classes=0, img_size=96)
    reference.eval()
    reference.load_state_dict(model.encoder.state_dict(), strict=True)

    img = Image.open(assets_dir / "OSBS_029.png").convert("RGB").resize((96, 96), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = model.encoder.forward_features(x)
        theirs = reference.forward_features(x)
        # Encoding all patches through the masked path gives the same features.
        every = torch.arange(36).unsqueeze(0)
        masked_path = model.encoder.forward_visible(model.encoder.embed_patches(x), every)
    assert ours.shape == theirs.shape == (1, 37, 192)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(masked_path, theirs, atol=1e-5)
    # And the other way: timm weights load strictly into ours.
    fresh = ViTEncoder("tiny", img_size=96)
    fresh.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("size,img_size", [("small", 224), ("base", 224), ("base", 128), ("large", 224), ("huge", 224)])
def test_keys_and_shapes_match_timm(size: str, img_size: int) -> None:
    cfg = ModelConfig(size=size, img_size=img_size)
    # Meta device: shapes only, no memory or init cost, even for ViT-H.
    with torch.device("meta"):
        ours = ViTEncoder(size, img_size=img_size, patch_size=cfg.resolved_patch_size()).state_dict()
        theirs = timm.create_model(timm_model_name(cfg), pretrained=False, num_classes=0, img_size=img_size).state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
