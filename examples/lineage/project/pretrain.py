"""Stage 1: pretrain the classifier from scratch on the pretraining split."""

import math
import os

from common import RESOURCES, load, save, train

x, labels, features = load(RESOURCES / "data" / "pretrain.csv")
columns = list(zip(*x))
means = [sum(col) / len(col) for col in columns]
stds = [max(1e-6, math.sqrt(sum((v - m) ** 2 for v in col) / len(col))) for col, m in zip(columns, means)]
classes = sorted(set(labels))
model = {
    "classes": classes,
    "features": features,
    "means": means,
    "stds": stds,
    "weights": [[0.0] * (len(features) + 1) for _ in classes],
}
loss = train(model, x, labels, int(os.environ.get("EPOCHS", "30")))
save(model)
print(f"pretrained on {len(x)} rows, loss {loss:.4f}", flush=True)
