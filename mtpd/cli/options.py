"""Options shared by `mtpd-cache build` and `mtpd-cache estimate`: which teacher runs over which data."""

from __future__ import annotations

import argparse

from mtpd.defaults import DEFAULT_PRECISION


def teacher_and_data(what: argparse._ArgumentGroup) -> None:
    """The options that say which teacher runs over which data (build and estimate share them)."""
    what.add_argument(
        "--teacher",
        required=True,
        help="registered name (see `mtpd-cache list-teachers`), mmdet:CONFIG, onnx:MAPPING.yaml (an ONNX graph and "
        "the file naming its tensors: docs/teachers.md), or package.module:factory",
    )
    what.add_argument(
        "--weights",
        default="none",
        help="checkpoint path, 'default' (COCO weights from the local torch cache) or 'none' (random "
        "init, seeded: the same command gives the same store)",
    )
    what.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of a randomly initialised teacher (default: the dataset's)",
    )
    what.add_argument(
        "--amp",
        default="off",
        choices=["off", "bf16", "fp16"],
        help="run the teacher's forward under autocast (outputs go to fp32 before encoding; part of the store's "
        "identity). bf16 on CPUs and recent GPUs, fp16 on GPUs; default: %(default)s",
    )
    what.add_argument("--ann", required=True, help="COCO instances JSON")
    what.add_argument("--images", required=True, help="folder the JSON's file_name entries are relative to")
    view_options(what)
    what.add_argument(
        "--outputs",
        default=None,
        help="comma-separated outputs (fpn,cls,box,...); default: all dense outputs except RPN",
    )
    what.add_argument(
        "--precision",
        default=DEFAULT_PRECISION,  # a string: argparse runs it through the type as well
        type=_precision,
        help="lossless: fp16; high: BitRound 7 bits; compact: BitRound 5 bits + uint8 log-probabilities; "
        "small: features as 4-bit per-channel codes; tiny: features projected on a per-store PCA basis of half "
        "the channels, 4-bit coefficients (docs/stores.md: Precision presets; default: %(default)s, the smallest "
        "that cost distillation no measurable AP in the bytes-vs-AP sweep: docs/stores.md, How small can a store "
        "be); or a preset "
        "with encodings replaced, e.g. small+features=transform:bits=2+logits=topk:k=2,groups=anchors; several, "
        "comma-separated (small,tiny,micro), come from one teacher pass",
    )


def view_options(what: argparse._ArgumentGroup) -> None:
    """Which views of each image a store holds, and their size."""
    what.add_argument("--views", default="orig", help="comma-separated views: orig, hflip")
    what.add_argument(
        "--augment",
        default=None,
        metavar="POLICY",
        help="store a bank of augmented views instead of --views: e.g. scale=0.5:1.5,bank=8 (fields: scale, crop, "
        "flip, bank, seed; a plan's data.augment must match to train from it)",
    )
    what.add_argument(
        "--short",
        type=int,
        default=None,
        help="short side of the resized view (default: 800, or the short side of an ONNX graph's fixed input)",
    )
    what.add_argument(
        "--long",
        type=int,
        default=None,
        help="upper bound of the long side (default: 1333, or the long side of an ONNX graph's fixed input)",
    )


def _precision(text: str) -> list[str]:
    """argparse type: one or more comma-separated precisions (a preset, or one with replaced encodings), each
    checked here (one line naming the fault)."""
    from mtpd.cache.schema import StoreError, get_precision, split_precisions

    names = split_precisions(text)
    try:
        for name in names:
            get_precision(name)
    except StoreError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text}: each precision once")
    return names


def teacher_spec(a: argparse.Namespace):
    """TeacherSpec and ViewSpec from the shared options (a random teacher gets the dataset's classes)."""
    from mtpd.data import CocoDataset, ViewSpec
    from mtpd.teachers.registry import TeacherSpec

    num_classes = a.num_classes
    if num_classes is None and a.weights == "none":
        num_classes = CocoDataset(a.ann, a.images).num_classes
    spec = TeacherSpec(a.teacher, a.weights, num_classes, a.device, trust_checkpoint=a.trust_checkpoint, amp=a.amp)
    short, long = a.short, a.long
    if (short is None or long is None) and a.teacher.startswith("onnx:"):
        # A graph with a fixed input takes views of that size and no larger: its size is the default (read from
        # the mapping and the graph's structure; the teacher itself is built once, by the build).
        from mtpd.onnx_mapping import fixed_input_size

        fixed = fixed_input_size(a.teacher[len("onnx:") :])
        if fixed is not None:  # a side given keeps its value (too large, the build refuses it, naming the size)
            short = short or min(min(fixed), long or min(fixed))
            long = long or max(max(fixed), short)
    names = tuple(x.strip() for x in a.views.split(",") if x.strip())
    augment = None
    if getattr(a, "augment", None):
        from mtpd.data.augment import AugmentError, AugmentPolicy

        policy = AugmentPolicy.parse(a.augment)
        if policy.bank < 1:
            raise AugmentError("--augment: a store holds a bank of views: give bank=K (e.g. bank=8)")
        names, augment = policy.bank_views(), policy.to_dict()
    views = ViewSpec(short=short or 800, long=long or 1333, views=names, augment=augment)
    return spec, views


def checkpoint_views(checkpoint: str, short: int | None, long: int | None) -> tuple[int, int]:
    """A stage's plan.yaml sits beside its checkpoint: evaluate at the views it trained on."""
    from pathlib import Path

    import yaml

    plan = Path(checkpoint).with_name("plan.yaml")
    if (short is None or long is None) and plan.is_file():
        data = yaml.safe_load(plan.read_text()).get("data", {})
        short = short or data.get("short")
        long = long or data.get("long")
    return short or 800, long or 1333
