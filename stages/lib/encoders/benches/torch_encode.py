"""PyTorch side of the encode benchmark: torchvision MobileNetV2 (224 px, PIL preprocessing)
and MiniLM last-4-layer features via transformers, on the same files and texts as the Rust side.
Prints one JSON line: {"images_per_s": ..., "texts_per_s": ...}."""
import json, os, sys, time

import torch
import torchvision
from PIL import Image
from torchvision import transforms

args = json.loads(sys.stdin.read())
torch.set_num_threads(args["threads"])
device = torch.device(args.get("device", "cpu"))
on_gpu = device.type == "cuda"

model = torchvision.models.mobilenet_v2()
model.load_state_dict(torch.load(args["checkpoint"]))
model.eval().to(device)
tf = transforms.Compose([
    transforms.Resize((args["size"], args["size"])),
    transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
paths, bs = args["images"], args["batch"]


class Files(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)

    def __getitem__(self, i):
        return tf(Image.open(paths[i]).convert("RGB"))


with torch.inference_mode():
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[:bs]]).to(device)
    model.features(x)  # warm-up
    if on_gpu:
        # Decode + resize on `threads` worker processes, batches ahead of the GPU.
        loader = torch.utils.data.DataLoader(Files(), batch_size=bs, num_workers=args["threads"], pin_memory=True)
        t = time.perf_counter()
        for x in loader:
            f = torch.nn.functional.adaptive_avg_pool2d(model.features(x.to(device, non_blocking=True)), 1).flatten(1).cpu()
    else:
        t = time.perf_counter()
        for i in range(0, len(paths), bs):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + bs]])
            f = torch.nn.functional.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
    images_per_s = len(paths) / (time.perf_counter() - t)

texts_per_s = None
try:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args["text_model"])
    bert = AutoModel.from_pretrained(args["text_model"]).eval().to(device)
    texts, tb = args["texts"], args["text_batch"]
    with torch.inference_mode():
        def feats(batch):
            enc = tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            hs = bert(**enc, output_hidden_states=True).hidden_states[-4:]
            m = enc["attention_mask"].unsqueeze(-1).float()
            return torch.cat([(h * m).sum(1) / m.sum(1).clamp(min=1e-9) for h in hs], 1).cpu()
        feats(texts[:tb])
        t = time.perf_counter()
        for i in range(0, len(texts), tb):
            feats(texts[i:i + tb])
        texts_per_s = len(texts) / (time.perf_counter() - t)
except ImportError as e:
    print(f"transformers missing: {e}", file=sys.stderr)
print(json.dumps({"device": str(device), "images_per_s": images_per_s, "texts_per_s": texts_per_s, "torch": torch.__version__, "threads": torch.get_num_threads()}))
