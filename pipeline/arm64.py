"""The Raspberry Pi's own TFLite runtimes on this x86 machine: Debian 12 arm64 under QEMU user-mode emulation.

:func:`setup_arm64` (``edgepipe setup-arm64``) builds, once, from Debian's and PyPI's packages only::

    <cache>/arm64/<key>/
      root/              Debian 12 "bookworm" arm64, what Raspberry Pi OS Bookworm is built on (python3 3.11,
                         glibc 2.36), unpacked by ``mmdebstrap --variant=extract``: no arm64 program runs
        opt/site-tflite  the Pi's wheels, chosen and unpacked by this machine's pip: tflite-runtime 2.14.0
        opt/site-litert  and numpy 1.26.4 (it needs numpy < 2); ai-edge-litert 2.3.0 with numpy 2.x
      cpu/<model>/       what QEMU sees as ``/`` for one emulated CPU: root's folders (relative links) and the
                         Pi's ``/proc/cpuinfo``
      stamp.json         the recipe and what the emulated Python reported; written last
      requirements/      the pinned, hashed pip requirements each site was installed from
      debian-packages.txt  the .deb files unpacked (their versions are in the stamp too)

``<key>`` names the recipe (:data:`RECIPE`): a changed pin is a new folder, built beside the old one (then
removed). The whole folder is built under a temporary name and renamed into place, so a killed set-up
leaves nothing half-made; the next one removes its leftovers.

:func:`python_command` is how a process runs there: ``qemu-aarch64-static -L cpu/<model>
root/usr/bin/python3.11`` with ``QEMU_CPU`` set and a clean environment; no binfmt, chroot or mount. ``-L``
makes QEMU look up each absolute path in the tree first and fall back to the host's where the tree lacks
it: the emulated Python reads this repository and verify's feed files in /tmp as they are, and a file it
creates outside the tree's folders is created on the host. So it never writes bytecode (Python's
``__pycache__`` would land in the host's /usr/lib/python3.11), and the tree's bytecode is compiled here at
set-up. An arm64 process cannot exec another arm64 program this way: one process per job.

Traps measured here (``shared/notes/arm64-emulation.md``):

- ``QEMU_CPU`` is always a Pi's CPU. QEMU 7.2's default ``max`` made ai-edge-litert's int8 kernels give
  wrong answers (3 % accuracy instead of 97 %) and float ten times slower.
- QEMU 7.2 shows the host's x86 ``/proc/cpuinfo``, and ai-edge-litert's CPU detection segfaults in
  ``Interpreter()`` on it; ``cpu/<model>/proc/cpuinfo`` is what a Pi shows, so it reads that instead.
- Host variables (``PYTHON*``, ``PIP_*``) would leak into the emulated process: its environment is built,
  not inherited.

What matches a Pi: the Debian packages, the wheels, the instruction-set features (QEMU's CPU model) and the
CPU id the kernels read. What does not: core count, timing, caches; not checked against a physical Pi.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from pipeline.console import log
from pipeline.errors import FetchError, PipelineError, disk_error, one_line
from pipeline.rundir import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.types import Runtime

SETUP_COMMAND = "edgepipe setup-arm64"
STAMP = "stamp.json"
QEMU = "qemu-aarch64-static"
PYTHON = "/usr/bin/python3.11"  # inside the tree
REPO_ROOT = Path(__file__).resolve().parents[1]  # on the emulated PYTHONPATH: the worker is pipeline.runners.tflite

SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
DEBIAN_PACKAGES = ("python3", "libstdc++6", "libgcc-s1")  # the wheels' C++ runtime
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# The host's commands and the Debian package each comes in.
HOST_TOOLS = {QEMU: "qemu-user-static", "mmdebstrap": "mmdebstrap"}
# The tree's folders the emulated process sees as the host's: devices, /proc (but cpuinfo), temporary files.
HOST_FOLDERS = frozenset({"dev", "proc", "sys", "run", "tmp"})
# Wheel tags pip may choose for the tree's glibc 2.36 (pip does not widen one --platform to older glibcs).
PLATFORMS = tuple(f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)) + ("manylinux2014_aarch64",)


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel, by the sha256 of its aarch64 (or pure-Python) file on PyPI."""

    name: str
    version: str
    sha256: str

    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Site:
    """One runtime's own site folder in the tree (the two need different numpy majors).

    Attributes:
        folder: the folder as the emulated process sees it (first on its PYTHONPATH).
        wheels: every wheel installed there, dependencies included (pip checks the list is whole).
    """

    runtime: Runtime
    folder: str
    wheel: str
    wheels: tuple[Wheel, ...]


