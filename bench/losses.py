"""Step cost of each distillation loss: CPU time of a training step with the loss against one without.

    .venv/bin/python bench/losses.py            # the demo's student and strong teacher, 128x128 digits (minutes)
    .venv/bin/python bench/losses.py --quick    # smoke test (seconds)

Every loss trains the same student on the same batches, through the product's own path: a stage
(``mtpd.trainer.stage.Stage``) built from a plan whose targets come from one store of the teacher's
fpn, cls and box outputs, and ``Engine.run_step`` timed (CPU-seconds of this process
per step, the loader in-process, around ``run_step``). One step per loss per round, rounds interleaved with a rotating
order; the table gives the median step and its ratio to the undistilled step of the same rounds.
MGD's generator works at the teacher's channel count, so a last row trains MGD against a 256-channel
(random) teacher to show how its cost grows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/losses.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import report, table

TITLE = "Loss step cost (bench/losses.py)"
LOSSES = ("mgd", "mse", "pkd", "cwd", "kd", "rm", "pfi")


def make_data(work: Path, n: int, size: int) -> dict:
    from mtpd.data.digits import make_digits

    return make_digits(work / "digits", train=n, val=2, size=size, seed=0)


def make_store(work: Path, data: dict, size: int, teacher: str, weights: str, classes: int) -> str:
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    out = work / f"store_{teacher}"
    build_store(
        TeacherSpec(teacher, weights, None if weights != "none" else classes),
        data["train"]["ann"],
        data["train"]["images"],
        str(out),
        views=ViewSpec(short=size, long=size),
        outputs=["fpn", "cls", "box"],
        workers=0,
        progress=False,
    )
    return str(out)


def stage_for(loss: str | None, store: str, data: dict, a, work: Path):
    """A built stage (its engine and a step timer) training the demo's student with ``loss`` alone."""
    from mtpd.demo.recipes import STUDENT
    from mtpd.trainer import hooks
    from mtpd.trainer.plan import Plan, from_dict
    from mtpd.trainer.stage import Stage

    losses = [] if loss is None else [{"name": loss, "weight": 1.0}]
    plan = from_dict(
        Plan,
        {
            "output_dir": str(work / f"run_{loss}"),
            "student": {"arch": STUDENT["arch"], "options": dict(STUDENT["options"])},
            "data": {
                "train_ann": data["train"]["ann"],
                "train_images": data["train"]["images"],
                "short": a.size,
                "long": a.size,
                "flip": False,
                "batch_size": a.batch,
                "workers": 0,
            },
            "stages": [{"name": "s", "stores": [store], "losses": losses, "epochs": 1, "eval": False}],
        },
    )
    engine, _, _ = Stage(plan, 1, log=None).build()
    for h in engine.hooks:
        if isinstance(h, hooks.EpochData):
            h.before_epoch(engine)  # the sampler's first epoch, as ``Engine.train_epoch`` starts it
    engine.student.train()
    engine.batches = iter(engine.loader)
    return engine


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="view side (the demo's digits: 128)")
    p.add_argument("--batch", type=int, default=16, help="images per step (the demo's: 16)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--no-wide", action="store_true", help="leave out MGD with a 256-channel teacher")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--quick", action="store_true", help="small batch, two rounds: a smoke test")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.batch, a.rounds, a.no_wide = 64, 2, 2, True
    import torch

    from mtpd.demo.steps import shipped_teachers

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mtpd-bench-losses-") as tmp:
        work = Path(a.work_dir or tmp)
        data = make_data(work, a.batch * (a.rounds + 2), a.size)
        store = make_store(work, data, a.size, "retinanet_tiny_wide", str(shipped_teachers() / "strong.pt"), 10)
        runs = {"none": stage_for(None, store, data, a, work)}
        runs.update({name: stage_for(name, store, data, a, work) for name in LOSSES})
        if not a.no_wide:
            wide = make_wide_store(work, data, a)
            runs["mgd, 256-channel teacher (P3-P5)"] = stage_for("mgd", wide, data, a, work)
        names = list(runs)
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.rounds + 1):  # round 0 warms up
            for n in names[r % len(names) :] + names[: r % len(names)]:
                c0 = time.process_time()
                runs[n].run_step()  # the product's step: data, targets, forward, losses, backward, update
                if r:
                    cpu[n].append(time.process_time() - c0)
    body = render(a, cpu)
    return report(TITLE, "quick" if a.quick else f"{a.size}x{a.size}, batch {a.batch}", "losses.py", argv, body,
                  write=not a.no_write)  # fmt: skip


def make_wide_store(work: Path, data: dict, a) -> str:
    """A store of a random ``retinanet_mobilenet_v2_fpn`` (256 FPN channels, P3-P7): its values don't matter
    here, only the width MGD's generator works at (the student distills the P3-P5 it shares)."""
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    out = work / "store_wide"
    spec = TeacherSpec("retinanet_mobilenet_v2_fpn", "none", 10)
    views = ViewSpec(short=a.size, long=a.size)
    build_store(spec, data["train"]["ann"], data["train"]["images"], str(out), views=views, outputs=["fpn"], workers=0,
                progress=False)  # fmt: skip
    return str(out)


def render(a, cpu: dict[str, list[float]]) -> str:
    base = statistics.median(cpu["none"])
    rows = []
    for n, xs in cpu.items():
        med = statistics.median(xs)
        rows.append([n, 1000 * med, f"{med / base:.2f}x"])
    return "\n".join(
        [
            f"The demo's student (`retinanet_tiny`, width 8, FPN 32) at {a.size}x{a.size}, batch {a.batch}, one "
            f"thread; targets from a store of the demo's strong teacher (FPN 64 channels). Weight 1 for every loss "
            f"(the cost does not depend on it). Median CPU ms per step over {a.rounds} interleaved round(s).",
            "",
            table(["loss", "CPU ms / step", "vs undistilled"], rows),
            "",
        ]
    )


if __name__ == "__main__":
    main()
