"""What the demo's training (train.py) and the fine-tune (finetune.py) share.

The data is scikit-learn's bundled copy of the UCI hand-written digits (1,797 8x8 images,
10 classes): it ships inside the scikit-learn wheel, so the job needs no network. The model is
an MLPClassifier; its weights are saved as a NumPy ``.npz`` of plain arrays (no pickle: loading
it runs no code) with a JSON model card beside it.

AICert runs each script in a container without network: the code at /workspace/src (read
only), resources at /workspace/resources, and everything written to /workspace/outputs is
measured into the certificate.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import sklearn
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUTPUTS = Path(os.environ.get("AICERT_OUTPUTS", "/workspace/outputs"))
RESOURCES = Path(os.environ.get("AICERT_RESOURCES", "/workspace/resources"))
CLASSES = np.arange(10)
TEST_SIZE = 0.25
SPLIT_SEED = 0
Split = tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]


def digits_split() -> Split:
    """(x_train, x_test, y_train, y_test): pixels scaled to [0, 1], a stratified 75/25 split
    with a fixed seed, so every run and the fine-tune see the same test images."""
    digits = load_digits()
    x = digits.data / 16.0
    parts = train_test_split(
        x, digits.target, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=digits.target
    )
    return parts[0], parts[1], parts[2], parts[3]


def dataset_card(x_train: NDArray[np.float64], x_test: NDArray[np.float64]) -> dict[str, object]:
    """The model card's ``dataset`` entry: what was trained and tested on."""
    return {
        "name": "sklearn.datasets.load_digits",
        "description": "UCI ML hand-written digits, 8x8 images, 10 classes",
        "shipped_with": f"scikit-learn {sklearn.__version__}",
        "train_examples": len(x_train),
        "test_examples": len(x_test),
        "split": {"test_size": TEST_SIZE, "random_state": SPLIT_SEED, "stratify": True},
    }


def new_model(hyperparameters: dict[str, object]) -> MLPClassifier:
    """An untrained MLPClassifier with these hyperparameters (see ``HYPERPARAMETERS``)."""
    hidden = hyperparameters["hidden_layer_sizes"]
    assert isinstance(hidden, list)
    return MLPClassifier(**{**hyperparameters, "hidden_layer_sizes": tuple(hidden)})


def train_epochs(
    model: MLPClassifier,
    x: NDArray[np.float64],
    y: NDArray[np.int64],
    evaluate: tuple[NDArray[np.float64], NDArray[np.int64]],
    epochs: int,
) -> float:
    """``epochs`` passes of ``partial_fit`` over (x, y), printing the loss and the accuracy on
    ``evaluate`` after each; returns the final accuracy on ``evaluate``."""
    started = time.monotonic()
    accuracy = 0.0
    for epoch in range(1, epochs + 1):
        model.partial_fit(x, y, classes=CLASSES)
        accuracy = float(model.score(*evaluate))
        print(
            f"epoch {epoch:3d}/{epochs}  loss {model.loss_:.4f}  test accuracy {accuracy:.4f}"
            f"  ({time.monotonic() - started:.1f} s)",
            flush=True,
        )
    return accuracy


def save(model: MLPClassifier, card: dict[str, object], metrics: dict[str, float]) -> None:
    """Write model.npz (the weights), model-card.json and metrics.json to the outputs."""
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    arrays = {f"coefs_{i}": w for i, w in enumerate(model.coefs_)}
    arrays |= {f"intercepts_{i}": b for i, b in enumerate(model.intercepts_)}
    write_npz(OUTPUTS / "model.npz", {"classes": model.classes_, **arrays})
    card = {
        **card,
        "weights": {
            "file": "model.npz",
            "format": "NumPy .npz, no pickle",
            "arrays": {name: list(array.shape) for name, array in arrays.items()},
        },
        "framework": {"scikit-learn": sklearn.__version__, "numpy": np.__version__},
        "metrics": metrics,
    }
    (OUTPUTS / "model-card.json").write_text(json.dumps(card, indent=2) + "\n")
    (OUTPUTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("wrote model.npz, model-card.json and metrics.json", flush=True)


def write_npz(path: Path, arrays: dict[str, NDArray[np.generic]]) -> None:
    """What ``np.savez`` writes (``np.load(path, allow_pickle=False)`` reads it), but with a
    fixed time stamp on each member: the same weights give the same bytes, so the same
    training gives the same certified digest (``np.savez`` stamps the current time)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(member, buffer.getvalue())


def load_weights(path: Path, model: MLPClassifier) -> None:
    """Copy the weights of a model.npz into ``model`` (already initialised by one
    ``partial_fit``), refusing a file whose layers do not match the model's."""
    expected = {"classes"} | {f"coefs_{i}" for i in range(len(model.coefs_))}
    expected |= {f"intercepts_{i}" for i in range(len(model.intercepts_))}
    with np.load(path, allow_pickle=False) as saved:
        if set(saved.files) != expected:
            raise SystemExit(f"{path}: arrays {sorted(saved.files)}, expected {sorted(expected)}")
        if not np.array_equal(saved["classes"], model.classes_):
            raise SystemExit(f"{path}: classes {saved['classes']} are not {model.classes_}")
        for name, params in (("coefs", model.coefs_), ("intercepts", model.intercepts_)):
            for i, param in enumerate(params):
                array = saved[f"{name}_{i}"]
                if array.shape != param.shape:
                    raise SystemExit(
                        f"{path}: {name}_{i} has shape {array.shape}, the model {param.shape}"
                    )
                # In place: the optimizer holds references to these very arrays.
                param[...] = array
