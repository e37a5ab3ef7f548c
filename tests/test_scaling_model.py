"""bench/scaling_model.py against values worked out by hand (docs/training.md, "Scaling model")."""
from __future__ import annotations

import pytest

from bench.scaling_model import Network, all_reduce_s, min_micro_batch, reduce_scatter_s, step_time

# Round numbers: NVLink 400 GB/s per GPU, 100 GB/s into each node, line rate = achieved.
NET = Network(nvlink=400e9, node=100e9)


def test_hierarchical_collectives_by_hand() -> None:
    # 1 GB over 2 nodes x 8 GPUs: 7/8 * 1e9 / 400e9 + 1/2 * 1e9 / 100e9 = 2.1875 ms + 5 ms.
    assert reduce_scatter_s(1e9, 2, NET) == pytest.approx(7.1875e-3)
    assert all_reduce_s(1e9, 2, NET) == pytest.approx(14.375e-3)
    # One node: NVLink only.
    assert reduce_scatter_s(1e9, 1, NET) == pytest.approx(2.1875e-3)


def test_network_from_line_rates() -> None:
    # 8 NICs of 400 Gb/s = 400 GB/s into the node, times 0.8 efficiency; NVLink 450 GB/s x 0.8.
    net = Network.from_args(400.0, 450.0, 8, 0.8)
    assert net.node == pytest.approx(320e9) and net.nvlink == pytest.approx(360e9)


def test_zero2_step_by_hand() -> None:
    # 1e8 parameters (200 MB of bf16 gradients), 2 nodes, buckets of 5e7 elements (the last: 100 MB).
    # Compute: 10 images x 1 TFLOP / (0.5 x 1000 TFLOP/s) = 20 ms; backward 2/3 of it = 13.33 ms.
    # RS(200 MB) = 0.4375 + 1.0 = 1.4375 ms; last bucket RS(100 MB) = 0.71875 ms, the rest (0.71875 ms)
    # hides in the backward; AG(200 MB) = 1.4375 ms after the step, never hidden.
    t = step_time(2, int(1e8), 2, 10, 1, 1e12, 0.5, 1000.0, NET, 5e7)
    assert t["compute_ms"] == pytest.approx(20.0)
    assert t["comm_ms"] == pytest.approx(2.875)
    assert t["exposed_ms"] == pytest.approx(0.71875 + 1.4375)
    assert t["efficiency"] == pytest.approx(20.0 / (20.0 + 2.15625))
    assert t["efficiency_no_overlap"] == pytest.approx(20.0 / 22.875)


def test_zero1_hides_nothing_and_zero3_hides_behind_both_passes() -> None:
    z1 = step_time(1, int(1e8), 2, 10, 1, 1e12, 0.5, 1000.0, NET, 5e8)
    assert z1["exposed_ms"] == pytest.approx(z1["comm_ms"]) == pytest.approx(2.875)
    # ZeRO-3: AG (1.4375 ms) < forward (6.67 ms); AG + RS (2.875 ms) < backward (13.3 ms): all hidden.
    z3 = step_time(3, int(1e8), 2, 10, 1, 1e12, 0.5, 1000.0, NET, 5e8)
    assert z3["comm_ms"] == pytest.approx(3 * 1.4375) and z3["exposed_ms"] == 0.0 and z3["efficiency"] == 1.0


def test_min_micro_batch_is_the_first_to_reach_the_target() -> None:
    # ZeRO-1 exposes 2.875 ms; 90% needs compute >= 9 x 2.875 = 25.875 ms = 12.94 images of 2 ms: 13.
    assert min_micro_batch(0.9, 1, int(1e8), 2, 1e12, 0.5, 1000.0, NET, 5e8) == 13
    with pytest.raises(ValueError, match="ZeRO stage 4"):
        step_time(4, int(1e8), 2, 10, 1, 1e12, 0.5, 1000.0, NET, 5e8)
