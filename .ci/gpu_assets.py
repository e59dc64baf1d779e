"""The asset subset of the GPU check (issue #16), small enough to travel to a GPU machine.

  python3 .ci/gpu_assets.py pack   ASSETS DEST   # here: writes DEST (a few tens of MiB)
  python3 .ci/gpu_assets.py unpack DEST  ASSETS2 # there: rebuilds an ASSETS-like tree

The subset holds, for every class experiments/quick.yaml keeps (masterCategory <
subCategory < articleType with at least 40 items), its first 50 items: their styles.csv rows
and images (about 3,600 items; quick.yaml keeps them all).
MobileNetV2's checkpoint travels as it is (its name carries its hash, which the loader
checks). all-MiniLM-L6-v2 travels in f16 (the device tool carries at most 64 MiB) and comes
back as f32, with its word-embedding matrix cut to the rows of the tokens that occur in the
subset's texts (any column) and the special tokens (the other rows come back as zeros and
are never looked up for this data). So text features on the GPU machine come from the real
weights rounded to f16: close to, not bit-equal to, the CPU's. Needs torch, safetensors
and tokenizers.
"""
import csv
import json
import os
import shutil
import sys
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DATA = "data/fashion-product-images-small"
MINILM = "models/all-MiniLM-L6-v2"
MOBILENET = "torch/hub/checkpoints/mobilenet_v2-b0353104.pth"
WORDS = "embeddings.word_embeddings.weight"


def pack(assets, dest):
    src = os.path.join(assets, DATA)
    with open(os.path.join(src, "styles.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    by_class = defaultdict(list)
    for r in rows:
        if len(r) != len(header) or not os.path.exists(os.path.join(src, "images", r[0] + ".jpg")):
            continue
        by_class[(r[col["masterCategory"]], r[col["subCategory"]], r[col["articleType"]])].append(r)
    # Every class quick.yaml keeps (>= 40 items), 50 items each: enough for its 40-item minimum.
    keep = [r for items in by_class.values() if len(items) >= 40 for r in items[:50]]
    out = os.path.join(dest, DATA)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, "styles.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(keep)
    for r in keep:
        shutil.copy(os.path.join(src, "images", r[0] + ".jpg"), os.path.join(out, "images"))

    # all-MiniLM-L6-v2: the rows of the tokens this data uses, everything in f16.
    from tokenizers import Tokenizer

    msrc, mout = os.path.join(assets, MINILM), os.path.join(dest, MINILM)
    os.makedirs(mout, exist_ok=True)
    for name in os.listdir(msrc):
        p = os.path.join(msrc, name)
        if os.path.isfile(p) and name != "model.safetensors":
            shutil.copy(p, mout)
    if os.path.isdir(os.path.join(msrc, "1_Pooling")):
        shutil.copytree(os.path.join(msrc, "1_Pooling"), os.path.join(mout, "1_Pooling"), dirs_exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(msrc, "tokenizer.json"))
    texts = sorted({cell for r in keep for cell in r} | {c for key in by_class for c in key})
    used = set()
    for enc in tok.encode_batch(texts):
        used.update(enc.ids)
    for special in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]:
        i = tok.token_to_id(special)
        if i is not None:
            used.add(i)
    used = torch.tensor(sorted(used), dtype=torch.int64)
    tensors = {}
    with safe_open(os.path.join(msrc, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if k == WORDS:
                tensors["huse.vocab_rows"] = torch.tensor([t.shape[0]], dtype=torch.int64)
                tensors["huse.used_ids"] = used
                t = t[used]
            tensors[k] = t.half() if t.is_floating_point() else t
    save_file(tensors, os.path.join(mout, "model.f16.safetensors"))

    os.makedirs(os.path.dirname(os.path.join(dest, MOBILENET)), exist_ok=True)
    shutil.copy(os.path.join(assets, MOBILENET), os.path.join(dest, MOBILENET))
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(dest) for n in ns)
    print(json.dumps({"items": len(keep), "classes": sum(len(v) >= 40 for v in by_class.values()), "tokens": len(used), "bytes": size}))


def unpack(dest, assets):
    shutil.copytree(os.path.join(dest, DATA), os.path.join(assets, DATA), dirs_exist_ok=True)
    msrc, mout = os.path.join(dest, MINILM), os.path.join(assets, MINILM)
    shutil.copytree(msrc, mout, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.f16.safetensors"))
    tensors = {}
    with safe_open(os.path.join(msrc, "model.f16.safetensors"), "pt") as f:
        vocab = int(f.get_tensor("huse.vocab_rows")[0])
        used = f.get_tensor("huse.used_ids")
        for k in f.keys():
            if k.startswith("huse."):
                continue
            t = f.get_tensor(k)
            t = t.float() if t.is_floating_point() else t
            if k == WORDS:
                full = torch.zeros(vocab, t.shape[1], dtype=torch.float32)
                full[used] = t
                t = full
            tensors[k] = t.contiguous()
    save_file(tensors, os.path.join(mout, "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(os.path.dirname(os.path.join(assets, MOBILENET)), exist_ok=True)
    shutil.copy(os.path.join(dest, MOBILENET), os.path.join(assets, MOBILENET))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(sys.argv[2], sys.argv[3])
