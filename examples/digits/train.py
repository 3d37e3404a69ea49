"""The default demo: train a small neural network on the bundled hand-written digits.

An MLPClassifier (scikit-learn, pinned in requirements.txt with every dependency) trained for
EPOCHS passes on 75% of the digits and tested on the other 25%. Writes model.npz (the
weights, no pickle), model-card.json (hyperparameters, dataset, versions, metrics) and
metrics.json, which ../aicert.yaml declares as the run's certified ``results``.
"""

from __future__ import annotations

import os

from digits_model import dataset_card, digits_split, new_model, save, train_epochs

EPOCHS = int(os.environ.get("EPOCHS", "40"))
HYPERPARAMETERS: dict[str, object] = {
    "hidden_layer_sizes": [64],
    "activation": "relu",
    "solver": "adam",
    "learning_rate_init": 0.001,
    "batch_size": 64,
    "alpha": 0.0001,
    "random_state": 0,
}


def main() -> None:
    x_train, x_test, y_train, y_test = digits_split()
    print(f"digits: {len(x_train)} training and {len(x_test)} test images", flush=True)
    model = new_model(HYPERPARAMETERS)
    accuracy = train_epochs(model, x_train, y_train, (x_test, y_test), EPOCHS)
    card = {
        "model": "sklearn.neural_network.MLPClassifier",
        "task": "classify 8x8 images of hand-written digits",
        "hyperparameters": {**HYPERPARAMETERS, "epochs": EPOCHS},
        "dataset": dataset_card(x_train, x_test),
    }
    metrics = {
        "accuracy": round(accuracy, 6),
        "final_loss": round(float(model.loss_), 6),
        "epochs": EPOCHS,
        "test_examples": len(x_test),
    }
    save(model, card, metrics)


if __name__ == "__main__":
    main()
