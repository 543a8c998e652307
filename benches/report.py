#!/usr/bin/env python3
"""Turns compare.sh's measurements into benches/RESULTS.md."""
import collections
import datetime
import math
import os
import platform
import statistics
import sys

results, limit, work = sys.argv[1], sys.argv[2].split(), sys.argv[3]
one_core, all_cores, sha_ni = float(limit[0]), float(limit[1]), limit[2]
runs = collections.defaultdict(list)
timeouts = collections.defaultdict(int)
for line in open(results):
    tree, name, secs, rss = line.rstrip("\n").split("\t")
    if secs == "timeout":
        timeouts[(tree, name)] += 1
        continue
    runs[(tree, name)].append((float(secs), int(rss)))


def esc(text):
    return text.replace("|", "\\|")


def med(tree, name):
    r = runs.get((tree, name))
    return statistics.median(s for s, _ in r) if r else None


def rss(tree, name):
    r = runs.get((tree, name))
    return max(m for _, m in r) / 1024 if r else None


cpu = "unknown"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
print("# kiln benchmark results\n")
print(f"- date: {datetime.date.today().isoformat()}")
print(f"- machine: {os.cpu_count()} cores, {cpu}, SHA-NI: {sha_ni}, {platform.system()} {platform.release()}")
print(f"- sha256 limit (in-memory, sha2 crate): {one_core:.2f} GB/s on one core, {all_cores:.2f} GB/s on all cores")
print("- medians of the runs listed, warm page cache; reproduce with `bash benches/compare.sh`\n")

def tree_bytes(tree):
    try:
        return float(open(os.path.join(work, f"{tree}-x1.tree-bytes")).read())
    except OSError:
        return None