SITES: dict[Runtime, Site] = {site.runtime: site for site in (
    Site(Runtime.TFLITE_RUNTIME_ARM64, "/opt/site-tflite", "tflite-runtime", (
        Wheel("tflite-runtime", "2.14.0", "ce9fa5d770a9725c746dcbf6f59f3178233b3759f09982e8b2db8d2234c333b0"),
        Wheel("numpy", "1.26.4", "7ab55401287bfec946ced39700c053796e7cc0e3acbef09993a9ad2adba6ca6e"),
        # The deploy bundle's classify.py decodes with Pillow: its own requirements.txt, installed as a Pi user would.
        Wheel("pillow", "11.3.0", "643f189248837533073c405ec2f0bb250ba54598cf80e8c1e043381a60632f58"),
    )),
    Site(Runtime.LITERT_ARM64, "/opt/site-litert", "ai-edge-litert", (
        Wheel("ai-edge-litert", "2.3.0", "853fc608f96da87bd5f3458465dfb9abbf18d5ae6b94eceacead407146f175ae"),
        Wheel("numpy", "2.4.6", "0ab0a9c4ffb1a6d95ef519fe4247dba8eb6b18ad93999f76b7f657039acabd47"),
        Wheel("ml-dtypes", "0.7.0", "7c094b42cb01f21e37e602a5cfe502ddaf6b5c60f66a162fd1e61f9a586558cb"),
        Wheel("flatbuffers", "25.12.19", "7634f50c427838bb021c2d66a3d1168e9d199b0607e6329399f04846d42e20b4"),
        Wheel("protobuf", "7.36.2", "e11e1f0180583a2af89db6a2ecd9e8dc40aa6d2988ca175bfd0e6d12ea72d74e"),
        Wheel("tqdm", "4.70.1", "c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73"),
        Wheel("typing-extensions", "4.16.0", "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8"),
        Wheel("backports-strenum", "1.2.8", "fc297cb26971f7d5e15a478a06a78575197f81daea47975771b1aae996dcccf4"),
    )),
)}


@dataclass(frozen=True)
class Cpu:
    """A Pi's CPU: the model QEMU emulates (``QEMU_CPU``) and the ``/proc/cpuinfo`` that Pi shows.

    Attributes:
        part, variant, revision: the MIDR fields ai-edge-litert's CPU detection reads.
        features: the Features line of the Pi's kernel (the kernels themselves see QEMU's hwcaps).
        cores: processor entries (a Pi has 4; the host's core count is what runs them).
    """

    name: str
    board: str
    part: int
    variant: int
    revision: int
    features: str
    board_revision: str
    cores: int = 4

    def cpuinfo(self) -> str:
        cores = "".join(
            f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {self.features}\nCPU implementer\t: 0x41\n"
            f"CPU architecture: 8\nCPU variant\t: {self.variant:#x}\nCPU part\t: {self.part:#05x}\n"
            f"CPU revision\t: {self.revision}\n\n" for i in range(self.cores))
        return f"{cores}Revision\t: {self.board_revision}\nModel\t\t: {self.board}\n"


CPUS: dict[str, Cpu] = {cpu.name: cpu for cpu in (
    Cpu("cortex-a72", "Raspberry Pi 4 Model B Rev 1.4", 0xd08, 0x0, 3, "fp asimd evtstrm crc32 cpuid", "c03114"),
    Cpu("cortex-a76", "Raspberry Pi 5 Model B Rev 1.0", 0xd0b, 0x4, 1,
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
        "c04170"),
)}
DEFAULT_CPU = "cortex-a72"

# Everything a set-up is made from; its hash names the folder. FORMAT changes with the layout.
FORMAT = 1
RECIPE = {
    "format": FORMAT, "suite": SUITE, "sources": list(DEBIAN_SOURCES), "packages": list(DEBIAN_PACKAGES),
    "sites": {str(rt): {"folder": site.folder, "wheels": [asdict(w) for w in site.wheels]}
              for rt, site in SITES.items()},
    "cpus": {name: cpu.cpuinfo() for name, cpu in CPUS.items()},
}
KEY = f"{SUITE}-{hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]}"


class NotSetUp(PipelineError):
    """The arm64 runtimes are not set up in this cache, or QEMU is missing.

    Attributes:
        detail: what is missing, without the command that sets it up (for ``edgepipe runtimes``).
    """

    def __init__(self, detail: str, fix: str | None = f"run `{SETUP_COMMAND}`"):
        super().__init__(f"{detail}: {fix}" if fix else detail)
        self.detail = detail


