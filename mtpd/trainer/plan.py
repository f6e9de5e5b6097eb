"""Plan files: one YAML file describes a student and its ordered distillation stages.

Loaded into dataclasses; unknown keys and wrong types are errors naming the
key path (``stages[1].losses[0].wieght: unknown key``). The resolved plan is
saved beside the outputs so every run records exactly what it did.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtpd.defaults import DEFAULT_PRECISION
from mtpd.trainer.fields import PlanError, from_dict

AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class StudentConfig:
    # A registered arch, or package.module:factory returning a torchvision detector of an adapter's family
    # (called as factory(num_classes=N, **options); the current directory is importable)
    arch: str
    init: str = "none"  # ImageNet backbone checkpoint path, or none (registered archs only)
    num_classes: int | None = None  # default: the dataset's
    options: dict = field(default_factory=dict)  # architecture options (fpn_channels, levels, width ...)


@dataclass
class AugmentConfig:
    """Augmented views of every stage: ``mtpd.data.augment.AugmentPolicy``'s fields (``bank`` K: K views per image
    a teacher's store holds, exact targets; 0: a fresh view every epoch, teachers live). ``resample``: with bank 0,
    stages with stores serve each fresh view from the plain views' stores (orig, hflip) by warping their feature
    maps (``mtpd.data.resample``: an approximation, features only)."""

    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [low, high] factor on the view size
    crop: bool = True  # a view larger than the unjittered one: cropped back at a random offset (else top left)
    flip: float = 0.5  # probability of a horizontal flip
    bank: int = 0  # views per image a store holds (aug0 ..); 0: a fresh view every epoch
    seed: int = 0  # the bank's draws (part of a bank store's identity)
    resample: bool = False  # bank 0: features warped from the plain views' stores (an approximation)

    def policy(self):
        from mtpd.data.augment import AugmentPolicy

        return AugmentPolicy(tuple(self.scale), self.crop, self.flip, self.bank, self.seed)  # type: ignore[arg-type]


@dataclass
class DataConfig:
    train_ann: str  # COCO annotation file of the labelled train set
    train_images: str  # its image folder
    val_ann: str | None = None  # COCO file evaluated after each stage (none: no evaluation)
    val_images: str | None = None  # its image folder
    short: int = 800  # view size: the short side resized to this (mmdet's 1x: 800) ...
    long: int = 1333  # ... the long side at most this (1333); a graph's fixed input is the default
    flip: bool = True  # random horizontal flip with p=0.5, as MTPD's 1x schedule
    batch_size: int = 16  # images per step in each process (torchrun: the total is this times the processes)
    workers: int = 2  # DataLoader worker processes (0: in the training process)
    val_batch_size: int = 8  # images per evaluation batch
    # An unlabelled pool (``mtpd-data pool``: a COCO file with no annotations) that stages with ``pool > 0`` draw
    # part or all of each batch from; its teachers' stores are built over it like any set's.
    pool_ann: str | None = None
    pool_images: str | None = None  # the pool's image folder
    augment: AugmentConfig | None = None  # augmented views (flips included: data.flip then does not apply)


@dataclass
class LossConfig:
    name: str  # a registered loss (the Losses table of docs/reference/registries.md)
    # default: the loss's own (mgd 2e-5, rm 4, pfi 1.5, ...); "auto": set at the stage's first step so that the
    # weighted loss starts at ``ratio`` times the detection loss (the value goes into plan.resolved.yaml)
    weight: float | str | None = None
    ratio: float = 1.0  # for weight: auto
    # for weight: auto: steps the stage runs before the rule measures (the loss is off until then). RM's first
    # loss is near zero on a fresh student, so measuring at step 1 overshoots; after a warm-up it does not.
    auto_after: int = 0
    store: int = 0  # which of the stage's stores feeds this loss
    params: dict = field(default_factory=dict)  # the loss's hyper-parameters (lambda_mask, tau, levels ...)


@dataclass
class OptimizerConfig:
    type: str = "sgd"  # sgd or adamw
    lr: float = 0.01  # for `base_batch` images per step; scaled linearly by data.batch_size
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # L2 (sgd) or decoupled (adamw)
    base_batch: int = 16  # the total batch ``lr`` is given for (mmdet's 1x: 16 = 8 GPUs x 2 images)


@dataclass
class ScheduleConfig:
    warmup_iters: int = 500  # linear warm-up steps at the stage's start
    warmup_ratio: float = 0.001  # the warm-up's first learning rate, as a fraction of lr
    steps: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])  # fractions of the stage's epochs
    gamma: float = 0.1  # the learning rate's factor at each step


@dataclass
class InheritConfig:
    """MTPD's weight inheritance: copy the teacher's neck and head into the student at stage start."""

    weights: str  # the teacher's checkpoint
    parts: list[str] = field(default_factory=lambda: ["neck", "head"])  # which parts to copy (names must match)


@dataclass
class TeacherRef:
    """A teacher named instead of a store path: the trainer finds its complete store under the cache root
    (same teacher, weights, the plan's dataset and views, these outputs and precision)."""

    name: str  # a teacher as mtpd-cache build --teacher takes it (registered, factory, mmdet:, onnx:)
    weights: str = "none"  # checkpoint path, default or none
    outputs: list[str] = field(default_factory=lambda: ["fpn"])  # the outputs its store holds (fpn, cls, box ...)
    precision: str = DEFAULT_PRECISION  # the store's preset (lossless, high, compact, small, tiny, micro)
    # The store's views, when not the plan's (orig + hflip with data.flip): [orig] trains flipped samples from
    # mirrored maps, the approximation flip_error measures (a store with more views does not stand in).
    views: list[str] | None = None


@dataclass
class StageConfig:
    name: str  # the stage's folder under output_dir (stage_<k>) reports it by this
    stores: list[str] = field(default_factory=list)  # store paths, one per teacher the losses read
    teacher: TeacherRef | None = None  # instead of stores: the store of this teacher under the cache root
    losses: list[LossConfig] = field(default_factory=list)  # distillation losses (none: the student alone)
    epochs: int = 12  # passes over the train set
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # sgd or adamw, and its settings
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # warm-up, then steps
    grad_clip: float | None = 35.0  # max gradient norm (none: no clipping)
    inherit: InheritConfig | None = None  # copy a teacher's neck and head in at the stage's start
    eval: bool = True  # evaluate on data.val_ann after the stage
    amp: str | None = None  # off | bf16 | fp16 for this stage; default: the plan's
    # Share of each batch drawn from data.pool (0: the labelled set only; 1: the pool only, no detection loss).
    # In between, the detection loss sees the labelled images of each batch and distillation sees all; an epoch
    # is one pass over the labelled set (the pool only: over the pool), the pool's order running on across epochs.
    pool: float = 0.0
    pool_stores: list[str] = field(default_factory=list)  # with stores: the same teachers' stores of the pool


@dataclass
class Plan:
    student: StudentConfig  # the student's architecture
    data: DataConfig  # the images, views and batches
    stages: list[StageConfig]  # trained in order, each from the previous one's student
    output_dir: str = "runs/plan"  # where stage_<k>/ folders (checkpoints, logs, metrics) go
    seed: int = 0  # seeds the student's init, the data order, flips and augmentation
    log_every: int = 20  # steps between loss records (log.jsonl, the console, TensorBoard)
    checkpoint_every: int = 0  # iterations between mid-epoch checkpoints (0: end of each epoch only)
    cache_root: str | None = None  # where stages' teachers are found (default: $MTPD_CACHE_ROOT, ~/.cache/mtpd)
    # Mixed precision of the student's forward: off, bf16 (CPU and recent GPUs) or fp16 (GPUs, with a loss
    # scale kept in last.pt); losses are computed in fp32 either way (mtpd.trainer.engine.AMP_DTYPES).
    amp: str = "off"
    # The student's weights and input images in channels-last memory (NHWC): faster convolutions on recent GPUs
    # with AMP; the same arithmetic otherwise (checkpoints hold the same values).
    channels_last: bool = False

    def validate(self) -> None:
        if not self.stages:
            raise PlanError("stages: a plan needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise PlanError(f"stages: names must be unique, got {names}")
        for i, s in enumerate(self.stages):
            where = f"stages[{i}] ({s.name})"
            if s.epochs < 1:
                raise PlanError(f"{where}.epochs: must be at least 1")
            if s.optimizer.type not in ("sgd", "adamw"):
                raise PlanError(f"{where}.optimizer.type: {s.optimizer.type!r} is not sgd or adamw")
            if s.teacher is not None and s.stores:
                raise PlanError(f"{where}: give stores or teacher, not both")
            if s.teacher is not None:
                _check_teacher_ref(s.teacher, f"{where}.teacher")
            n = 1 if s.teacher is not None else len(s.stores) if s.pool < 1 else len(s.pool_stores)
            _check_pool(self.data, s, n, where)
            for j, loss in enumerate(s.losses):
                _check_loss(loss, f"{where}.losses[{j}]")
                if isinstance(loss.weight, str) and loss.weight != "auto":
                    raise PlanError(
                        f"{where}.losses[{j}].weight: {loss.weight!r} is neither a number nor auto (YAML reads 2e-5 "
                        "as text: write 2.0e-5)"
                    )
                if loss.auto_after < 0:
                    raise PlanError(f"{where}.losses[{j}].auto_after: must be 0 or more steps, got {loss.auto_after}")
                if not loss.ratio > 0:
                    raise PlanError(f"{where}.losses[{j}].ratio: must be positive, got {loss.ratio}")
                if not (0 <= loss.store < n):
                    raise PlanError(f"{where}.losses[{j}].store: index {loss.store} but the stage has {n} store(s)")
        for where, amp in [("amp", self.amp)] + [
            (f"stages[{i}] ({s.name}).amp", s.amp) for i, s in enumerate(self.stages)
        ]:
            if amp is not None and amp not in AMP_MODES:
                raise PlanError(f"{where}: {amp!r} is not one of {', '.join(AMP_MODES)}")
        if self.data.batch_size < 1:
            raise PlanError("data.batch_size: must be at least 1")
        if self.data.augment is not None:
            if len(self.data.augment.scale) != 2:
                raise PlanError(f"data.augment.scale: [low, high], got {self.data.augment.scale}")
            if self.data.augment.resample and self.data.augment.bank:
                raise PlanError(
                    "data.augment.resample serves fresh views (bank: 0) from the plain views' stores; with a bank "
                    f"of {self.data.augment.bank} the stores hold exact views: drop resample or set bank: 0"
                )
            try:
                self.data.augment.policy()
            except ValueError as e:
                raise PlanError(f"data.{e}") from None
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise PlanError("log_every: must be at least 1; checkpoint_every: 0 (epoch ends only) or more")


def _check_pool(data: DataConfig, s: StageConfig, n: int, where: str) -> None:
    """A stage's pool share against the plan's pool and the stage's stores (the losses: ``check_plan``)."""
    if not 0.0 <= s.pool <= 1.0:
        raise PlanError(f"{where}.pool: the share of each batch from the pool, 0 to 1; got {s.pool}")
    if (data.pool_ann is None) != (data.pool_images is None):
        raise PlanError("data.pool_ann and data.pool_images: give both (the pool's COCO file and its image folder)")
    if s.pool > 0 and data.pool_ann is None:
        raise PlanError(
            f"{where}.pool: {s.pool} of each batch from a pool, but data.pool_ann is not set; list the images with "
            "`mtpd-data pool --images FOLDER --out pool.json` and set data.pool_ann and data.pool_images"
        )
    if 0 < s.pool < 1 and round(s.pool * data.batch_size) in (0, data.batch_size):
        raise PlanError(
            f"{where}.pool: {s.pool} of a batch of {data.batch_size} rounds to {round(s.pool * data.batch_size)} "
            "images; choose a share that leaves both parts at least one image, or 0 or 1"
        )
    if s.pool_stores and s.teacher is not None:
        raise PlanError(f"{where}.pool_stores: goes with stores (a named teacher's pool store is found by itself)")
    if s.pool == 1 and s.stores:
        raise PlanError(f"{where}.stores: a stage on the pool alone (pool: 1) reads pool_stores only; move them there")
    if 0 < s.pool < 1 and len(s.pool_stores) != len(s.stores):
        raise PlanError(
            f"{where}.pool_stores: {len(s.pool_stores)} for {len(s.stores)} store(s); list each teacher's store of "
            "the pool, in the order of stores"
        )
    if s.pool_stores and s.pool == 0:
        raise PlanError(f"{where}.pool_stores: the stage draws nothing from the pool (pool: 0); set pool or drop them")


def _check_loss(loss: LossConfig, where: str) -> None:
    """The loss's name and parameters, without a student or a store (stores are checked at ``check_plan``)."""
    from mtpd.trainer.losses import LOSSES, check_params

    if loss.name not in LOSSES:
        raise PlanError(
            f"{where}.name: unknown distillation loss {loss.name!r}; registered: {', '.join(sorted(LOSSES))}"
        )
    try:
        check_params(loss.name, loss.params)
    except ValueError as e:
        raise PlanError(f"{where}.params: {e}") from None


def _check_teacher_ref(ref: TeacherRef, where: str) -> None:
    from mtpd.cache.schema import StoreError, get_precision

    try:
        get_precision(ref.precision)
    except StoreError as e:
        raise PlanError(f"{where}.precision: {e}") from None
    if not ref.outputs:
        raise PlanError(f"{where}.outputs: name the outputs the stage reads, e.g. [fpn]")
    if ref.views is not None and (not ref.views or set(ref.views) - {"orig", "hflip"} or "orig" not in ref.views):
        raise PlanError(f"{where}.views: [orig] or [orig, hflip], got {ref.views!r}")


def load_plan(path: str | Path, changes: dict | None = None) -> Plan:
    """The plan in ``path``, checked; ``changes`` (``mtpd-train --set``): overlays on its YAML first, by path
    (``mtpd.trainer.overlay``)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanError(f"{p}: plan file not found") from None
    except UnicodeDecodeError as e:
        raise PlanError(
            f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start}); save the plan as UTF-8 YAML"
        ) from None
    except yaml.YAMLError as e:
        raise PlanError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if changes and isinstance(data, dict):  # a file that is not a mapping: from_dict says so below
        from mtpd.trainer.overlay import overlay

        data = overlay(data, changes)
    plan = from_dict(Plan, data, "plan")
    plan.validate()
    return _graph_views(_resolve_paths(plan, p.parent), data.get("data") or {})


def _graph_views(plan: Plan, given: dict) -> Plan:
    """The data.short/long a plan leaves out take its ONNX teachers' fixed graph input, as ``mtpd-cache build``
    does without --short/--long: such a graph takes views of its size and no larger (the smallest, if several)."""
    from mtpd.onnx_mapping import MappingError, fixed_input_size

    if "short" in given and "long" in given:
        return plan
    sizes = []
    for s in plan.stages:
        if s.teacher is not None and s.teacher.name.startswith("onnx:"):
            try:
                sizes.append(fixed_input_size(s.teacher.name[len("onnx:") :]))
            except MappingError:
                pass  # the stage's store lookup names the mapping's fault
    sizes = [x for x in sizes if x is not None]
    if not sizes:
        return plan
    d = plan.data  # a side given keeps its value (too large, the store lookup refuses it, naming the size)
    short, long = min(min(x) for x in sizes), min(max(x) for x in sizes)
    if "short" not in given:
        d.short = min(short, d.long) if "long" in given else short
    if "long" not in given:
        d.long = max(long, d.short)
    return plan


def _resolve_paths(plan: Plan, base: Path) -> Plan:
    """Relative paths in a plan are relative to the plan file, so plans can move with their data."""

    def fix(v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise PlanError(f"{base / 'plan'}: the path {v!r} holds a NUL character; fix it in the plan")
        if v is None or v == "none" or "://" in v:
            return v
        v = str(Path(v).expanduser())
        # Lexically, symlinks kept: data linked into a folder is named as it is there, so a study's records
        # (whose fingerprints hold folders relative to the study) stay valid in a copy that links the same data.
        return v if Path(v).is_absolute() else os.path.normpath(os.path.abspath(base / v))

    d = plan.data
    d.train_ann, d.train_images, d.val_ann, d.val_images, d.pool_ann, d.pool_images = map(
        fix, (d.train_ann, d.train_images, d.val_ann, d.val_images, d.pool_ann, d.pool_images)
    )
    plan.student.init = fix(plan.student.init)
    plan.output_dir = fix(plan.output_dir)
    plan.cache_root = fix(plan.cache_root)
    for s in plan.stages:
        s.stores = [fix(x) for x in s.stores]
        s.pool_stores = [fix(x) for x in s.pool_stores]
        if s.inherit:
            s.inherit.weights = fix(s.inherit.weights)
        if s.teacher and s.teacher.weights not in ("none", "default"):
            s.teacher.weights = fix(s.teacher.weights)
        if s.teacher and s.teacher.name.startswith("onnx:"):  # an ONNX teacher is named by its mapping file
            s.teacher.name = "onnx:" + fix(s.teacher.name[len("onnx:") :])
    return plan


def plan_to_dict(plan: Plan) -> dict:
    return dataclasses.asdict(plan)


def same_plan(saved: Plan, plan: Plan, auto_chosen: list[dict[str, float] | None] | None = None) -> bool:
    """Whether a finished stage's saved plan is ``plan``. A weight that ``plan`` leaves to ``weight: auto`` is
    saved as the number the stage's first step chose: that is what auto asked for, not a change of plan.
    ``auto_chosen[i]``: the weights auto chose in stage i+1, by loss name (None: not recorded, any number
    passes), so that a fixed weight saved by an earlier plan does not pass for auto."""
    d = plan_to_dict(saved)
    chosen_by_stage = list(auto_chosen or []) + [None] * len(plan.stages)
    for s_stage, p_stage, chosen in zip(d["stages"], plan.stages, chosen_by_stage):
        for s_loss, p_loss in zip(s_stage["losses"], p_stage.losses):
            number = isinstance(s_loss["weight"], (int, float))
            if (
                p_loss.weight == "auto"
                and number
                and (chosen is None or chosen.get(s_loss["name"]) == s_loss["weight"])
            ):
                s_loss["weight"] = "auto"
    return d == plan_to_dict(plan)


def save_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(plan_to_dict(plan), sort_keys=False))
