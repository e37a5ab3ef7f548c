"""Scaling model: bytes ZeRO-1/2/3 move per step against the step's compute time, and the
resulting efficiency on 2-16 nodes of 8 GPUs (docs/training.md, "Scaling model").

    python bench/scaling_model.py                     # JSON on stdout: inputs, per-model bytes, tables
    python bench/scaling_model.py --markdown          # the tables docs/training.md shows
    python bench/scaling_model.py --mfu 0.5 --global-batch 1024

Everything here is arithmetic on stated inputs; nothing is measured. Compute time is
FLOP-derived (selectivemae_ds.models.flops at ``--mfu`` of ``--peak-tflops``) because no GPU
run exists yet; replace ``--mfu`` by the measured model-only MFU once bench/results has one.

Collectives (hierarchical, as NCCL runs them on nodes of g GPUs joined by NVLink, n nodes):
  reduce-scatter(S) = all-gather(S) = (g-1)/g * S / B_nvlink + (n-1)/n * S / B_node
  all-reduce(S)     = reduce-scatter(S) + all-gather(S)
where S is the tensor's bytes, B_nvlink one GPU's NVLink bandwidth per direction and
B_node a node's inter-node bandwidth (g NICs of ``--link-gbps`` each: one NIC per GPU, the
HGX layout; ``--nics-per-node 1`` for a node with one NIC). Both are line rates times
``--link-efficiency`` (the fraction NCCL's bus bandwidth reaches). Latency terms are left out:
at these sizes (>= 200 MB per collective) they are under 1%.

Per training step, with P parameters, bf16 gradients and bf16 parameters (2 bytes each; the
configs in ds_configs/ set no communication_data_type), A micro-steps of accumulation:
  ZeRO-1: reduce-scatter(2P) once per step, at the accumulation boundary; all-gather(2P) of
          the updated parameters after the optimizer step.
  ZeRO-2: reduce-scatter(2P) every micro-step (gradients are partitioned, so each micro-step's
          are reduced at once); all-gather(2P) after the optimizer step.
  ZeRO-3: every micro-step all-gather(2P) for the forward, all-gather(2P) for the backward and
          reduce-scatter(2P) of the gradients.
Overlap (what DeepSpeed can hide behind compute, with overlap_comm as in ds_configs/):
  - ZeRO-1 (overlap_comm off in zero1.json): nothing is hidden.
  - ZeRO-2: gradient buckets other than the last are reduced during the backward pass (2/3
    of the compute); the last bucket (min(reduce_bucket_size, P) elements) starts only when
    the backward ends. The parameter all-gather follows the optimizer step: never hidden.
  - ZeRO-3: the forward all-gather is prefetched during the forward (1/3 of the compute), the
    backward all-gather and the reduce-scatter during the backward (2/3).
Efficiency = compute time / (compute time + exposed communication): the fraction of linear
scaling kept, with the input pipeline assumed hidden (bench/results: e2e / model-only).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from selectivemae_ds.models import ModelConfig, build_model  # noqa: E402
from selectivemae_ds.models.flops import flops_per_image  # noqa: E402

GPUS_PER_NODE = 8
BYTES_GRAD = 2  # bf16 gradients (ds_configs: bf16 enabled, no communication_data_type)
BYTES_PARAM = 2  # bf16 parameters gathered after the step (ZeRO-1/2) or for each pass (ZeRO-3)
STAGES = (1, 2, 3)


@dataclass(frozen=True)
class Network:
    """Bandwidths in bytes/s (after link efficiency) of one node's GPUs and NICs."""

    nvlink: float  # one GPU's NVLink bandwidth, one direction
    node: float  # the node's inter-node bandwidth, all its NICs together

    @classmethod
    def from_args(cls, link_gbps: float, nvlink_gbs: float, nics_per_node: int, efficiency: float) -> Network:
        return cls(nvlink=nvlink_gbs * 1e9 * efficiency, node=nics_per_node * link_gbps / 8 * 1e9 * efficiency)


