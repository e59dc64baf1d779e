"""HUSE trained in PyTorch, as a huse-run command stage (experiments/torch-reference.yaml).

The paper's model and losses on the encode stage's features: two towers (image: 5 hidden
layers, text: 2, of 512 units, ReLU, dropout 0.15 between hidden layers, a 512-unit output,
L2-normalised), one shared classifier, and alpha * L_class + beta * L_graph + gamma * L_gap.
It writes model.safetensors and model.json in the train stage's format (the same tensor
names), so huse-run's evaluate stage measures it exactly as it measures ours.

Everything comes from huse-run through the environment: HUSE_INPUT_<ARTIFACT> (paths),
HUSE_PARAMS (JSON: epochs, batch_size, lr, weight_decay, alpha, beta, gamma, zeta, and delta
and tau for the contrastive term that is not in the paper),
HUSE_SEED, HUSE_THREADS, HUSE_DEVICE, HUSE_OUT_DIR; metrics go to HUSE_METRICS as JSON lines.
Needs only PyTorch (no safetensors package: the format is read and written here).
"""
import json
import os
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

P = {"epochs": 15, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.01,
     "alpha": 1.0, "beta": 0.5, "gamma": 0.5, "zeta": 0.5, "delta": 0.0, "tau": 0.05, **json.loads(os.environ["HUSE_PARAMS"])}
SHAPE = {"dim": 512, "hidden": 512, "image_layers": 5, "text_layers": 2, "dropout": 0.15}
torch.set_num_threads(int(os.environ["HUSE_THREADS"]))
torch.manual_seed(int(os.environ["HUSE_SEED"]))
dev = os.environ["HUSE_DEVICE"]  # auto, cpu or cuda:N
device = torch.device(dev if dev.startswith("cuda") else "cuda" if dev == "auto" and torch.cuda.is_available() else "cpu")
inp = lambda artifact: os.environ["HUSE_INPUT_" + artifact.upper().replace(".", "_")]

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U32": torch.int32}


