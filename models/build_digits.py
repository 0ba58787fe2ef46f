"""Build the small trained ``digits`` MLP used by the onnxprune quickstart and tests.

Run ``python models/build_digits.py`` from the repository root. It trains a
64 -> 256 -> 128 -> 10 MLP on scikit-learn's 8x8 digits in plain numpy, exports
it to ONNX (opset 17), checks that onnxruntime reproduces the numpy model's
test accuracy and writes, next to this file:

* ``digits_mlp.onnx``          - the model (input ``pixels`` [batch, 64], output ``logits``)
* ``digits_calib.npz``         - key ``pixels``: 256 training images, float32 [256, 64]
* ``digits_test.npz``          - key ``pixels``: the 500 held-out images, float32 [500, 64]
* ``digits_test_labels.npy``   - int64 [500] labels of those images

Everything is seeded and the archives are written with fixed zip timestamps, so
two runs produce byte-identical files.

``accuracy(model_path)`` evaluates any ONNX model with input ``pixels`` and a
logits output on the test set; it needs only numpy and onnxruntime (sklearn is
imported inside :func:`build` only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent
MODEL_FILE = "digits_mlp.onnx"
CALIB_FILE = "digits_calib.npz"
TEST_FILE = "digits_test.npz"
LABELS_FILE = "digits_test_labels.npy"

SEED = 0
N_TEST = 500
N_CALIB = 256
HIDDEN1 = 256
HIDDEN2 = 128
N_CLASSES = 10
EPOCHS = 200
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17 (onnx 1.12)


@dataclass
class MLP:
    """Weights in "math" layout: ``h = x @ w + b`` (w has shape [in, out])."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def astype(self, dtype: type) -> MLP:
        return MLP(*(np.ascontiguousarray(p, dtype=dtype) for p in self.params()))

    def params(self) -> list[np.ndarray]:
        return [self.w1, self.b1, self.w2, self.b2, self.w3, self.b3]

    def logits(self, x: np.ndarray) -> np.ndarray:
        h1 = np.maximum(x @ self.w1 + self.b1, 0)
        h2 = np.maximum(h1 @ self.w2 + self.b2, 0)
        return h2 @ self.w3 + self.b3


# --------------------------------------------------------------------------- data


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``x_train, y_train, x_test, y_test`` (float32 in [0, 1], int64 labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=N_TEST, stratify=y, random_state=SEED
    )
    return (
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


# ----------------------------------------------------------------------- training


def _init(rng: np.random.Generator, fan_in: int, fan_out: int) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))


def train(x: np.ndarray, y: np.ndarray) -> MLP:
    """Train the MLP with Adam + cross-entropy in float64; deterministic for a fixed seed."""
    rng = np.random.default_rng(SEED)
    n_in = x.shape[1]
    model = MLP(
        _init(rng, n_in, HIDDEN1),
        np.zeros(HIDDEN1),
        _init(rng, HIDDEN1, HIDDEN2),
        np.zeros(HIDDEN2),
        _init(rng, HIDDEN2, N_CLASSES),
        np.zeros(N_CLASSES),
    )
    params = model.params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    x64 = x.astype(np.float64)
    onehot = np.eye(N_CLASSES)[y]
    step = 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(x64))
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            xb, tb = x64[idx], onehot[idx]
            # forward
            z1 = xb @ model.w1 + model.b1
            h1 = np.maximum(z1, 0)
            z2 = h1 @ model.w2 + model.b2
            h2 = np.maximum(z2, 0)
            z3 = h2 @ model.w3 + model.b3
            z3 = z3 - z3.max(axis=1, keepdims=True)
            prob = np.exp(z3)
            prob /= prob.sum(axis=1, keepdims=True)
            # backward (mean cross-entropy)
            g3 = (prob - tb) / len(idx)
            gw3 = h2.T @ g3
            gb3 = g3.sum(axis=0)
            g2 = (g3 @ model.w3.T) * (z2 > 0)
            gw2 = h1.T @ g2
            gb2 = g2.sum(axis=0)
            g1 = (g2 @ model.w2.T) * (z1 > 0)
            gw1 = xb.T @ g1
            gb1 = g1.sum(axis=0)
            grads = [gw1, gb1, gw2, gb2, gw3, gb3]
            # Adam with decoupled weight decay on the weight matrices (AdamW)
            step += 1
            lr_t = LEARNING_RATE * np.sqrt(1 - beta2**step) / (1 - beta1**step)
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                m[i] = beta1 * m[i] + (1 - beta1) * g
                v[i] = beta2 * v[i] + (1 - beta2) * g * g
                if p.ndim == 2:
                    p *= 1 - LEARNING_RATE * WEIGHT_DECAY
                p -= lr_t * m[i] / (np.sqrt(v[i]) + eps)
    return model