def reduce_scatter_s(size_bytes: float, nodes: int, net: Network, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """Seconds of a hierarchical reduce-scatter (= all-gather) of `size_bytes` over nodes x gpus_per_node."""
    intra = (gpus_per_node - 1) / gpus_per_node * size_bytes / net.nvlink
    inter = (nodes - 1) / nodes * size_bytes / net.node
    return intra + inter


def all_reduce_s(size_bytes: float, nodes: int, net: Network, gpus_per_node: int = GPUS_PER_NODE) -> float:
    return 2 * reduce_scatter_s(size_bytes, nodes, net, gpus_per_node)


def compute_s(micro_batch: int, flops_img: float, mfu: float, peak_tflops: float) -> float:
    """One micro-step's forward + backward seconds at the stated MFU."""
    return micro_batch * flops_img / (mfu * peak_tflops * 1e12)


def step_time(stage: int, params: int, nodes: int, micro_batch: int, accum: int, flops_img: float, mfu: float,
              peak_tflops: float, net: Network, bucket_elems: float) -> dict[str, float]:
    """Compute, total and exposed communication seconds of one optimizer step, and the efficiency."""
    tc = compute_s(micro_batch, flops_img, mfu, peak_tflops)
    fwd, bwd = tc / 3, 2 * tc / 3
    grad_b, param_b = params * BYTES_GRAD, params * BYTES_PARAM
    rs = reduce_scatter_s(grad_b, nodes, net)
    ag = reduce_scatter_s(param_b, nodes, net)
    if stage == 1:
        comm = exposed = rs + ag
    elif stage == 2:
        last = min(bucket_elems, params) * BYTES_GRAD
        rs_last = reduce_scatter_s(last, nodes, net)
        rs_rest = rs - rs_last
        per_micro_exposed = rs_last + max(0.0, rs_rest - bwd)
        comm = accum * rs + ag
        exposed = accum * per_micro_exposed + ag
    elif stage == 3:
        per_micro = 2 * ag + rs
        per_micro_exposed = max(0.0, ag - fwd) + max(0.0, ag + rs - bwd)
        comm = accum * per_micro
        exposed = accum * per_micro_exposed
    else:
        raise ValueError(f"ZeRO stage {stage}: expected 1, 2 or 3")
    compute = accum * tc
    return {"compute_ms": compute * 1e3, "comm_ms": comm * 1e3, "exposed_ms": exposed * 1e3,
            "efficiency": compute / (compute + exposed), "efficiency_no_overlap": compute / (compute + comm)}


def bytes_per_step(stage: int, params: int, accum: int) -> dict[str, float]:
    """Bytes each collective moves per optimizer step (the tensor sizes S, before the (k-1)/k factors)."""
    grad_b, param_b = params * BYTES_GRAD, params * BYTES_PARAM
    if stage == 1:
        return {"grad_reduce_scatter": grad_b, "param_all_gather": param_b}
    if stage == 2:
        return {"grad_reduce_scatter": accum * grad_b, "param_all_gather": param_b}
    return {"grad_reduce_scatter": accum * grad_b, "param_all_gather": accum * 2 * param_b}


def model_facts(method: str, size: str) -> dict[str, Any]:
    """Trainable parameters (model built on the meta device: no memory) and training FLOPs per image."""
    model_cfg = ModelConfig(method=method, size=size)
    with torch.device("meta"):
        model = build_model(model_cfg)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "size": size, "params": params, "flops_per_img": flops_per_image(model_cfg)}


