"""PyTorch side of the train benchmark: the identical HUSE model (same dims, dropout, losses,
AdamW, batch) on the same features (raw f32 files written by the Rust side).
Prints one JSON line: {"samples_per_s": ...}."""
import json, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F

a = json.loads(sys.stdin.read())
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
n, di, dt, k = a["rows"], a["image_dim"], a["text_dim"], a["classes"]
dev = torch.device(a.get("device", "cpu"))
xi = torch.from_file(a["image_file"], size=n * di, dtype=torch.float32).view(n, di).to(dev)
xt = torch.from_file(a["text_file"], size=n * dt, dtype=torch.float32).view(n, dt).to(dev)
y = torch.randint(0, k, (n,)).to(dev)
A = torch.rand(k, k)
A = (A + A.t()) / 2
A.fill_diagonal_(0)
A = A.to(dev)


def tower(inp, layers):
    mods, f = [], inp
    for i in range(layers):
        mods += [nn.Linear(f, 512), nn.ReLU()]
        if i + 1 < layers:
            mods.append(nn.Dropout(0.15))
        f = 512
    mods.append(nn.Linear(f, 512))
    return nn.Sequential(*mods)


img, txt, shared = tower(di, 5).to(dev), tower(dt, 2).to(dev), nn.Linear(512, k).to(dev)
params = list(img.parameters()) + list(txt.parameters()) + list(shared.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
zeta, beta, gamma = 0.5, 0.5, 0.5


def block(e1, e2, y1, y2):
    d = 1 - e1 @ e2.t()
    t = A[y1][:, y2]
    off = 1 - torch.eye(e1.shape[0], device=dev)
    sigma = ((t < zeta) & (d.detach() < zeta)).float() * off
    return (sigma * (d - t) ** 2).sum() / e1.shape[0] ** 2


def step(idx):
    pi = F.normalize(img(xi[idx]), dim=1)
    pt = F.normalize(txt(xt[idx]), dim=1)
    yy = y[idx]
    lc = (F.cross_entropy(shared(pi), yy) + F.cross_entropy(shared(pt), yy)) / 2
    lg = (block(pi, pi, yy, yy) + block(pt, pt, yy, yy) + block(pi, pt, yy, yy)) / 3
    lgap = (1 - (pi * pt).sum(1)).mean()
    loss = lc + beta * lg + gamma * lgap
    opt.zero_grad()
    loss.backward()
    opt.step()


bs, steps = a["batch"], a["steps"]
perm = torch.randperm(n).to(dev)
batches = [perm[(i * bs) % (n - bs):(i * bs) % (n - bs) + bs] for i in range(steps + 3)]
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
for b in batches[:3]:
    step(b)
sync()
t = time.perf_counter()
for b in batches[3:]:
    step(b)
sync()
print(json.dumps({"samples_per_s": steps * bs / (time.perf_counter() - t), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev)}))
