"""Entry point for the ``deepspeed`` launcher: ``deepspeed [--num_gpus N | --hostfile H] launcher/pretrain.py ...``.

Thin on purpose: all logic lives in :mod:`selectivemae_ds.trainer`. The ``__main__``
guard matters: DALI's spawned reader workers re-import this script.
"""
import sys

from selectivemae_ds.trainer import main

if __name__ == "__main__":
    sys.exit(main())
