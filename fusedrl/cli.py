"""The command line: `fusedrl train CONFIG.yaml [key=value ...]`.

Dotted overrides change any config field, e.g. `fusedrl train configs/demo.yaml run.steps=50
optim.lr=2e-5 model.path=/models/qwen2.5-0.5b`. Problems with the config, data, model paths or
checkpoints are printed as one line (exit status 2), not as a traceback; so is a run that had to stop
(it diverged: exit status 1).
"""

from __future__ import annotations

import argparse
import sys
import warnings


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
    from fusedrl.engine.errors import RunError, UsageError

    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        # The engine's warnings (a checkpoint that run.resume=latest skips) read as one line each, too.
        warnings.showwarning = lambda message, *args, **kwargs: print(f"fusedrl: warning: {message}", file=sys.stderr)
        try:
            cfg = load_config(args.config, args.overrides)
            from fusedrl.engine.train import train

            train(cfg)
        except UsageError as e:
            print(f"fusedrl: error: {e}", file=sys.stderr)
            return 2
        except RunError as e:
            print(f"fusedrl: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
