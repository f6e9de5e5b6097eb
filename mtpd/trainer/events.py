"""Structured progress of a training run, and its one-line text form.

A run reports dicts with an ``"event"`` key to ``on_event`` callbacks: a program
(the demo, a notebook, a job scheduler) reads fields, never log text.

- ``stage_start``: stage, name, epochs, iters_per_epoch
- ``inherited``: stage, tensors, parts, weights
- ``resumed``: stage, checkpoint, wanted, epoch, iter (checkpoint None: nothing at ``wanted`` to resume from)
- ``step``: a step record (stage, epoch, iter, step, lr, loss, loss parts, time) and ``epoch_end``
- ``mirrored``: stage, store, flip_error (a store without the hflip view: flipped samples mirror its maps)
- ``resampled``: stage, store, resample_error (fresh augmented views warped from the store's plain views)
- ``stage_end``: stage, name, checkpoint, metrics
"""

from __future__ import annotations

from typing import Callable

Event = dict
OnEvent = Callable[[Event], None]


def format_event(ev: Event, epochs: int | None = None, iters: int | None = None) -> str | None:
    """The console line of an event (None for events that print nothing)."""
    k = ev.get("stage")
    kind = ev["event"]
    if kind == "inherited":
        return f"stage {k}: inherited {ev['tensors']} tensors ({', '.join(ev['parts'])}) from {ev['weights']}"
    if kind == "resumed":
        if ev["checkpoint"] is None:
            return f"stage {k}: --resume but no {ev['wanted']}; starting the stage from the beginning"
        return f"stage {k}: resumed from {ev['checkpoint']} at epoch {ev['epoch'] + 1}, iteration {ev['iter']}"
    if kind == "step":
        skip = ("stage", "epoch", "iter", "step", "lr", "loss", "time", "event", "epoch_end", "epochs", "iters")
        parts = " ".join(f"{n}={v:.3f}" for n, v in ev.items() if n not in skip)
        where = f"stage {k} epoch {ev['epoch']}/{ev['epochs']} iter {ev['iter']}/{ev['iters']}"
        return f"{where} loss {ev['loss']:.4f} {parts}"
    if kind == "mirrored":
        err = ev["flip_error"]
        if not err:
            measured = "its error was not measured (built before mtpd recorded it)"
        else:
            measured = "relative error against the teacher's flipped view: " + "; ".join(
                f"{name} {lvl} border {e['border']:.3f} inside {e['inside']:.3f}"
                for name, levels in err.items()
                for lvl, e in levels.items()
            )
        return f"stage {k}: {ev['store']} has no hflip view, so flipped samples mirror its maps; {measured}"
    if kind == "resampled":
        from mtpd.cache.resample_record import format_resample_error

        err = ev["resample_error"]
        measured = (
            f"relative RMSE against the teacher on augmented views: {format_resample_error(err)}"
            if err
            else f"its error was not measured: `mtpd-cache resample-error {ev['store']} --ann .. --images .. "
            "--augment ..` records it"
        )
        return f"stage {k}: fresh augmented views take {ev['store']}'s features warped from its plain views; {measured}"
    if kind == "levels_skipped":
        return (
            f"stage {k}: {ev['loss']} distills {', '.join(ev['levels'])}; skips {', '.join(ev['skipped'])}, which "
            f"{ev['store']} lacks"
        )
    if kind == "auto_weight":
        line = (
            f"stage {k}: weight: auto for {ev['loss']} set to {ev['weight']:.4g} (its first loss at {ev['ratio']:g}x "
            "the detection loss); saved in plan.resolved.yaml"
        )
        far = ev.get("times_default")
        if far is not None:  # see Stage.auto_weight_set
            line += (
                f"\nwarning: that is {far:.3g}x {ev['loss']}'s default weight {ev['default']:g}: its first loss is "
                "far from its usual size (RM's is near zero while a fresh student scores every anchor alike, and "
                "grows); if training degrades, give a number (docs/losses.md)"
            )
        return line
    if kind == "stage_end":
        shown = ", ".join(f"{n}={v:.4f}" for n, v in ev["metrics"].items() if isinstance(v, float))
        return f"stage {k} ({ev['name']}) done: {shown}"
    return None


def is_progress(ev: Event) -> bool:
    """Events worth a line on a quiet console: epoch ends, stage ends, inheritance."""
    return ev["event"] in ("stage_end", "inherited") or (ev["event"] == "step" and ev.get("epoch_end", False))
