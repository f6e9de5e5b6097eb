"""Command-line entry points: mtpd-data, mtpd-cache, mtpd-train, mtpd-eval, mtpd-export, mtpd-plan, mtpd-study,
mtpd-demo."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (required options, None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle checkpoints the safe reader refuses (only for files from a source you trust: "
        "unpickling can run code)",
    )


def apply_trust_flag(a: argparse.Namespace) -> None:
    if getattr(a, "trust_checkpoint", False):
        from mtpd.checkpoint import trust_checkpoints

        trust_checkpoints(True)
