"""Download, for CPython 3.12 manylinux x86_64, the wheels of every requirement of `wheel` that the GPU image lacks
(scripts/build_gpu_wheelhouse.sh runs this).

A walk over Requires-Dist, not a resolver run: a requirement the image already holds is not followed (its own
dependencies are the image's business, and following torch would drag in CUDA), unless it is named in --carry
(held, but too old). Each package is taken at this environment's version (pip freeze: the versions the tests ran
with) where that satisfies every requirer, else at the newest that does.

    python scripts/gpu_wheelhouse.py --wheel dist/kvcore_eval-0.1.0-py3-none-any.whl --image "numpy torch ..."
        --carry transformers --find-links WORK/wheels --dest WORK/out
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    *(
        arg
        for tag in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
        )
        for arg in ("--platform", tag)
    ),
]
GPU_ENVIRONMENT = {  # marker variables of the GPU machine
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_of(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    found = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in found if r.marker is None or r.marker.evaluate(GPU_ENVIRONMENT)]


def download(specs: list[str], dest: Path, find_links: Path) -> dict[str, Path]:
    """One pip call for a whole level of the walk: name -> the wheel it saved."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "--find-links", str(find_links)]
        + ["-d", str(dest), *specs],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    wheels = {normal(w.name.split("-")[0]): w for w in dest.glob("*.whl")}
    return {normal(Requirement(spec).name): wheels[normal(Requirement(spec).name)] for spec in specs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", required=True, type=Path)
    parser.add_argument("--image", required=True, help="names of the packages the GPU image holds")
    parser.add_argument("--carry", default="", help="names held by the image that must be carried anyway")
    parser.add_argument("--find-links", required=True, type=Path, help="locally built wheels (source-only packages)")
    parser.add_argument("--dest", required=True, type=Path)
    args = parser.parse_args()
    image = {normal(n) for n in args.image.split()}
    carry = {normal(n) for n in args.carry.split()}
    tested = {normal(d.metadata["Name"]): d.version for d in distributions()}
    chosen: dict[str, str] = {}  # name -> version
    level = [(r, "kvcore-eval") for r in requirements_of(args.wheel)]
    while level:
        needs: dict[str, list[tuple[Requirement, str]]] = {}  # this level's packages not chosen yet -> requirers
        for requirement, requirer in level:
            name = normal(requirement.name)
            if name in image and name not in carry:
                continue
            if name in chosen:
                check(requirement, requirer, chosen[name])
            else:
                needs.setdefault(name, []).append((requirement, requirer))
        if not needs:
            break
        specs = []
        for name, requirers in needs.items():
            specifier = requirers[0][0].specifier
            for requirement, _ in requirers[1:]:
                specifier &= requirement.specifier
            local = tested.get(name)
            specs.append(f"{name}=={local}" if local and specifier.contains(local) else f"{name}{specifier}")
        wheels = download(specs, args.dest, args.find_links)
        level = []
        for name, requirers in needs.items():
            version = wheels[name].name.split("-")[1]
            Version(version)  # a wheel's name holds a valid version
            chosen[name] = version
            note = "tested here" if tested.get(name) == version else "newest that fits: not tested here"
            print(f"  {name}=={version}  (for {', '.join(sorted({r for _, r in requirers}))}; {note})")
            level.extend((r, name) for r in requirements_of(wheels[name]))


def check(requirement: Requirement, requirer: str, version: str) -> None:
    if not requirement.specifier.contains(version, prereleases=True):
        raise SystemExit(f"{requirer} needs {requirement}, but {version} was chosen for another package")


if __name__ == "__main__":
    main()
