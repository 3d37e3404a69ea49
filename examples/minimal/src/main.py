"""Train a small softmax classifier on the flowers CSV, with the standard library only.

AICert runs this inside a container with no network: the code is at /workspace/src (read
only), extra resources at /workspace/resources, and whatever is written to
/workspace/outputs is measured into the certificate.
"""

import csv
import json
import math
import os
import random
import time
from pathlib import Path

SOURCE = Path(os.environ.get("AICERT_SRC", "/workspace/src"))
OUTPUTS = Path(os.environ.get("AICERT_OUTPUTS", "/workspace/outputs"))
EPOCHS = int(os.environ.get("EPOCHS", "200"))
LEARNING_RATE = 0.05


def load(path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = sorted({row["species"] for row in rows})
    features = [k for k in rows[0] if k != "species"]
    x = [[float(row[f]) for f in features] for row in rows]
    y = [classes.index(row["species"]) for row in rows]
    return x, y, features, classes


def softmax(scores):
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def main():
    random.seed(0)
    x, y, features, classes = load(SOURCE / "inputs" / "flowers.csv")
    means = [sum(col) / len(col) for col in zip(*x)]
    stds = [max(1e-6, math.sqrt(sum((v - m) ** 2 for v in col) / len(col))) for col, m in zip(zip(*x), means)]
    x = [[(v - m) / s for v, m, s in zip(row, means, stds)] for row in x]
    weights = [[0.0] * (len(features) + 1) for _ in classes]
    order = list(range(len(x)))
    started = time.time()
    for epoch in range(1, EPOCHS + 1):
        random.shuffle(order)
        loss = 0.0
        for i in order:
            inputs = x[i] + [1.0]
            probs = softmax([sum(w * v for w, v in zip(ws, inputs)) for ws in weights])
            loss -= math.log(max(probs[y[i]], 1e-12))
            for k, ws in enumerate(weights):
                error = probs[k] - (1.0 if k == y[i] else 0.0)
                for j, v in enumerate(inputs):
                    ws[j] -= LEARNING_RATE * error * v
        if epoch % 20 == 0 or epoch == 1:
            correct = sum(
                1
                for i in range(len(x))
                if max(range(len(classes)), key=lambda k: sum(w * v for w, v in zip(weights[k], x[i] + [1.0]))) == y[i]
            )
            print(f"epoch {epoch:4d}  loss {loss / len(x):.4f}  accuracy {correct / len(x):.3f}", flush=True)
    OUTPUTS.mkdir(parents=True, exist_ok=True)
    model = {"classes": classes, "features": features, "means": means, "stds": stds, "weights": weights}
    (OUTPUTS / "model.json").write_text(json.dumps(model, indent=2) + "\n")
    metrics = {"epochs": EPOCHS, "final_loss": loss / len(x), "accuracy": correct / len(x)}
    (OUTPUTS / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"trained in {time.time() - started:.1f} s; wrote model.json and metrics.json", flush=True)


if __name__ == "__main__":
    main()