@dataclass(frozen=True)
class Installation:
    """A finished set-up, as its stamp records it.

    Attributes:
        path: ``<cache>/arm64/<key>``.
        python: the emulated Python's version (``3.11.2``).
        runtimes: per runtime, what its emulated Python imported: ``runtime_version`` and ``numpy``.
        debian: every Debian package in the tree and its version.
    """

    path: Path
    python: str
    runtimes: dict[str, dict[str, str]]
    debian: dict[str, str]

    @property
    def root(self) -> Path:
        """The Debian tree, with the sites in ``root/opt``."""
        return self.path / "root"

    def describe(self, runtime: Runtime, cpu: str) -> str:
        """``tflite-runtime 2.14.0, numpy 1.26.4, Python 3.11.2 on emulated cortex-a72 (QEMU 7.2.22)``."""
        found = self.runtimes[str(runtime)]
        return (f"{SITES[runtime].wheel} {found['runtime_version']}, numpy {found['numpy']}, Python {self.python} "
                f"on emulated {cpu} (QEMU {qemu_version() or 'missing'})")


def arm64_dir(cache_dir: Path | str | None = None) -> Path:
    """``<cache>/arm64``: every set-up's folder, its lock and its log."""
    if cache_dir is None:
        from pipeline.fetch import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "arm64"


