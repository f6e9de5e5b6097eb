"""Command-line entry points: mtpd-data, mtpd-cache, mtpd-train, mtpd-eval, mtpd-plan, mtpd-demo."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none to show (required options, None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)
