#!/usr/bin/env python3
"""The instruction mix of a kernel's main loop in the SASS that ptxas makes of kernels.cu: a
static measure of a compute-bound kernel's cost that needs no GPU. The flash attention loop is
bound by instructions issued (each warp issues one a cycle per scheduler, an mma.m16n8k16 keeps
the tensor cores busy for a few), so fewer instructions per HMMA means a faster kernel.

    . ../shared/gpu/env.sh   # CUDA_PIP_ROOT, after setup-cuda13.sh
    pip install nvidia-cuda-nvdisasm   # into $CUDA_VENV: the disassembler, into $CUDA_PIP_ROOT/bin
    python3 tools/gpu/sass_loop.py flash_attention_f16_40 flash_attention_f16_64 --steady

--steady counts the flash kernels' steady state: the aligned (cp.async) load path and a tile of
keys without masking, by fixing those two branches in a copy of the source; without it the loop
holds both load paths and the last tile's masking, of which a tile runs one path and no mask.
"""
import argparse, collections, re, subprocess, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nvrtc_check import ROOT, assemble, cuda_root  # noqa: E402

STEADY = [("    if (vec) {\n", "    if (1) {\n"), ("        if (k0 + FA_KEYS > tk)\n", "        if (0)\n")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", nargs="+", help="entry points, e.g. flash_attention_f16_40")
    ap.add_argument("--steady", action="store_true", help="the flash kernels' steady state (see above)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--source", default=str(ROOT / "src/gpu_ops/kernels.cu"))
    a = ap.parse_args()
    src = Path(a.source).read_text()
    if a.steady:
        for old, new in STEADY:
            if old not in src:
                sys.exit(f"--steady: {old.strip()!r} is no longer in {a.source}; update STEADY")
            src = src.replace(old, new)
    nvdisasm = cuda_root() / "bin/nvdisasm"
    if not nvdisasm.exists():
        sys.exit(f"no {nvdisasm}: pip install nvidia-cuda-nvdisasm into the CUDA venv")
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        # --steady's fixed branches leave the other paths' loops unreachable: no warnings.
        opts = [b"-arch=compute_80"] + ([b"-diag-suppress=128"] if a.steady else [])
        assemble(src.encode(), opts, a.arch, cubin)
        sass = subprocess.run([str(nvdisasm), "-c", "-g", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    for k in a.kernels:
        report(sass, k)


def report(sass, kernel):
    m = re.search(r"\.text\.%s:\n(.*?)(?=\n\s*\.section|\Z)" % re.escape(kernel), sass, re.S)
    if not m:
        sys.exit(f"no kernel {kernel} in the SASS")
    ops, labels = [], {}
    for line in m.group(1).splitlines():
        if lm := re.match(r"\s*(\.L_\w+):", line):
            labels[lm.group(1)] = len(ops)
        elif im := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*)", line):
            ops.append((im.group(1).split(".")[0], im.group(2)))
    # The largest loop: the span from a label to the furthest branch back to it.
    loops = []
    for i, (op, rest) in enumerate(ops):
        target = re.search(r"(\.L_\w+)", rest)
        if op == "BRA" and target and labels.get(target.group(1), i + 1) <= i:
            loops.append((i - labels[target.group(1)] + 1, labels[target.group(1)], i))
    if not loops:
        sys.exit(f"{kernel} has no loop")
    n, start, end = max(loops)
    mix = collections.Counter(op for op, _ in ops[start:end + 1])
    hmma = mix.get("HMMA", 0)
    per = f", {n / hmma:.1f} per HMMA" if hmma else ""
    print(f"{kernel}: {len(ops)} instructions, main loop {n}{per}")
    print("  " + ", ".join(f"{op} {c}" for op, c in mix.most_common(16)))


if __name__ == "__main__":
    main()
