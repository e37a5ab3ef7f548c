"""Pictures: the grid's panels hold what they claim, and smae-visualize draws a checkpoint's."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from selectivemae_ds.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from selectivemae_ds.errors import EXIT_CONFIG, EXIT_DATA
from selectivemae_ds.evaluate import load_images
from selectivemae_ds.models import ModelConfig, build_model, patchify
from selectivemae_ds.visualize import build_parser, main, picture_grid
from tests.shard_fixtures import source_images


def test_grid_panels_show_input_hog_visible_and_targets(assets_dir):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", img_size=64, decoder_depth=1, decoder_dim=64, decoder_heads=2)).eval()
    imgs = load_images(source_images(assets_dir)[:3], 64, center_crop=True)
    with torch.no_grad():
        details = model.forward_details(imgs, 0.1)
    grid = picture_grid(imgs, details, 16)
    assert grid.shape == (3, 3 * 64, 5 * 64) and 0.0 <= grid.min() and grid.max() <= 1.0
    rows = grid.view(3, 3, 64, 5, 64).permute(1, 3, 0, 2, 4)  # (image, panel, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(3):
        rgb = (imgs[i] * std + mean).clamp(0, 1)
        torch.testing.assert_close(rows[i, 0], rgb)
        hog_panel = patchify(rows[i, 1][None], 16)[0, :, 0]  # one value per patch
        assert hog_panel[details["hog"][i].argmax()] == 1.0 and hog_panel[details["hog"][i].argmin()] == 0.0
        vis_panel, tgt_panel, src = (patchify(rows[i, k][None], 16)[0] for k in (2, 3, 0))
        vis, tgt = details["visible_idx"][i], details["target_idx"][i]
        torch.testing.assert_close(vis_panel[vis], src[vis])
        torch.testing.assert_close(tgt_panel[tgt], src[tgt])
        hidden = torch.ones(16, dtype=torch.bool)
        hidden[vis] = False
        assert torch.all(vis_panel[hidden] == 0.5)


def test_cli_draws_a_checkpoint(tmp_path, straight_run, assets_dir, capsys):
    run = straight_run("zero2.json")
    images = [str(p) for p in source_images(assets_dir)[:2]]
    out = tmp_path / "grid.png"
    assert main([str(run), *images, "--out", str(out), "--progress", "0.5"]) == 0
    assert "input | hog | visible | targets | reconstruction" in capsys.readouterr().out
    assert Image.open(out).size == (5 * 64, 2 * 64)
    assert main([str(run), str(tmp_path / "nope.png"), "--out", str(out)]) == EXIT_DATA
    assert "data error: no such image(s)" in capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """Make reading a checkpoint fail loudly: the checks under test must come before it."""
    from selectivemae_ds import export

    def refuse(*_args, **_kwargs):
        raise AssertionError("the checkpoint was read before the command line was checked")

    monkeypatch.setattr(export, "resolve_tag", refuse)
    monkeypatch.setattr(export, "load_fp32_state", refuse)


@pytest.mark.parametrize("name, problem", [("grid", "no image extension ''"), ("grid.xyz", "unknown image extension"),
                                           ("grid.xbm", "cannot store an RGB picture")])
def test_out_without_a_usable_extension_is_refused_before_loading(tmp_path, assets_dir, no_loading, capsys,
                                                                   name, problem):
    """Before: the extension was found wrong by Pillow after the model had run (ValueError traceback)."""
    image = str(source_images(assets_dir)[0])
    out = tmp_path / name
    assert main([str(tmp_path), image, "--out", str(out)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"config error: --out {out}: " in err and problem in err
    assert not out.exists()


def test_out_directory_and_bad_progress_are_refused_before_loading(tmp_path, assets_dir, no_loading, capsys):
    image = str(source_images(assets_dir)[0])
    assert main([str(tmp_path), image, "--out", str(tmp_path)]) == EXIT_CONFIG
    assert f"--out {tmp_path}: is a directory" in capsys.readouterr().err
    assert main([str(tmp_path), image, "--out", str(tmp_path / "g.png"), "--progress", "1.5"]) == EXIT_CONFIG
    assert "--progress must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main([str(tmp_path), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "g.png")]) == EXIT_DATA
    assert f"no such image(s): {tmp_path / 'nope.jpg'}" in capsys.readouterr().err


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.dest