# ------------------------------------------------------------------------- export


def to_onnx(model: MLP):  # -> onnx.ModelProto
    """Export ``model`` (float32) as an opset-17 graph: Gemm(transB=1), MatMul+Add, Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f = model.astype(np.float32)
    inits = [
        # fc1 weight stored [out, in] = [256, 64] and consumed by Gemm with transB=1
        numpy_helper.from_array(np.ascontiguousarray(f.w1.T), "fc1.weight"),
        numpy_helper.from_array(f.b1, "fc1.bias"),
        numpy_helper.from_array(f.w2, "fc2.weight"),  # [256, 128], MatMul
        numpy_helper.from_array(f.b2, "fc2.bias"),
        numpy_helper.from_array(f.w3, "fc3.weight"),  # [128, 10], Gemm transB=0
        numpy_helper.from_array(f.b3, "fc3.bias"),
    ]
    nodes = [
        helper.make_node(
            "Gemm", ["pixels", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1
        ),
        helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MatMul", ["relu1_out", "fc2.weight"], ["fc2_out"], name="fc2"),
        helper.make_node("Add", ["fc2_out", "fc2.bias"], ["fc2_bias_out"], name="fc2_bias"),
        helper.make_node("Relu", ["fc2_bias_out"], ["relu2_out"], name="relu2"),
        helper.make_node(
            "Gemm", ["relu2_out", "fc3.weight", "fc3.bias"], ["logits"], name="fc3", transB=0
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializer=inits,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="onnxprune-models/build_digits.py",
        doc_string="MLP 64-256-128-10 trained on sklearn digits (8x8, pixels scaled to [0,1]).",
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


# ---------------------------------------------------------------------- file I/O


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- evaluation


def accuracy(model_path: str | Path, data_dir: str | Path | None = None) -> float:
    """Top-1 accuracy of an ONNX model (input ``pixels``, first output = logits).

    Uses ``digits_test.npz`` / ``digits_test_labels.npy`` from ``data_dir``
    (default: the directory of this file). Needs only numpy and onnxruntime.
    """
    import onnxruntime as ort

    data = Path(data_dir) if data_dir is not None else MODELS_DIR
    with np.load(data / TEST_FILE) as npz:
        pixels = npz["pixels"]
    labels = np.load(data / LABELS_FILE)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"pixels": pixels})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ----------------------------------------------------------------------------- main


def build(out_dir: str | Path = MODELS_DIR) -> float:
    """Train, export, verify and write all files into ``out_dir``; return test accuracy."""
    import onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_data()
    model = train(x_train, y_train)
    f32 = model.astype(np.float32)
    np_acc = float(np.mean(np.argmax(f32.logits(x_test), axis=1) == y_test))
    train_acc = float(np.mean(np.argmax(f32.logits(x_train), axis=1) == y_train))

    onnx.save_model(to_onnx(model), str(out / MODEL_FILE))
    _save_npz(out / CALIB_FILE, pixels=x_train[:N_CALIB])
    _save_npz(out / TEST_FILE, pixels=x_test)
    np.save(out / LABELS_FILE, y_test.astype(np.int64))

    ort_acc = accuracy(out / MODEL_FILE, out)
    print(f"train accuracy (numpy, float32): {train_acc:.4f}")
    print(f"test accuracy  (numpy, float32): {np_acc:.4f}")
    print(f"test accuracy  (onnxruntime):    {ort_acc:.4f}")
    if ort_acc != np_acc:
        raise RuntimeError(f"onnxruntime accuracy {ort_acc} != numpy accuracy {np_acc}")
    for name in (MODEL_FILE, CALIB_FILE, TEST_FILE, LABELS_FILE):
        p = out / name
        print(f"{p.stat().st_size:>9,d} B  sha256 {_sha256(p)}  {name}")
    return ort_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir", type=Path, default=MODELS_DIR, help="where to write (default: models/)"
    )
    args = parser.parse_args()
    build(args.out_dir)


if __name__ == "__main__":
    main()
