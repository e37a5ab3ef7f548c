"""`smae-bench MODE ...`: one JSON line per run. Each mode lives in its own module."""
from __future__ import annotations

import importlib
import sys

MODES = {
    "model": ("selectivemae_ds.benchmark.model", "fwd+bwd+AdamW steps of a model on synthetic images"),
    "loader": ("selectivemae_ds.benchmark.loader", "the DALI input pipeline vs the reference PIL/torchvision loader"),
    "e2e": ("selectivemae_ds.benchmark.e2e", "training steps end to end: shards -> DALI -> DeepSpeed engine (trainer)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in MODES:
        print("usage: smae-bench MODE [options]   (smae-bench MODE --help for options)\n\nmodes:")
        for name, (_mod, text) in MODES.items():
            print(f"  {name:8s} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsmae-bench: unknown mode {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(MODES[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