def installation(cache_dir: Path | str | None = None) -> Installation | None:
    """The finished set-up of this recipe in the cache, or None (a stamp read: fast)."""
    path = arm64_dir(cache_dir) / KEY
    try:
        stamp = json.loads((path / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stamp.get("recipe") != RECIPE:
        return None
    return Installation(path, stamp["python"], stamp["runtimes"], stamp["debian"])


@lru_cache(maxsize=1)
def _qemu_version(qemu: str) -> str | None:
    try:
        first = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return None
    # "qemu-aarch64 version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"
    words = first.split()
    return words[words.index("version") + 1] if "version" in words[:-1] else None


def qemu_version() -> str | None:
    """The host's qemu-aarch64-static version (``7.2.22``), or None when it is not installed."""
    qemu = shutil.which(QEMU)
    return _qemu_version(qemu) if qemu else None


def status(runtime: Runtime, cpu: str = DEFAULT_CPU, cache_dir: Path | str | None = None) -> dict:
    """Whether ``runtime`` can run on the emulated ``cpu`` here.

    Returns:
        ``ready``, ``version`` (what runs it), ``detail`` (why it is not ready) and ``setup`` (the command
        that sets it up): the fields of :class:`pipeline.runners.base.RuntimeStatus`.
    """
    try:
        found = _ready(cpu, cache_dir)
    except NotSetUp as err:
        return {"ready": False, "version": "", "detail": err.detail, "setup": SETUP_COMMAND}
    return {"ready": True, "version": found.describe(runtime, cpu), "detail": "", "setup": SETUP_COMMAND}


def _ready(cpu: str, cache_dir: Path | str | None) -> Installation:
    if cpu not in CPUS:
        raise NotSetUp(f"no emulated CPU {cpu!r}", f"use {' or '.join(CPUS)}")
    found = installation(cache_dir)
    if found is None:
        raise NotSetUp(f"the arm64 runtimes are not set up in {arm64_dir(cache_dir)}")
    if not shutil.which(QEMU):
        raise NotSetUp(f"{QEMU} is missing (Debian package qemu-user-static)")
    return found


def python_command(runtime: Runtime, cpu: str = DEFAULT_CPU,
                   cache_dir: Path | str | None = None) -> tuple[list[str], dict[str, str]]:
    """How to run the emulated Python of ``runtime`` on ``cpu``: the argv prefix (``[qemu, -L, ..., python,
    -S]``; append ``-m module`` or a script) and its whole environment.

    The environment is built, not inherited: ``QEMU_CPU``, ``PYTHONPATH`` = the runtime's site folder and
    this repository (paths as the emulated process sees them), no bytecode writes, and the host's
    ``EDGEPIPE_TEST_*`` hooks (:mod:`pipeline.testhook`). ``-S`` leaves out the tree's site-packages.

    Raises:
        NotSetUp: not set up in this cache, QEMU missing, an unknown CPU, or this repository hidden by a
            folder of the tree at the same path.
    """
    found = _ready(cpu, cache_dir)
    return _command(found.path, runtime, cpu)


def _command(path: Path, runtime: Runtime, cpu: str) -> tuple[list[str], dict[str, str]]:
    cpu_root = path / "cpu" / cpu
    if (cpu_root / REPO_ROOT.relative_to("/")).exists():
        # QEMU would list the tree's folder instead of the host's, and Python would not find `pipeline`.
        raise NotSetUp(f"{REPO_ROOT} also exists in the arm64 tree {cpu_root}, which hides it from the emulated "
                       f"Python", "install edgepipe elsewhere")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "QEMU_CPU": cpu, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONNOUSERSITE": "1", "PYTHONPATH": f"{SITES[runtime].folder}:{REPO_ROOT}",
           **{k: v for k, v in os.environ.items() if k.startswith("EDGEPIPE_TEST_")}}
    qemu = shutil.which(QEMU) or QEMU
    return [qemu, "-L", str(cpu_root), str(path / "root" / PYTHON.lstrip("/")), "-S"], env


# --- set-up ----------------------------------------------------------------------------------------


def setup_arm64(cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """Sets up the Pi's TFLite runtimes under QEMU in ``<cache>/arm64/<key>`` (see the module's docstring);
    returns at once when this recipe is set up already.

    Installs ``qemu-user-static`` and ``mmdebstrap`` with apt-get when missing (that needs root); needs the
    Debian archive and PyPI (about 70 MB of downloads; about 280 MB on disk).

    Args:
        cache_dir: the cache (default :func:`pipeline.fetch.default_cache_dir`).
        progress: say each step on the console.

    Returns:
        The set-up's folder.

    Raises:
        PipelineError: a host tool is missing and this is not root, or no apt-get; a full or read-only disk.
        FetchError: apt-get, mmdebstrap or pip failed (the message names the log with their output).
    """
    found = installation(cache_dir)
    if found is not None:
        return found.path
    base = arm64_dir(cache_dir)
    say = log.info if progress else (lambda _msg: None)
    try:
        base.mkdir(parents=True, exist_ok=True)
        with _locked(base / ".lock"):
            found = installation(cache_dir)  # another process finished it while this one waited
            if found is not None:
                return found.path
            return _build(base, say)
    except OSError as err:
        raise disk_error(err, str(base)) or err


def _build(base: Path, say) -> Path:
    start = time.monotonic()
    logfile = base / "setup.log"
    for leftover in base.glob(".*.tmp"):  # a set-up killed before its rename
        shutil.rmtree(leftover, ignore_errors=True)
    with open(logfile, "w", encoding="utf-8") as out:
        _host_tools(out, say)
        with atomic_dir(base / KEY) as tmp:
            debian = _debian_tree(tmp, out, say)
            for site in SITES.values():
                _install_wheels(tmp, site, out, say)
            say("arm64: compiling the tree's Python bytecode")
            # This Python is 3.11 too (pyproject), and bytecode is the same on every machine of one minor
            # version; the emulated Python cannot write its own (see the module's docstring).
            _run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(tmp / "root"), "-p", "/",
                  str(tmp / "root/usr/lib/python3.11"), str(tmp / "root/opt")], "compileall", out)
            _cpu_roots(tmp)
            say("arm64: checking each runtime under emulation")
            runtimes = {str(rt): _smoke_test(tmp, rt, out) for rt in SITES}
            python = {info.pop("python") for info in runtimes.values()}.pop()
            seconds = round(time.monotonic() - start, 1)
            atomic_write_json(tmp / STAMP, {"recipe": RECIPE, "key": KEY, "python": python, "runtimes": runtimes,
                                            "debian": debian, "qemu": qemu_version(), "seconds": seconds})
    for old in base.iterdir():  # set-ups of other recipes (older edgepipe pins)
        if old.is_dir() and old.name.startswith(f"{SUITE}-") and old.name != KEY:
            shutil.rmtree(old, ignore_errors=True)
    say(f"arm64: ready in {base / KEY} ({seconds:g} s)")
    return base / KEY


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One set-up at a time per cache (the lock file stays; flock ends with the process)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _host_tools(out, say) -> None:
    """apt-get installs the host's missing tools, or the error says which to install."""
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if not DEBIAN_KEYRING.exists():
        missing.append("debian-archive-keyring")
    if not missing:
        return
    command = f"apt-get install {' '.join(missing)}"
    if shutil.which("apt-get") is None:
        raise PipelineError(f"{SETUP_COMMAND} needs the Debian packages {', '.join(missing)} and there is no "
                            f"apt-get here: install them (a Debian or Ubuntu machine has them)")
    if os.geteuid() != 0:
        raise PipelineError(f"{SETUP_COMMAND} needs {', '.join(missing)}: run `sudo {command}` first "
                            f"(or run {SETUP_COMMAND} as root)")
    say(f"arm64: {command}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], "apt-get update", out, env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], command, out, env=env)


def _debian_tree(tmp: Path, out, say) -> dict[str, str]:
    """Unpacks Debian arm64 into ``tmp/root``; returns its packages' versions (from the .deb names)."""
    say(f"arm64: Debian {SUITE} arm64 ({', '.join(DEBIAN_PACKAGES)}) from deb.debian.org")
    (tmp / "root").mkdir()
    listing = tmp / "debian-packages.txt"
    # --skip=check/qemu: without binfmt mmdebstrap's own check fails, and extract runs nothing arm64.
    _run(["mmdebstrap", "--variant=extract", "--architectures=arm64", "--skip=check/qemu",
          f"--include={','.join(DEBIAN_PACKAGES)}",
          f"--extract-hook=ls \"$1\"/var/cache/apt/archives > {shlex.quote(str(listing))}",
          SUITE, str(tmp / "root"), *DEBIAN_SOURCES], "mmdebstrap (Debian's archive at deb.debian.org)", out)
    versions = {}
    for name in listing.read_text().split():
        if name.endswith(".deb"):
            package, version, _arch = name[:-4].split("_")
            versions[package] = version.replace("%3a", ":")
    return versions


def _install_wheels(tmp: Path, site: Site, out, say) -> None:
    say(f"arm64: {', '.join(f'{w.name} {w.version}' for w in site.wheels[:2])} (aarch64 wheels from PyPI)")
    requirements = tmp / "requirements" / f"{site.runtime}.txt"
    requirements.parent.mkdir(exist_ok=True)
    atomic_write_text(requirements, "".join(w.requirement() + "\n" for w in site.wheels))
    platforms = [arg for tag in PLATFORMS for arg in ("--platform", tag)]
    # The host's pip picks and unpacks the Pi's wheels without running them; bytecode is compiled after.
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-compile",
          "--only-binary=:all:", *platforms, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          "--require-hashes", "--target", str(tmp / "root" / site.folder.lstrip("/")), "-r", str(requirements)],
         f"pip install of {site.wheel}'s aarch64 wheels (PyPI)", out)