def read_safetensors(path):
    """name -> tensor (U32 read as int32: indices here are far below 2^31)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    out = {}
    for name, t in header.items():
        if name != "__metadata__":
            a, b = t["data_offsets"]
            buf = bytearray(data[a:b])
            flat = torch.frombuffer(buf, dtype=DTYPES[t["dtype"]]) if buf else torch.zeros(0, dtype=DTYPES[t["dtype"]])
            out[name] = flat.reshape(t["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def log(**line):
    with open(os.environ["HUSE_METRICS"], "a") as f:
        f.write(json.dumps(line) + "\n")


# --- data: the encode stage's features, ingest's labels and split, the graph's distances ---
items = [json.loads(l) for l in open(inp("items.jsonl"))]
classes = len(json.load(open(inp("classes.json")))["classes"])
image = read_safetensors(inp("image.safetensors"))["features"].float()
text = read_safetensors(inp("text.safetensors"))["bert"].float()
csr = read_safetensors(inp("tfidf.safetensors"))
vocab = len(json.load(open(inp("tfidf.json")))["terms"])
rows = torch.repeat_interleave(torch.arange(len(items)), csr["indptr"][1:] - csr["indptr"][:-1])
tfidf = torch.zeros(len(items), vocab).index_put_((rows, csr["indices"].long()), csr["values"].float())
text = torch.cat([text, tfidf], dim=1)  # the text input: sentence features, then the TF-IDF row
A = read_safetensors(inp("graph.safetensors"))["A"].float().to(device)
y = torch.tensor([it["class"] for it in items])
split = lambda s: torch.tensor([i for i, it in enumerate(items) if it["split"] == s])
train_idx, val_idx = split("train"), split("val")
image, text, y = image.to(device), text.to(device), y.to(device)


# --- the model: tensor names as huse-run's train writes them ---
class Tower(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        sizes = [width] + [SHAPE["hidden"]] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(sizes[-1], SHAPE["dim"])
        self.drop = nn.Dropout(SHAPE["dropout"])

    def forward(self, x):
        for i, layer in enumerate(self.hidden):
            x = F.relu(layer(x))
            if i + 1 < len(self.hidden):
                x = self.drop(x)
        return F.normalize(self.out(x), dim=1)


image_tower = Tower(image.shape[1], SHAPE["image_layers"]).to(device)
text_tower = Tower(text.shape[1], SHAPE["text_layers"]).to(device)
shared = nn.Linear(SHAPE["dim"], classes).to(device)
params = [*image_tower.parameters(), *text_tower.parameters(), *shared.parameters()]
opt = torch.optim.AdamW(params, lr=P["lr"], weight_decay=P["weight_decay"])


# --- the losses (Eqs. 8-12 of the paper; cosine distance d = 1 - u.v on unit vectors) ---
def graph_block(e1, e2, y1, y2):
    d = 1 - e1 @ e2.t()
    t = A[y1][:, y2]
    sigma = ((t < P["zeta"]) & (d.detach() < P["zeta"])).float() * (1 - torch.eye(len(e1), device=device))
    return (sigma * (d - t) ** 2).sum() / len(e1) ** 2


def losses(idx):
    pi, pt, yy = image_tower(image[idx]), text_tower(text[idx]), y[idx]
    l_class = (F.cross_entropy(shared(pi), yy) + F.cross_entropy(shared(pt), yy)) / 2
    l_graph = (graph_block(pi, pi, yy, yy) + graph_block(pt, pt, yy, yy) + graph_block(pi, pt, yy, yy)) / 3
    l_gap = (1 - (pi * pt).sum(1)).mean()
    # Not in the paper (delta): symmetric InfoNCE, each image picks its own text and each text its own image.
    s, own = pi @ pt.t() / P["tau"], torch.arange(len(idx), device=device)
    l_con = (F.cross_entropy(s, own) + F.cross_entropy(s.t(), own)) / 2 if P["delta"] else torch.zeros((), device=device)
    return l_class, l_graph, l_gap, l_con


@torch.no_grad()
def validate():
    for m in (image_tower, text_tower):
        m.eval()
    pi = F.softmax(shared(image_tower(image[val_idx])), 1)
    pt = F.softmax(shared(text_tower(text[val_idx])), 1)
    for m in (image_tower, text_tower):
        m.train()
    acc = lambda p: (p.argmax(1) == y[val_idx]).float().mean().item()
    # The image weight in {0, 0.05, ..., 1} with the best fused accuracy (ties: nearest 0.5), as train's `auto`.
    both, w = max((acc(w * pi + (1 - w) * pt), -abs(w - 0.5), w) for w in (i / 20 for i in range(21)))[::2]
    return {"acc_image": acc(pi), "acc_text": acc(pt), "acc_both": both, "fusion_weight": w}


best = None
for epoch in range(1, P["epochs"] + 1):
    t0, total, parts = time.perf_counter(), 0.0, torch.zeros(3)
    perm = train_idx[torch.randperm(len(train_idx))]
    batches = perm.split(P["batch_size"])
    for b in batches:
        l_class, l_graph, l_gap, l_con = losses(b.to(device))
        loss = P["alpha"] * l_class + P["beta"] * l_graph + P["gamma"] * l_gap + P["delta"] * l_con
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() / len(batches)
        parts += torch.tensor([l_class.item(), l_graph.item(), l_gap.item()]) / len(batches)
    val = validate()
    log(step=epoch, total=P["epochs"], **{"train.loss": total, "train.loss_class": parts[0].item(),
        "train.loss_graph": parts[1].item(), "train.loss_gap": parts[2].item(),
        "train.samples_per_s": len(train_idx) / (time.perf_counter() - t0),
        "val.acc.image": val["acc_image"], "val.acc.text": val["acc_text"], "val.acc.both": val["acc_both"]})
    if best is None or val["acc_both"] > best[1]["acc_both"]:
        state = {f"{n}_tower.{k.replace('hidden.', '')}": v.clone() for n, t in (("image", image_tower), ("text", text_tower))
                 for k, v in t.state_dict().items()}
        state.update({f"shared.{k}": v.clone() for k, v in shared.state_dict().items()})
        best = (epoch, val, state)

epoch, val, state = best
out = os.environ["HUSE_OUT_DIR"]
write_safetensors(os.path.join(out, "model.safetensors"), state)
network = {"image_input": image.shape[1], "text_input": text.shape[1], "classes": classes, **SHAPE}
json.dump({"network": network, "use_tfidf": True, "fusion_weight": val["fusion_weight"], "best_epoch": epoch, "val": val},
          open(os.path.join(out, "model.json"), "w"), indent=2)
log(final={"train.best_epoch": epoch})
