"""The command line: `fusedrl train CONFIG.yaml [key=value ...]`.

Dotted overrides change any config field, e.g. `fusedrl train configs/demo.yaml run.steps=50
optim.lr=2e-5 model.path=/models/qwen2.5-0.5b`. Problems with the config, data or model paths are
printed as one line (exit status 2), not as a traceback.

`torchrun --nproc_per_node N -m fusedrl.cli train CONFIG.yaml` trains on N ranks with FSDP2
(docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a policy with RL as configured")
    train.add_argument("config", help="YAML config file (see configs/demo.yaml)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fusedrl.engine.config import load_config
    from fusedrl.engine.errors import UsageError

    try:
        cfg = load_config(args.config, args.overrides)
        from fusedrl.engine.train import train

        train(cfg)
    except UsageError as e:
        print(f"fusedrl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
