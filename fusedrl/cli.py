"""The command line: `fusedrl train CONFIG.yaml [key=value ...]`.

Dotted overrides change any config field, e.g. `fusedrl train configs/demo.yaml run.steps=50
optim.lr=2e-5 model.path=/models/qwen2.5-0.5b`. Problems with the config, data, model paths or
checkpoints are printed as one line (exit status 2), not as a traceback; so is a run that had to stop
(it diverged: exit status 1). `fusedrl config` prints every key with its default and meaning.

`torchrun --nproc_per_node N -m fusedrl.cli train CONFIG.yaml` trains on N ranks with FSDP2
(docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedrl", description=__doc__.splitlines()[0],
        epilog="Configuration reference: `fusedrl config` prints every key, its default and what it does "
               "(docs/engine.md explains them); configs/ holds the demo configs.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a policy with RL as configured",
                                epilog="Every key: `fusedrl config`.")
    train.add_argument("config", help="YAML config file (see configs/demo.yaml)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    commands.add_parser("config", help="print every config key with its default and meaning, as YAML")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config":
        from fusedrl.engine.config_reference import reference_yaml

        print(reference_yaml())
        return 0
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
