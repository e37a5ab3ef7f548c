"""Per-method config sections: loading, the old [masking] section, recipes, per-method defaults."""
from __future__ import annotations

from pathlib import Path

import pytest

from selectivemae_ds.config import load_config, to_toml
from selectivemae_ds.models.methods import CrossMAEConfig, MAEConfig, SelectiveMAEConfig
from selectivemae_ds.schedules import peak_lr

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "x.toml"
    f.write_text(f'run_dir = "r"\n[data]\npath = "{tmp_path}"\n[train]\nsteps = 2\nglobal_batch = 8\nmicro_batch = 2\n'
                 + text)
    return f


def test_the_method_section_is_the_methods_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[model]\nmethod = "crossmae"\n[crossmae]\ndecode_ratio = 0.5\nweight_fm = true\n'))
    assert cfg.method_cfg == CrossMAEConfig(decode_ratio=0.5, weight_fm=True)
    # --set reaches the active section; switching the method picks that method's section.
    cfg = load_config(DEMO, [f"data.path={tmp_path}", "selectivemae.similarity=max", "selectivemae.with_pos=true"])
    assert cfg.method_cfg == SelectiveMAEConfig(similarity="max", with_pos=True)
    cfg = load_config(DEMO, [f"data.path={tmp_path}", "model.method=mae", "mae.mask_ratio=0.6"])
    assert cfg.method_cfg == MAEConfig(mask_ratio=0.6)


def test_sections_of_other_methods_are_checked_not_used(tmp_path: Path) -> None:
    path = write(tmp_path, '[selectivemae]\nmask_ratio = 0.8\n[mae]\nmask_ratio = 0.6\n')
    assert load_config(path).method_cfg == SelectiveMAEConfig(mask_ratio=0.8)
    assert load_config(path, ["model.method=mae"]).method_cfg == MAEConfig(mask_ratio=0.6)
    with pytest.raises(ValueError, match=r"^mae\.mask_ratio: must be in \(0, 1\), got 1\.5"):
        load_config(path, ["mae.mask_ratio=1.5"])
    with pytest.raises(ValueError, match=r"^crossmae\.weightfm: unknown key"):
        load_config(write(tmp_path, "[crossmae]\nweightfm = true\n"))


def test_resolved_config_round_trips_with_its_method_section(tmp_path: Path) -> None:
    cfg = load_config(DEMO, [f"data.path={tmp_path}", "model.method=crossmae", "crossmae.weight_fm=true"])
    text = to_toml(cfg)
    assert "[crossmae]\nmask_ratio = 0.75\ndecode_ratio = 0.25\nweight_fm = true" in text
    assert "[selectivemae]" not in text and "[masking]" not in text
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(text)
    assert load_config(resolved) == cfg


def test_old_masking_section_names_each_new_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[masking]\nmask_ratio = 0.8\nmae_mask_ratio = 0.7\ntemperature = 2.0\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert str(e.value) == (
        "masking: the [masking] section was split into one section per method ([selectivemae], [mae], [crossmae]); "
        "rename masking.mask_ratio -> selectivemae.mask_ratio; masking.mae_mask_ratio -> mae.mask_ratio or "
        "crossmae.mask_ratio; masking.temperature -> selectivemae.init_temperature"
    )
    with pytest.raises(ValueError, match=r"masking\.decode_ratio -> selectivemae\.decode_ratio or crossmae\.decode_ratio"):
        load_config(DEMO, [f"data.path={tmp_path}", "masking.decode_ratio=0.3"])


def test_grad_clip_defaults_to_the_methods_recipe(tmp_path: Path) -> None:
    base = [f"data.path={tmp_path}"]
    assert load_config(DEMO, base).optim.grad_clip == 1.0  # selectivemae: documented deviation
    assert load_config(DEMO, [*base, "model.method=mae"]).optim.grad_clip == 0.0
    assert load_config(DEMO, [*base, "model.method=crossmae"]).optim.grad_clip == 0.0
    assert load_config(DEMO, [*base, "model.method=mae", "optim.grad_clip=2.5"]).optim.grad_clip == 2.5


RECIPES = {
    # name: (method, size, method config, global batch, warmup epochs, grad clip, peak lr)
    "selectivemae_vitb_800ep": ("selectivemae", "base", SelectiveMAEConfig(), 1024, 60, 1.0,
                                1.5e-4 * 1024 / 256 * 0.25 / 0.85),
    "selectivemae_vitl_800ep": ("selectivemae", "large", SelectiveMAEConfig(), 1024, 60, 1.0,
                                1.5e-4 * 1024 / 256 * 0.25 / 0.85),
    "mae_vitb_800ep": ("mae", "base", MAEConfig(), 4096, 40, 0.0, 1.5e-4 * 4096 / 256),
    "mae_vitl_800ep": ("mae", "large", MAEConfig(), 4096, 40, 0.0, 1.5e-4 * 4096 / 256),
    "crossmae_vitb_800ep": ("crossmae", "base", CrossMAEConfig(weight_fm=True, use_input=True), 4096, 40, 0.0,
                            1.5e-4 * 4096 / 256 * 0.25 / 0.75),
    "crossmae_vitl_800ep": ("crossmae", "large", CrossMAEConfig(decode_ratio=0.75, weight_fm=True, use_input=True),
                            4096, 40, 0.0, 1.5e-4 * 4096 / 256),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_parse_and_name_their_source(tmp_path: Path, name: str) -> None:
    method, size, method_cfg, batch, warmup, clip, lr = RECIPES[name]
    path = REPO / "configs" / f"{name}.toml"
    cfg = load_config(path, [f"data.path={tmp_path}"])
    assert (cfg.model.method, cfg.model.size, cfg.method_cfg) == (method, size, method_cfg)
    assert (cfg.train.epochs, cfg.train.global_batch, cfg.optim.warmup_epochs) == (800, batch, warmup)
    assert cfg.optim.grad_clip == clip and cfg.optim.blr == pytest.approx(1.5e-4)
    assert peak_lr(cfg) == pytest.approx(lr)
    header = path.read_text().split("run_dir")[0]
    assert "Deviations" in header and ("paper" in header or "README" in header)
