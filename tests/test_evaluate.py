import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from PIL import Image

from selectivemae_ds import evaluate
from selectivemae_ds.errors import DataError
from selectivemae_ds.evaluate import (build_treecrown_set, feature_spread, fixed_split, knn_accuracy,
                                      linear_probe_accuracy, list_image_folder, load_images, main)


@pytest.fixture(scope="module")
def treecrowns(tmp_path_factory, assets_dir):
    out = tmp_path_factory.mktemp("treecrowns")
    counts = build_treecrown_set(assets_dir, out)
    return out, counts


def test_treecrown_set_holds_every_annotated_crown(treecrowns, assets_dir):
    out, counts = treecrowns
    annotated = sum(len(list(ET.parse(p).getroot().iter("object"))) for p in assets_dir.glob("*.xml"))
    assert annotated == 377
    assert counts["tree"] == annotated
    # One background square per crown where the scene leaves room: most of them.
    assert 0.8 * annotated <= counts["background"] <= annotated
    paths, labels, classes = list_image_folder(out)
    assert classes == ["background", "tree"]
    assert np.bincount(labels).tolist() == [counts["background"], counts["tree"]]


def test_fixed_split_is_stratified_disjoint_and_repeatable():
    labels = np.array([0] * 10 + [1] * 30)
    train, test = fixed_split(labels, 0.3, seed=1)
    assert set(train).isdisjoint(test) and len(train) + len(test) == 40
    assert np.bincount(labels[test]).tolist() == [3, 9]
    again = fixed_split(labels, 0.3, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    with pytest.raises(ValueError, match="test-fraction"):
        fixed_split(labels, 1.0, seed=0)


def test_knn_votes_by_similarity():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test_x = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.4]])
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0, 1, 0]), k=2) == 1.0
    # With k = all four points the third sample is still closer to class 0 in summed similarity.
    assert knn_accuracy(train_x, train_y, test_x, torch.tensor([0, 1, 1]), k=4) == pytest.approx(2 / 3)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    y = (x[:, 3] + 0.5 * x[:, 7] > 0).long()
    assert linear_probe_accuracy(x[:150], y[:150], x[150:], y[150:]) >= 0.95


def test_feature_spread_tells_collapsed_from_spread_features():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 32, generator=g)
    assert feature_spread(row.repeat(10, 1)) == {"feature_cosine": 1.0, "between_share": 0.0}
    # x and -x (zero-mean rows): a fresh LayerNorm keeps them opposite, their common mean is 0.
    x = row - row.mean()
    assert feature_spread(torch.cat([x, -x])) == {"feature_cosine": -1.0, "between_share": 1.0}
    # A large shared offset with small differences, as in a collapsed encoder.
    spread = feature_spread(100 * row + 0.5 * torch.randn(64, 32, generator=g))
    assert spread["feature_cosine"] > 0.99 and spread["between_share"] < 0.01


def test_cli_knn_prints_counts_and_floors_on_the_real_set(treecrowns, capsys):
    out, counts = treecrowns
    rc = main(["knn", "--weights", "init", "--config", "configs/demo.toml", "--img-size", "32", "--workers", "0",
               "--data", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    total = counts["tree"] + counts["background"]
    assert result["n_train"] + result["n_test"] == total
    assert result["n_test"] == round(counts["tree"] * 0.3) + round(counts["background"] * 0.3)
    assert result["classes"] == ["background", "tree"]
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["encoder"].startswith("init(") and result["img_size"] == 32
    assert -1.0 <= result["feature_cosine"] <= 1.0 and 0.0 <= result["between_share"] <= 1.0
    assert set(result["floors"]) == {"majority", "raw_pixels_knn", "raw_pixels_linear", "mean_color_knn",
                                     "mean_color_linear"}


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["knn", "--weights", "init", "--data", str(tmp_path / "none")]) == 3
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    assert main(["linear", "--weights", "init", "--data", str(tmp_path)]) == 3
    assert ">= 2 class folders" in capsys.readouterr().err


def test_empty_class_folder_is_refused_not_scored(tmp_path, capsys):
    """Once reported "accuracy": 1.0 over classes [a, b] with b empty."""
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    for k in range(4):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(tmp_path / "a" / f"{k}.png")
    assert main(["knn", "--weights", "init", "--config", "configs/demo.toml", "--data", str(tmp_path)]) == 3
    assert f"--data {tmp_path}: class folder 'b' holds no images" in capsys.readouterr().err


def test_non_image_file_is_a_data_error_naming_it(tmp_path):
    """eval and visualize read images through load_images: a text file named .png stops there."""
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (16, 16)).save(good)
    bad.write_text("not a png")
    assert load_images([good], 8).shape == (1, 3, 8, 8)
    with pytest.raises(DataError, match=f"{bad}: not a readable image"):
        load_images([good, bad], 8)


def test_make_treecrowns_assets_default_and_installed_wheel(tmp_path, monkeypatch, capsys):
    assert evaluate.bundled_assets() is not None  # a source checkout
    monkeypatch.setattr(evaluate, "bundled_assets", lambda: None)  # what an installed wheel sees
    assert main(["make-treecrowns", "--out", str(tmp_path / "tc")]) == 2
    assert "--assets is required here" in capsys.readouterr().err
    assert main(["make-treecrowns", "--assets", str(tmp_path), "--out", str(tmp_path / "tc")]) == 3
    assert "no VOC .xml annotations" in capsys.readouterr().err
