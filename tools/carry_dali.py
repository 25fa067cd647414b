"""Send DALI to the bare GPU machine in parts: its wheels (about 235 MB) exceed the 64 MiB one call may carry.

Here, once (downloads the wheels for the GPU machine's Python 3.12 into .dali/, git-ignored, then cuts them):
    python tools/carry_dali.py pack
Then consecutive device calls while the machine stays warm (it is released after ~30 s idle; files outside the
work tree, in /tmp/kdpipe-dali, survive between calls only while it stays up):
    run(command="python3 tools/carry_dali.py receive 0", carry=[".dali/part-0", ".dali/bundle.json"])
    ... one call per part ...
    run(command="python3 tools/carry_dali.py install && GPU_PYTEST=1 bash tools/gpu_check.sh --only decode,dali",
        carry=[".whl"])
`install` checks every part and every wheel against the sha256 recorded at pack time, writes the wheels under the
names recorded then (never names read from the parts) and pip-installs them into /tmp/kdpipe-site, the directory
tools/gpu_check.sh puts on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKED = ROOT / ".dali"
LANDING = Path("/tmp/kdpipe-dali")
SITE = Path("/tmp/kdpipe-site")
PART_BYTES = 60 << 20  # one part + the work tree stays under a call's 64 MiB
# DALI 2.4 for CUDA 13 and what it needs that the GPU machine lacks (nvImageCodec travels in .whl/)
WHEELS = ["nvidia-dali-cuda130==2.4.0", "nvidia-libnvcomp-cu13", "astunparse", "gast", "libcst", "makefun", "nvtx",
          "optree", "six"]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.whl$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(dest: Path) -> list[Path]:
    plat = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                        "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(dest), *WHEELS],
                   check=True)
    return sorted(dest.glob("*.whl"))


def pack(wheels: list[Path], out: Path, part_bytes: int = PART_BYTES) -> dict:
    """The wheels as one byte stream cut into parts, and bundle.json: each wheel's name, offset, size and
    sha256, and each part's sha256."""
    out.mkdir(parents=True, exist_ok=True)
    blob, entries = bytearray(), []
    for w in wheels:
        if not SAFE_NAME.match(w.name):
            raise SystemExit(f"{w}: not a wheel name this script will write")
        data = w.read_bytes()
        entries.append({"name": w.name, "offset": len(blob), "size": len(data), "sha256": sha256(data)})
        blob += data
    parts = []
    for k, start in enumerate(range(0, len(blob), part_bytes)):
        chunk = bytes(blob[start:start + part_bytes])
        (out / f"part-{k}").write_bytes(chunk)
        parts.append({"name": f"part-{k}", "sha256": sha256(chunk)})
    bundle = {"wheels": entries, "parts": parts}
    (out / "bundle.json").write_text(json.dumps(bundle, indent=1))
    return bundle


def receive(k: int, src: Path = PACKED, landing: Path = LANDING) -> None:
    """Keep part k (and the bundle description) outside the work tree, which the next call replaces."""
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / f"part-{k}", landing / f"part-{k}")
    if (src / "bundle.json").is_file():
        shutil.copyfile(src / "bundle.json", landing / "bundle.json")
    print(f"part {k}: {(landing / f'part-{k}').stat().st_size} bytes in {landing}")


def assemble(landing: Path = LANDING) -> list[Path]:
    """The wheels rebuilt from the received parts, each checked against its sha256; a clear SystemExit otherwise."""
    bundle = json.loads((landing / "bundle.json").read_text())
    blob = bytearray()
    for part in bundle["parts"]:
        path = landing / part["name"]
        if not path.is_file():
            raise SystemExit(f"{path} missing: send it with `receive` first (parts: {len(bundle['parts'])})")
        data = path.read_bytes()
        if sha256(data) != part["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from the one recorded at pack time; send it again")
        blob += data
    out = landing / "wheels"
    out.mkdir(exist_ok=True)
    wheels = []
    for w in bundle["wheels"]:
        if not SAFE_NAME.match(w["name"]):
            raise SystemExit(f"bundle.json names {w['name']!r}: not a wheel name this script will write")
        data = bytes(blob[w["offset"]:w["offset"] + w["size"]])
        if sha256(data) != w["sha256"]:
            raise SystemExit(f"{w['name']}: sha256 differs after reassembly")
        (out / w["name"]).write_bytes(data)
        wheels.append(out / w["name"])
    return wheels


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("pack")
    r = sub.add_parser("receive")
    r.add_argument("part", type=int)
    sub.add_parser("install")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        bundle = pack(download(PACKED / "wheels"), PACKED)
        shutil.rmtree(PACKED / "wheels")  # the parts hold them
        sizes = sum(w["size"] for w in bundle["wheels"])
        print(f"{len(bundle['wheels'])} wheels, {sizes / 2**20:.0f} MiB in {len(bundle['parts'])} parts under {PACKED}")
    elif args.cmd == "receive":
        receive(args.part)
    else:
        wheels = assemble()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)], check=True)
        print(f"installed {len(wheels)} wheels into {SITE}")


if __name__ == "__main__":
    main()
