"""bench/learning.py's verdict and plot: the targets of issue 12 decided from evaluations."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from selectivemae_ds.models.methods.registry import method_names

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_bench", REPO / "bench" / "learning.py")
learning = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning)

FLOORS = {"majority": 0.5, "raw_pixels_knn": 0.55, "raw_pixels_linear": 0.6, "mean_color_knn": 0.5,
          "mean_color_linear": 0.5}


def _eval(name: str, method: str | None, flops: float, top1: list[float]) -> dict:
    import numpy as np

    return {"encoder": name, "method": method, "pretrain_flops": flops, "finetune_top1": top1,
            "finetune": {"mean": float(np.mean(top1)), "std": float(np.std(top1, ddof=1))}, "knn": 0.6,
            "linear": 0.6, "feature_cosine": 0.5, "between_share": 0.5, "floors": FLOORS}


def test_every_registered_method_is_benchmarked() -> None:
    assert learning.METHODS == method_names()
    assert {"selectivemae", "mae", "crossmae", "simmim", "ctxmim"} <= set(learning.METHODS)


def test_verdict_needs_five_points_and_two_std_and_mae_learning_first() -> None:
    evals = [_eval("init", None, 0.0, [0.60, 0.61, 0.62]),
             _eval("mae_step10", "mae", 2e12, [0.70, 0.71, 0.72]),             # +10 points, std 1
             _eval("selectivemae_step5", "selectivemae", 0.9e12, [0.71, 0.72, 0.73]),
             _eval("selectivemae_step10", "selectivemae", 1.8e12, [0.62, 0.70, 0.78]),  # +9, std 8: no
             _eval("crossmae_step10", "crossmae", 2e12, [0.64, 0.65, 0.66])]  # +4 points: no
    v = learning.verdict({"evals": evals})
    assert v["mae_beats_init_by_5_points"]["met"] is True
    assert v["mae_beats_init_by_5_points"]["gap_points"] == 10.0
    assert v["selectivemae_beats_init_by_5_points"]["encoder"] == "selectivemae_step10"
    assert v["selectivemae_beats_init_by_5_points"]["met"] is False
    assert v["crossmae_beats_init_by_5_points"]["met"] is False
    assert "simmim_beats_init_by_5_points" not in v  # not evaluated: no verdict
    half = v["selectivemae_matches_mae_at_half_flops"]
    assert half["selectivemae"] == "selectivemae_step5" and half["met"] is True
    # The same numbers with MAE not beating init: matching MAE proves nothing.
    evals[1] = _eval("mae_step10", "mae", 2e12, [0.60, 0.61, 0.62])
    assert learning.verdict({"evals": evals})["selectivemae_matches_mae_at_half_flops"]["met"] is False


def test_plot_and_table_cover_every_evaluated_method(tmp_path: Path) -> None:
    evals = [_eval("init", None, 0.0, [0.60, 0.61, 0.62])]
    for i, m in enumerate(method_names()):
        evals.append(_eval(f"{m}_step4", m, 1e12 * (i + 1), [0.6, 0.62, 0.64]))
    result = {"evals": evals, "params": {"ft_epochs": 3}}
    learning.plot(result, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (760, 470)
    table = learning.markdown_table(result)
    assert len(table.splitlines()) == 2 + len(evals)
    assert "| ctxmim_step4 | 5.000 | 0.6000, 0.6200, 0.6400 | 0.6200 +- 0.0200 | 0.6000 | 0.6000 | 0.5000 | 0.5000 |" \
        in table


def test_methods_outside_the_registry_are_refused_before_any_work(tmp_path: Path, capsys) -> None:
    import pytest

    for bad, why in (("selectivemae,byol", "(byol not registered)"), (",", "expected a comma-separated subset")):
        with pytest.raises(SystemExit) as e:
            learning.main(["--work", str(tmp_path / "w"), "--methods", bad])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
