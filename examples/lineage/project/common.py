"""Shared by the three stages: a softmax classifier on the flowers CSV, standard library only.

Each stage runs in a certified container without network: code at /workspace/src, resources
at /workspace/resources, and what it writes to /workspace/outputs is measured.
"""

import csv
import json
import math
import random
from pathlib import Path

RESOURCES = Path("/workspace/resources")
OUTPUTS = Path("/workspace/outputs")


def load(path):
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    features = [k for k in rows[0] if k != "species"]
    x = [[float(row[f]) for f in features] for row in rows]
    return x, [row["species"] for row in rows], features


def scores(model, row):
    z = [(v - m) / s for v, m, s in zip(row, model["means"], model["stds"])] + [1.0]
    out = [sum(w * v for w, v in zip(weights, z)) for weights in model["weights"]]
    top = max(out)
    exps = [math.exp(s - top) for s in out]
    return [e / sum(exps) for e in exps]


def train(model, x, labels, epochs, rate=0.05):
    """Gradient descent on the cross-entropy; returns the last epoch's mean loss."""
    random.seed(0)
    order = list(range(len(x)))
    loss = 0.0
    for _ in range(epochs):
        random.shuffle(order)
        loss = 0.0
        for i in order:
            p = scores(model, x[i])
            target = model["classes"].index(labels[i])
            loss -= math.log(max(p[target], 1e-12))
            z = [(v - m) / s for v, m, s in zip(x[i], model["means"], model["stds"])] + [1.0]
            for c, weights in enumerate(model["weights"]):
                grad = p[c] - (1.0 if c == target else 0.0)
                for j in range(len(weights)):
                    weights[j] -= rate * grad * z[j]
    return loss / len(x)


def save(model, name="model.json"):
    (OUTPUTS / name).write_text(json.dumps(model, indent=1, sort_keys=True) + "\n")