def _cpu_roots(tmp: Path) -> None:
    for cpu in CPUS.values():
        cpu_root = tmp / "cpu" / cpu.name
        (cpu_root / "proc").mkdir(parents=True)
        for entry in sorted((tmp / "root").iterdir()):
            if entry.name not in HOST_FOLDERS:
                os.symlink(Path("../../root") / entry.name, cpu_root / entry.name)
        (cpu_root / "proc" / "cpuinfo").write_text(cpu.cpuinfo())


_SMOKE = "import json, pipeline.runners.tflite as t; print(json.dumps(t.runtime_info({!r})))"


def _smoke_test(tmp: Path, runtime: Runtime, out) -> dict[str, str]:
    """What the emulated Python says of ``runtime``: it imports, and it is aarch64."""
    argv, env = _command(tmp, runtime, DEFAULT_CPU)
    text = _run([*argv, "-c", _SMOKE.format(str(runtime))], f"the emulated Python of {runtime}", out, env=env,
                capture=True)
    info = json.loads(text.strip().splitlines()[-1])
    if info.get("machine") != "aarch64":
        raise FetchError(f"the emulated Python of {runtime} says it runs on {info.get('machine')}, not aarch64")
    return {k: info[k] for k in ("python", "runtime_version", "numpy")}


def _run(argv: list[str], what: str, out, env: dict | None = None, capture: bool = False) -> str:
    """Runs one set-up step, its output appended to the set-up's log (returns its stdout with ``capture``).

    Raises:
        FetchError: it failed: its most telling line, and where the log is.
    """
    out.write(f"$ {shlex.join(argv)}\n")
    out.flush()
    start = os.path.getsize(out.name)
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE if capture else out, stderr=out, env=env, text=True)
    except OSError as err:
        raise FetchError(f"{what}: cannot run {argv[0]}: {one_line(err)}") from None
    out.flush()
    if proc.returncode != 0:
        with open(out.name, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        raise FetchError(f"{what} failed (exit status {proc.returncode}): {_telling(output)}; "
                         f"full output in {out.name}")
    return proc.stdout or ""


def _telling(output: str) -> str:
    """The last error line of apt, mmdebstrap or pip (``E:``, ``ERROR:``), else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:", "Error")) or "Error:" in ln]
    return one_line((errors or lines or ["no output"])[-1], 240)
