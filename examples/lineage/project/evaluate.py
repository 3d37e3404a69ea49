"""Stage 3: evaluate the certified fine-tuned model on the held-out split; metrics.json is the
run's declared ``results`` file, so its metrics are certified."""

import json

from common import OUTPUTS, RESOURCES, load, scores

model = json.loads((RESOURCES / "model" / "model.json").read_text())
x, labels, _ = load(RESOURCES / "data" / "heldout.csv")
correct = 0
for row, label in zip(x, labels):
    p = scores(model, row)
    correct += model["classes"][p.index(max(p))] == label
metrics = {"accuracy": correct / len(x), "examples": len(x)}
(OUTPUTS / "metrics.json").write_text(json.dumps(metrics) + "\n")
print(f"held-out accuracy {metrics['accuracy']:.3f} on {len(x)} rows", flush=True)