for tree in ("many-small", "large"):
    names = [n for (t, n) in runs if t == tree]
    if not names and not any(t == tree for (t, _) in timeouts):
        continue
    print(f"## {tree}\n")
    print("| contender | runs | median s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for n in names:
        print(f"| {esc(n)} | {len(runs[(tree, n)])} | {med(tree, n):.2f} | {rss(tree, n):.0f} |")
    for (t, n), count in timeouts.items():
        if t == tree and (t, n) not in runs:
            print(f"| {esc(n)} | {count} | timed out | |")
    print()

starts = {k: [s for s, _ in runs.get(("run-start", k), [])] for k in ("cold", "warm")}
if any(starts.values()):
    print("## Time to the first RUN (Debian test image)\n")
    print("| layer cache | runs | median s |")
    print("| --- | ---: | ---: |")
    for k, v in starts.items():
        if v:
            print(f"| {k} | {len(v)} | {statistics.median(v):.3f} |")
    print()
scale = [(s, med(f"scale-x{s}", "kiln hash kiln-v1"), rss(f"scale-x{s}", "kiln hash kiln-v1")) for s in (1, 2, 4)]
if any(t for _, t, _ in scale):
    print("## kiln-v1 on many-small at 1x, 2x and 4x\n")
    print("| scale | files | median s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for s, t, m in scale:
        if t:
            print(f"| {s}x | {200_000 * s:,} | {t:.2f} | {m:.0f} |")
    print()

print("## Targets\n")
print("| target | measured | met |")
print("| --- | --- | :---: |")


def row(text, value, ok):
    print(f"| {esc(text)} | {value} | {'yes' if ok else 'no'} |")


def ratio(tree, a, b):
    x, y = med(tree, a), med(tree, b)
    return (y / x) if x and y else None


V1, TG, CACHE, BUILD = "kiln hash kiln-v1", "kiln hash taskgraph", "kiln hash kiln-v1 --hash-cache (unchanged)", "kiln build (docker-archive, zstd -3 layers)"
PY, SUM, FLOOR, BUILDAH = "taskgraph generate_context_hash", "find | sort | xargs sha256sum | sha256sum", "tar cf - | zstd -T0 -3 (floor)", "buildah build (vfs, chroot, --timestamp 0)"
RF, HF, UF, SF = "floor: open+fstat+read+close", "floor: open+fstat+read+sha256+close", "floor: the same batched (io_uring)", "floor: stat only"
INDEXED = "kiln build, indexed (the default)"
v, f = med("many-small", V1), med("many-small", HF)
if v and f:
    row("kiln-v1, many-small: within 1.1x of the read-and-hash floor", f"{v:.2f} s = {v / f:.2f}x of {f:.2f} s", v <= 1.1 * f)
    row("kiln-v1, many-small, batched syscalls: below that floor", f"{v:.2f} s vs {f:.2f} s", v < f)
r = ratio("many-small", V1, PY)
if r:
    row("kiln-v1, many-small: >= 15x faster than taskgraph", f"{r:.1f}x", r >= 15)
for tree in ("many-small", "large"):
    a, b = med(tree, INDEXED), med(tree, BUILD)
    if a and b:
        row(f"kiln build, {tree}: indexed (default) within 10% of --no-index", f"{a:.2f} s vs {b:.2f} s = {100 * (a / b - 1):+.0f}%", a <= 1.1 * b)
if starts["warm"]:
    w = statistics.median(starts["warm"])
    row("first RUN starts, warm layer cache: < 100 ms", f"{1000 * w:.0f} ms", w < 0.1)
r = ratio("many-small", V1, SUM)
if r:
    row("kiln-v1, many-small: >= 6x faster than the sha256sum pipeline", f"{r:.1f}x", r >= 6)
t, b = med("large", V1), tree_bytes("large")
if t and b:
    rate = b / t / 1e9
    row("kiln-v1, large: >= 90% of the all-core sha256 limit", f"{rate:.2f} GB/s = {100 * rate / all_cores:.0f}%", rate >= 0.9 * all_cores)
r = ratio("large", V1, PY)
if r:
    row("kiln-v1, large: about 2.4x taskgraph on 2 cores", f"{r:.1f}x", r >= 2.2)
r = ratio("many-small", TG, PY)
if r:
    row("taskgraph algorithm, many-small: >= 3x faster than taskgraph", f"{r:.1f}x", r >= 3)
t, b = med("large", TG), tree_bytes("large")
if t and b:
    rate = b / t / 1e9
    row("taskgraph algorithm, large: >= 90% of one core's sha256 speed", f"{rate:.2f} GB/s = {100 * rate / one_core:.0f}%", rate >= 0.9 * one_core)
for tree in ("many-small", "large"):
    r = ratio(tree, BUILD, BUILDAH)
    if r:
        row(f"kiln build, {tree}: >= 20x faster than buildah", f"{r:.1f}x", r >= 20)
    b, f = med(tree, BUILD), med(tree, FLOOR)
    if b and f:
        row(f"kiln build, {tree}: within 1.5x of tar | zstd", f"{b / f:.2f}x", b / f <= 1.5)
t = med("many-small", CACHE)
if t:
    row("--hash-cache, unchanged many-small: <= 0.3 s", f"{t:.2f} s", t <= 0.3)
for tree in ("many-small", "large"):
    peak = max((rss(tr, n) for (tr, n) in runs if tr == tree and n.startswith("kiln")), default=None)
    if peak:
        row(f"peak RSS of every kiln run, {tree}: <= 100 MiB", f"{peak:.0f} MiB", peak <= 100)
m1 = rss("scale-x1", V1) or rss("many-small", V1)
if m1:
    row("peak RSS, kiln-v1 hash of many-small (200k files): <= 64 MiB", f"{m1:.0f} MiB", m1 <= 64)
m4 = rss("scale-x4", V1)
if m1 and m4:
    per = (m4 - m1) * 1024 * 1024 / 600_000
    row("RSS growth from 200k to 800k files: <= 100 bytes per file", f"{per:.0f} bytes", per <= 100)
pts = []
for s in (1, 2, 4):
    t = med(f"scale-x{s}", V1)
    try:
        b = float(open(os.path.join(work, f"scale-x{s}.bytes")).read())
    except OSError:
        b = None
    if t and b:
        pts.append((math.log(b), math.log(t)))
if len(pts) >= 2:
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    row("scaling 1x/2x/4x: fitted exponent <= 1.05", f"{slope:.2f}", slope <= 1.05)
print()

notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS-notes.md")
if os.path.exists(notes):
    print(open(notes).read())
