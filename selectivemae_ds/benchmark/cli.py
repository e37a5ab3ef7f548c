"""`smae-bench MODE ...`: one JSON line per run. Each mode lives in its own module.

Exit codes are the project's (``selectivemae_ds.errors``): 2 for a wrong mode, flag or
value, 3 for an unusable dataset; each mode's ``main`` goes through ``run_cli``.
"""
from __future__ import annotations

import importlib
import sys

from selectivemae_ds.errors import ConfigError, run_cli

MODES = {
    "model": ("selectivemae_ds.benchmark.model", "fwd+bwd+AdamW steps of a model on synthetic images"),
    "loader": ("selectivemae_ds.benchmark.loader", "the DALI input pipeline vs the reference PIL/torchvision loader"),
    "e2e": ("selectivemae_ds.benchmark.e2e", "training steps end to end: shards -> DALI -> DeepSpeed engine (trainer)"),
}


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MODES:
        module = importlib.import_module(MODES[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    print("usage: smae-bench MODE [options]   (smae-bench MODE --help for options)\n\nmodes:")
    for name, (_mod, text) in MODES.items():
        print(f"  {name:8s} {text}")
    if argv and argv[0] not in ("-h", "--help"):
        raise ConfigError(f"smae-bench: unknown mode {argv[0]!r} (choose from {', '.join(MODES)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; exit codes from :mod:`selectivemae_ds.errors`."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