def min_micro_batch(target: float, stage: int, params: int, nodes: int, flops_img: float, mfu: float,
                    peak_tflops: float, net: Network, bucket_elems: float, limit: int = 1 << 16) -> int | None:
    """The smallest per-GPU micro-batch (no accumulation) whose efficiency reaches `target`."""
    lo, hi = 1, limit
    if step_time(stage, params, nodes, hi, 1, flops_img, mfu, peak_tflops, net, bucket_elems)["efficiency"] < target:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if step_time(stage, params, nodes, mid, 1, flops_img, mfu, peak_tflops, net, bucket_elems)["efficiency"] >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def build(args: argparse.Namespace) -> dict[str, Any]:
    models = [model_facts(m, s) for s in ("base", "large") for m in ("selectivemae", "mae")]
    rows = []
    for facts in models:
        for stage in STAGES:
            for nics in args.nics_per_node:
                for gbps in args.link_gbps:
                    net = Network.from_args(gbps, args.nvlink_gbs, nics, args.link_efficiency)
                    for nodes in args.nodes:
                        gpus = nodes * GPUS_PER_NODE
                        micro = args.global_batch // gpus
                        if micro < 1 or micro * gpus != args.global_batch:
                            raise SystemExit(f"--global-batch {args.global_batch} does not split over {gpus} GPUs")
                        t = step_time(stage, facts["params"], nodes, micro, 1, facts["flops_per_img"], args.mfu,
                                      args.peak_tflops, net, args.bucket)
                        rows.append({"method": facts["method"], "size": facts["size"], "zero": stage,
                                     "link_gbps": gbps, "nics_per_node": nics, "nodes": nodes, "gpus": gpus,
                                     "micro_batch": micro, **{k: round(v, 4) for k, v in t.items()},
                                     "micro_batch_for_target": min_micro_batch(
                                         args.target, stage, facts["params"], nodes, facts["flops_per_img"],
                                         args.mfu, args.peak_tflops, net, args.bucket)})
    return {
        "inputs": {"mfu": args.mfu, "peak_tflops": args.peak_tflops, "global_batch": args.global_batch,
                   "gpus_per_node": GPUS_PER_NODE, "nvlink_gbs": args.nvlink_gbs, "link_gbps": args.link_gbps,
                   "nics_per_node": args.nics_per_node, "link_efficiency": args.link_efficiency,
                   "reduce_bucket_elems": args.bucket, "bytes_grad": BYTES_GRAD, "bytes_param": BYTES_PARAM,
                   "target": args.target, "nodes": args.nodes},
        "models": [{**m, "bytes_per_step": {f"zero{s}": bytes_per_step(s, m["params"], 1) for s in STAGES}}
                   for m in models],
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    inp = result["inputs"]
    out = ["| model | params (M) | GFLOP/img | ZeRO-1/2: grads RS + params AG per step (MB) | "
           "ZeRO-3: AG x2 + RS per micro-step (MB) |", "|---|---|---|---|---|"]
    for m in result["models"]:
        b1, b3 = m["bytes_per_step"]["zero1"], m["bytes_per_step"]["zero3"]
        out.append(f"| {m['method']} ViT-{m['size'][0].upper()} | {m['params'] / 1e6:.1f} | "
                   f"{m['flops_per_img'] / 1e9:.1f} | {b1['grad_reduce_scatter'] / 1e6:.0f} + "
                   f"{b1['param_all_gather'] / 1e6:.0f} | {b3['param_all_gather'] / 1e6:.0f} + "
                   f"{b3['grad_reduce_scatter'] / 1e6:.0f} |")
    for nics in inp["nics_per_node"]:
        rows = [r for r in result["rows"] if r["nics_per_node"] == nics]
        out += ["", f"Efficiency at global batch {inp['global_batch']} ({nics} NIC{'s' if nics > 1 else ''} "
                f"per node; per-GPU micro-batch in brackets; MFU {inp['mfu']:.0%}):", ""]
        head = "| model | ZeRO | " + " | ".join(f"{n} nodes, {g:g} Gb/s" for g in inp["link_gbps"] for n in inp["nodes"]) + " |"
        out += [head, "|---|---|" + "---|" * (len(inp["link_gbps"]) * len(inp["nodes"]))]
        keys = sorted({(r["size"], r["method"], r["zero"]) for r in rows}, key=lambda k: (k[0], k[1] != "selectivemae", k[2]))

        def table(cell: Any) -> list[str]:
            """One line per (model, stage): ``cell(row)`` for each link rate x node count."""
            lines = []
            for size, method, stage in keys:
                cells = [cell(next(r for r in rows if (r["size"], r["method"], r["zero"], r["link_gbps"], r["nodes"])
                                   == (size, method, stage, g, n)))
                         for g in inp["link_gbps"] for n in inp["nodes"]]
                lines.append(f"| {method} ViT-{size[0].upper()} | {stage} | " + " | ".join(cells) + " |")
            return lines

        out += table(lambda r: f"{r['efficiency']:.0%} ({r['micro_batch']})")
        out += ["", f"Smallest per-GPU micro-batch for {inp['target']:.0%} ({nics} NIC{'s' if nics > 1 else ''} per node):",
                "", head, "|---|---|" + "---|" * (len(inp["link_gbps"]) * len(inp["nodes"]))]
        out += table(lambda r: "never" if r["micro_batch_for_target"] is None else str(r["micro_batch_for_target"]))
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=0.40,
                   help="model FLOPs utilization of the compute (default 0.40: the model-only target; no GPU "
                        "measurement exists yet)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100/H200 SXM: 989)")
    p.add_argument("--global-batch", type=int, default=4096,
                   help="images per optimizer step over all GPUs (default 4096, the MAE recipe's ViT-L batch)")
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16], help="node counts (8 GPUs each)")
    p.add_argument("--link-gbps", type=float, nargs="+", default=[200.0, 400.0], help="inter-node NIC line rates, Gb/s")
    p.add_argument("--nics-per-node", type=int, nargs="+", default=[8, 1],
                   help="NICs per node (8: one per GPU, the HGX layout; 1: a single NIC per node)")
    p.add_argument("--nvlink-gbs", type=float, default=450.0,
                   help="one GPU's NVLink bandwidth per direction, GB/s (H100/H200 SXM: 450)")
    p.add_argument("--link-efficiency", type=float, default=0.8,
                   help="fraction of line rate the collectives reach (NCCL bus bandwidth / line rate)")
    p.add_argument("--bucket", type=float, default=5e8,
                   help="ZeRO-2 reduce_bucket_size in elements (ds_configs/zero2.json: 5e8)")
    p.add_argument("--target", type=float, default=0.90, help="efficiency target for the smallest-micro-batch table")
    p.add_argument("--markdown", action="store_true", help="print the markdown tables instead of the JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = build(args)
    print(markdown(result) if args.markdown else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
