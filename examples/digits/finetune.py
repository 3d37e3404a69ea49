"""Fine-tune the demo's digits network for a new domain, from a base-model resource.

The base model is a resource (``base/model.npz``, pinned by SHA-256 in the config, measured
into the certificate): the weights that ``train.py`` wrote. The new domain is a second
"scanner": the same digits shifted one pixel, with lower contrast, a grey background and
sensor noise (``scanner_b``). The base network scores poorly there; it is trained further on
FINETUNE_EXAMPLES labelled images of the new scanner (from the training split) and tested on
the new scanner's images of the test split, which neither training saw. metrics.json (the
run's certified ``results``) holds the accuracy before and after, and on the old domain.
"""

from __future__ import annotations

import json
import os

import numpy as np
from digits_model import (
    CLASSES,
    RESOURCES,
    dataset_card,
    digits_split,
    load_weights,
    new_model,
    save,
    train_epochs,
)
from numpy.typing import NDArray

BASE = RESOURCES / os.environ.get("BASE_MODEL", "base/model.npz")
EPOCHS = int(os.environ.get("EPOCHS", "50"))
FINETUNE_EXAMPLES = int(os.environ.get("FINETUNE_EXAMPLES", "600"))


def scanner_b(x: NDArray[np.float64], seed: int) -> NDArray[np.float64]:
    """The new domain: each image shifted right by one pixel, contrast 0.6, background 0.25,
    Gaussian noise (sigma 0.1, seeded), clipped to [0, 1]."""
    images = np.roll(x.reshape(-1, 8, 8), 1, axis=2)
    images[:, :, 0] = 0.0
    noise = np.random.default_rng(seed).normal(0.0, 0.1, images.shape)
    return np.clip(0.6 * images + 0.25 + noise, 0.0, 1.0).reshape(-1, 64)


def main() -> None:
    base_card = json.loads((BASE.parent / "model-card.json").read_text())
    x_train, x_test, y_train, y_test = digits_split()
    x_tune, y_tune = scanner_b(x_train, seed=1)[:FINETUNE_EXAMPLES], y_train[:FINETUNE_EXAMPLES]
    new_domain = (scanner_b(x_test, seed=2), y_test)

    hyperparameters = {k: v for k, v in base_card["hyperparameters"].items() if k != "epochs"}
    model = new_model(hyperparameters)
    # One step on one batch allocates the layers and the optimizer; the base weights then
    # replace the layers' values.
    batch = int(hyperparameters["batch_size"])
    model.partial_fit(x_tune[:batch], y_tune[:batch], classes=CLASSES)
    load_weights(BASE, model)
    before = float(model.score(*new_domain))
    print(f"base model ({BASE.name}): accuracy {before:.4f} on the new scanner", flush=True)
    print(f"fine-tuning on {len(x_tune)} images of the new scanner", flush=True)
    after = train_epochs(model, x_tune, y_tune, new_domain, EPOCHS)
    old_domain = float(model.score(x_test, y_test))
    card = {
        "model": "sklearn.neural_network.MLPClassifier",
        "task": "classify hand-written digits from scanner B (shifted, low contrast, noisy)",
        "base_model": {"file": f"resources/{BASE.relative_to(RESOURCES)}", "card": base_card},
        "hyperparameters": {**hyperparameters, "epochs": EPOCHS},
        "dataset": {
            **dataset_card(x_tune, new_domain[0]),
            "domain": scanner_b.__doc__,
            "finetune_examples": len(x_tune),
        },
    }
    metrics = {
        "accuracy": round(after, 6),
        "base_accuracy": round(before, 6),
        "source_domain_accuracy": round(old_domain, 6),
        "epochs": EPOCHS,
        "test_examples": len(y_test),
    }
    save(model, card, metrics)


if __name__ == "__main__":
    main()
