#!/usr/bin/env python3
"""Generates kiln's benchmark trees with a fixed seed (never committed).

many-small: 200,000 files of 200 B - 12 KB (triangular, mode 200 B) in 2,000 directories (~830 MB)
large:      20,000 files, 97% 4 KiB and 3% 1-10 MiB (~3.6 GB)

Each tree gets taskcluster/docker/<name>/Dockerfile that `# %include`s the
tree and COPYs it. --scale multiplies the file counts. File contents are
half pseudo-random bytes and half repeated text, so compression has work to
do but is not trivial.
"""
import argparse
import os
import random


def content(rng, size, text):
    half = size // 2
    rand = rng.randbytes(half)
    rep = (text * (size // len(text) + 1))[: size - half]
    return rand + rep


def generate(root, kind, scale, seed):
    rng = random.Random(seed)
    text = b"kiln benchmark line: the quick brown fox jumps over the lazy dog 0123456789\n"
    tree = os.path.join(root, "tree")
    if kind == "many-small":
        files, dirs = 200_000 * scale, 2_000 * scale
        sizes = lambda: int(rng.triangular(200, 12_000, 200))
    else:
        files, dirs = 20_000 * scale, 200 * scale
        sizes = lambda: rng.randint(1 << 20, 10 << 20) if rng.random() < 0.03 else 4096
    for d in range(dirs):
        os.makedirs(os.path.join(tree, f"d{d // 50:03}", f"s{d:05}"), exist_ok=True)
    for i in range(files):
        d = i % dirs
        path = os.path.join(tree, f"d{d // 50:03}", f"s{d:05}", f"f{i:07}.dat")
        with open(path, "wb") as f:
            f.write(content(rng, sizes(), text))
    img = os.path.join(root, "taskcluster", "docker", kind)
    os.makedirs(img, exist_ok=True)
    with open(os.path.join(img, "Dockerfile"), "w") as f:
        f.write("# %include tree\nFROM scratch\nCOPY topsrcdir/tree /tree\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root")
    ap.add_argument("--kind", choices=["many-small", "large"], required=True)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20261123)
    a = ap.parse_args()
    generate(a.root, a.kind, a.scale, a.seed)
