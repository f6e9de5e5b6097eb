"""Command-line entry points: mtpd-data, mtpd-cache, mtpd-train, mtpd-eval, mtpd-plan, mtpd-demo."""
