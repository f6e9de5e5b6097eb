"""How the bytes-vs-AP benchmark's student, teachers and losses were chosen: runs on a dev split only.

    .venv/bin/python bench/choose_benchmark.py           # trains what is missing, prints the table
    .venv/bin/python bench/choose_benchmark.py --write   # and records it in bench/RESULTS.md

One seed (0), 2 x 8 epochs per student (the schedule the sweep's budget allows), every run on the
train split minus 400 images and evaluated on those 400 (never on val). Candidates: students
``retinanet_tiny`` at widths 8/32, 12/48 and 16/64; teacher pairs: the ImageNet-initialised
MobileNetV2 teachers (``mbv2.pt`` 20 epochs, ``mbv2_60ep.pt`` 60 epochs) and the from-scratch ones
(``weak.pt``, ``strong.pt``); losses MGD and KD with `weight: auto` (the README's rule: the weighted
loss starts at ``ratio`` times the detection loss), and RM + PFI by the same rule. The weights that
rule resolved are read back from each run's plan.resolved.yaml. The choice went to the setting where
distillation pays most over its baseline (mtpd/demo/recipes.py says which and why).

This dev split was carved by SHA-1 of ``dev0:<file name>`` (the first 400 images in that order);
bench/bytes_vs_ap.py --split dev carves its own (SHA-256), used for the noise floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from bench.common import command_line, machine, write_section

TITLE = "Benchmark choice on the dev split (bench/choose_benchmark.py)"
EPOCHS = 8
TEACHERS = {  # key -> (arch, checkpoint in mtpd/demo/teachers)
    "mbv2": ("retinanet_mobilenet_v2_fpn", "mbv2.pt"),
    "mbv2_60ep": ("retinanet_mobilenet_v2_fpn", "mbv2_60ep.pt"),
    "tiny": ("retinanet_tiny", "weak.pt"),
    "tinywide": ("retinanet_tiny_wide", "strong.pt"),
}
LOSSES = {
    "mgd": {"name": "mgd", "weight": "auto", "params": {"lambda_mask": 0.65}},
    "mgd4": {"name": "mgd", "weight": "auto", "ratio": 4.0, "params": {"lambda_mask": 0.65}},
    "kd": {"name": "kd", "weight": "auto"},
    "kd4": {"name": "kd", "weight": "auto", "ratio": 4.0},
    "rm": {"name": "rm", "weight": "auto"},
    "pfi": {"name": "pfi", "weight": "auto"},
}
# name: (student width, FPN channels, teachers per stage (none: baseline), losses)
RUNS = {
    "w8f32_base_e8": (8, 32, (), ()),
    "w8f32_mtpd_e8": (8, 32, ("mbv2", "mbv2_60ep"), ("mgd",)),
    "w12f48_base": (12, 48, (), ()),
    "w12f48_mtpd_scrweak_scr_mgd": (12, 48, ("tiny", "tinywide"), ("mgd",)),
    "w16f64_base_e8": (16, 64, (), ()),
    "w16f64_mtpd_e8": (16, 64, ("mbv2", "mbv2_60ep"), ("mgd",)),
    "w16_mtpd_mgd4": (16, 64, ("mbv2", "mbv2_60ep"), ("mgd4",)),
    "w16_mtpd_kd": (16, 64, ("mbv2", "mbv2_60ep"), ("kd",)),
    "w16_mtpd_kd4": (16, 64, ("mbv2", "mbv2_60ep"), ("kd4",)),
    "w16_mtpd_mgd4kd": (16, 64, ("mbv2", "mbv2_60ep"), ("mgd4", "kd")),
    "w16_direct_mbv60_mgd": (16, 64, ("mbv2_60ep", "mbv2_60ep"), ("mgd",)),
    "w16_mtpd_scr_mbv60_mgd": (16, 64, ("tinywide", "mbv2_60ep"), ("mgd",)),
    "w16_mtpd_scr_mbv60_mgdkd": (16, 64, ("tinywide", "mbv2_60ep"), ("mgd", "kd")),
    "w16_direct_scr_mgd": (16, 64, ("tinywide", "tinywide"), ("mgd",)),
    "w16_mtpd_scrweak_scr_mgd": (16, 64, ("tiny", "tinywide"), ("mgd",)),
    "w16_mtpd_scrweak_scr_kd": (16, 64, ("tiny", "tinywide"), ("kd",)),
    "w16_probe_rmpfi": (16, 64, ("tiny", "tinywide"), ("rm", "pfi")),
}


# The stage and store names the runs were made with (kept, so a rerun finds them finished): the first
# two distilled runs read FPN-only stores, the later ones stores with class scores too.
FPN_ONLY = {"w8f32_mtpd_e8", "w16f64_mtpd_e8"}
STAGE_ALIAS = {"mbv2": "weak", "mbv2_60ep": "strong", "tinywide": "scratch", "tiny": "scratchweak"}


def _stage_name(run: str, teacher: str, i: int) -> str:
    return ("weak", "strong")[i] if run in FPN_ONLY else f"{STAGE_ALIAS[teacher]}{i}"


def _store(paths, key: str, outputs: tuple[str, ...], train_ann: Path) -> Path:
    from mtpd.cache.build import build_store
    from mtpd.data import ViewSpec
    from mtpd.demo import steps
    from mtpd.teachers.registry import TeacherSpec

    arch, file = TEACHERS[key]
    out = paths.stores / (f"{key}_lossless" if outputs == ("fpn",) else f"{key}_lossless_{'_'.join(outputs)}")
    if not steps.store_complete(out):
        build_store(
            TeacherSpec(arch, str(steps.shipped_teachers() / file)),
            str(train_ann),
            str(paths.images("train")),
            str(out),
            views=ViewSpec(short=128, long=128, views=("orig", "hflip")),
            outputs=list(outputs),
            precision="lossless",
            batch_size=16,
            workers=1,
            images_per_shard=64,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/bva_dev", help="working folder; default: %(default)s")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    a = p.parse_args(argv)
    from bench.bytes_vs_ap import dev_split, run_all
    from mtpd.demo import recipes, steps

    paths = steps.Paths(Path(a.out))
    log = lambda s: print(s, flush=True)  # noqa: E731
    steps.ensure_data(paths, recipes.FULL, log)
    train_ann, dev_ann = dev_split(paths, 400, digest="sha1")  # the carve these runs were made on
    n_train = len(json.loads(train_ann.read_text())["images"])
    ipe = -(-n_train // 16)
    tasks = []
    for name, (width, fpn, teachers, losses) in RUNS.items():
        outputs = ("fpn",) if name in FPN_ONLY else ("fpn", "cls")
        stages = [
            recipes.stage(
                _stage_name(name, t, i),
                EPOCHS,
                ipe,
                [str(_store(paths, t, outputs, train_ann))],
                [LOSSES[x] for x in losses],
            )
            for i, t in enumerate(teachers)
        ] or [recipes.stage(f"p{i}", EPOCHS, ipe) for i in (1, 2)]
        student = {"arch": "retinanet_tiny", "options": {"width": width, "fpn_channels": fpn}}
        plan = recipes.plan(student, paths.data, paths.runs / name, stages, ipe)
        plan["data"].update(train_ann=str(train_ann), val_ann=str(dev_ann), val_images=str(paths.images("train")))
        path = steps.write_plan(plan, paths.plans / f"{name}.yaml")
        if steps.stages_todo(path, lambda s: None)[1]:
            tasks.append((name, 0, path, None))
    log(f"{len(tasks)} runs to train")
    run_all(tasks, 2, log, lambda *args: None)

    base = {}
    lines = [
        "| run | student (width/FPN) | stage teachers | losses (weight: auto →) | AP after stage 1 | AP "
        "| vs baseline |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for name, (width, fpn, teachers, losses) in RUNS.items():
        out = paths.runs / name
        aps = [json.loads((out / f"stage_{k}" / "metrics.json").read_text())["AP"] * 100 for k in (1, 2)]
        if not teachers:
            base[(width, fpn)] = aps[1]
        weights = []
        for k in (1, 2):
            resolved = yaml.safe_load((out / f"stage_{k}" / "plan.yaml").read_text())
            weights.append(", ".join(f"{x['name']} {x['weight']:.3g}" for x in resolved["stages"][k - 1]["losses"]))
        gain = aps[1] - base[(width, fpn)] if teachers else 0.0
        lines.append(
            f"| {name} | {width}/{fpn} | {' → '.join(teachers) or '-'} | "
            f"{' / '.join(weights) if teachers else '-'} | {aps[0]:.2f} | {aps[1]:.2f} | "
            f"{f'{gain:+.2f}' if teachers else '-'} |"
        )
    print("\n".join(lines))
    if a.write:
        body = "\n".join(
            [
                f"Command: `{command_line('choose_benchmark.py', argv)}`  ",
                f"Date: {time.strftime('%Y-%m-%d')}; machine: {machine()}; seed 0, 2 x {EPOCHS} epochs per student, "
                f"trained on {n_train} train images, AP (×100) on the 400 dev images carved from the train split.",
                "",
                *lines,
            ]
        )
        write_section(TITLE, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
