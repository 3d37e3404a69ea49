"""Stage 2: fine-tune the certified pretrained model (a certified input) on new data."""

import json
import os

from common import RESOURCES, load, save, train

model = json.loads((RESOURCES / "base" / "model.json").read_text())
x, labels, _ = load(RESOURCES / "data" / "finetune.csv")
loss = train(model, x, labels, int(os.environ.get("EPOCHS", "10")), rate=0.02)
save(model)
print(f"fine-tuned on {len(x)} rows, loss {loss:.4f}", flush=True)
