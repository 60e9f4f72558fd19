"""A folder a Raspberry Pi user copies and runs: the model, its contract and a script that follows it.

:func:`write_pi_bundle` writes::

    <out>/
      <name>.tflite        the model, its file name kept (float32.tflite, int8.tflite, ...)
      labels.txt           class names in output order
      preprocessing.json   the contract (pipeline.metadata.preprocessing_contract) and the file's
                           input quantisation, when its input is an integer
      classify.py          pipeline/deploy_classify.py, unchanged: one TFLite runtime, numpy, Pillow
      golden/              the run's golden self-test images (pipeline/golden.py), when given
      requirements.txt     pinned for Raspberry Pi OS Bookworm 64-bit (Python 3.11, aarch64)
      README.md            three commands: copy, install, self-test and classify
      bundle.json          where the model came from, the self-test's tolerance, every file's sha256

``classify.py --self-test`` compares the model's answers on the golden images with the float32
reference's (``golden.json``), with a tolerance that depends on how the file is quantised
(:data:`SELF_TEST_TOLERANCE`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

from pipeline.errors import ConfigError
from pipeline.rundir import atomic_dir, sha256_file
from pipeline.version import __version__

CLASSIFY_TEMPLATE = Path(__file__).with_name("deploy_classify.py")
BUNDLE_FILE = "bundle.json"
GOLDEN_DIR = "golden"

# Every wheel has a cp311 aarch64 build on PyPI that installs on Bookworm (glibc 2.36):
# tflite_runtime 2.14.0 manylinux_2_34, numpy 1.26.4 manylinux2014 (tflite-runtime needs numpy < 2),
# pillow 11.3.0 manylinux_2_28. edgepipe itself moved to Pillow 12.3.0 (Apache Beam 2.77 needs
# >= 12.1.1); the Pi keeps 11.3.0, whose wheel tests/test_deploy.py checks decodes every kind of photo
# to the same pixels as edgepipe's decoder under emulation. There is no 32-bit (armv7l) wheel of
# tflite-runtime 2.14: the bundle needs the 64-bit Raspberry Pi OS.
PI_REQUIREMENTS = {"tflite-runtime": "2.14.0", "numpy": "1.26.4", "pillow": "11.3.0"}

# Largest |probability - golden.json's| the self-test accepts, by the file's quantisation (told
# from its tensors by pipeline.formats.read_card). The golden values are the float32 SavedModel's, so
# the budget is the file's own drift from them plus the Pi's runtime's from this machine's. Measured
# on a MobileNet v1 0.25 128 run (8 flowers classes): drift on its 5 golden images (x86 tflite-runtime)
# float32 1e-4, float16 4e-4, dynamic 0.016, int16x8 0.028, int8 0.028; the bundle's classify.py under
# QEMU (Cortex-A72, the bundle's own wheels) against x86 on the 160 test photos, largest |Δp|: float32
# 2e-6, float16 and int8-uint8 0, int16x8 8e-4, dynamic 0.022, int8 0.09 (top-1 158 of 160: the aarch64 and x86 int8
# kernels differ, see shared/notes/arm64-emulation.md). About the sum, with room.
SELF_TEST_TOLERANCE = {
    "tflite-float32": 0.001,
    "tflite-float16": 0.01,
    "tflite-dynamic": 0.1,
    "tflite-int16x8": 0.1,
    "tflite-int8": 0.15,
    "tflite-int8-int8": 0.15,
    "tflite-int8-uint8": 0.15,
}


def _problems(tflite: Path, labels: Sequence[str], contract: dict, golden_dir: Path | None, out: Path,
              card) -> list[str]:
    problems = []
    if not labels:
        problems.append("no labels")
    if card.classes is not None and labels and len(labels) != card.classes:
        problems.append(f"{len(labels)} labels for the {card.classes} outputs of {tflite.name}")
    size = contract.get("size")
    if not isinstance(size, int) or size < 1:
        problems.append(f"the contract's size {size!r} is not a positive whole number")
    elif card.input.shape is not None and tuple(card.input.shape[1:3]) != (size, size):
        problems.append(f"{tflite.name} takes {card.input.shape} images; the contract says {size}x{size}")
    if contract.get("resize_method", "bilinear") != "bilinear" or contract.get("antialias"):
        problems.append("classify.py resizes bilinear without antialias; the contract says "
                        f"{contract.get('resize_method')!r}, antialias {contract.get('antialias')}")
    if contract.get("channel_order", "RGB") != "RGB":
        problems.append(f"classify.py feeds RGB; the contract says {contract.get('channel_order')!r}")
    if golden_dir is not None:
        spec_path = Path(golden_dir) / "golden.json"
        if not spec_path.is_file():
            problems.append(f"{golden_dir}: no golden.json (the quantize stage's golden/ folder)")
        else:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
            if spec.get("labels") != list(labels):
                problems.append(f"{spec_path}: labels {spec.get('labels')} are not {list(labels)}")
            if spec.get("input", {}).get("size") != size:
                problems.append(f"{spec_path}: images of size {spec.get('input', {}).get('size')}, "
                                f"the contract says {size}")
    out = Path(out).resolve()
    inputs = [Path(tflite).resolve()] + ([Path(golden_dir).resolve()] if golden_dir is not None else [])
    if any(p == out or out in p.parents for p in inputs):
        problems.append(f"{out}: the bundle would replace the folder holding its own inputs; choose another --out")
    elif out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / BUNDLE_FILE).is_file())):
        problems.append(f"{out}: exists and is not a bundle written before; not replaced")
    return problems


def _card(tflite: Path):
    """What the .tflite file takes and gives (:func:`pipeline.formats.read_card`).

    Raises:
        ConfigError: the file is missing or not a TFLite model.
    """
    from pipeline.errors import PipelineError
    from pipeline.formats import read_card

    if not Path(tflite).is_file():
        raise ConfigError(f"{tflite}: no such .tflite file")
    try:
        return read_card(Path(tflite))
    except PipelineError as err:
        raise ConfigError(f"{tflite}: not a TFLite model a Pi bundle can carry ({err})") from None


def pi_contract(contract: dict, card) -> dict:
    """The bundle's ``preprocessing.json``: the app's contract plus the file's own input type.

    Args:
        contract: a run's ``export/preprocessing.json`` (or that already through
            :func:`pipeline.metadata.preprocessing_contract`, which it is passed through again).
        card: the file's :class:`~pipeline.formats.ModelCard`.
    """
    from pipeline.metadata import preprocessing_contract

    out = preprocessing_contract(contract)
    steps = out["app_steps"]
    dtype, quant = card.input.dtype, card.input.quantization
    if dtype.startswith(("int", "uint")):
        scale, zero = quant if quant else (0.0, 0)
        out["input_quantization"] = {
            "dtype": dtype, "scale": scale, "zero_point": zero,
            "formula": "q = clip(round(x / scale + zero_point), dtype min, dtype max)" if scale
                       else "q = clip(round(x), dtype min, dtype max) (no scale: the values as they are)",
        }
        steps.append(f"then quantise them to {dtype}, the file's input type, with its scale {scale:g} and zero point "
                     f"{zero} (input_quantization); an integer output is dequantised: p = (q - zero_point) * scale")
    else:
        out["input_quantization"] = None
    out["app_steps"] = steps
    return out


def _readme(folder: str, model: str, source: str, tolerance: float, golden: bool, contract: dict) -> str:
    size = contract["size"]
    quant = contract.get("input_quantization")
    feed = (f"quantised to {quant['dtype']} with the file's scale {quant['scale']:g} and zero point "
            f"{quant['zero_point']}" if quant else "as float32")
    run = "python classify.py --self-test && python classify.py ~/photos/" if golden else "python classify.py ~/photos/"
    rows = [(model, "the model"), ("labels.txt", "class names, in the model's output order"),
            ("preprocessing.json", "what the model expects (`classify.py` does it all)"),
            ("classify.py", "the script: one TFLite runtime (`tflite_runtime`, else `ai_edge_litert`), numpy and Pillow"),
            ("requirements.txt", "tflite-runtime, numpy and Pillow, pinned")]
    if golden:
        rows.append(("golden/", f"self-test images (already {size}x{size}) and `golden.json`, the answers expected"))
    rows.append(("bundle.json", "where the model came from, the self-test tolerance, each file's sha256"))
    table = "\n".join(f"| `{name}` | {what} |" for name, what in rows)
    self_test = (f"""
`--self-test` runs the images in `golden/` and exits 0 when every top-1 label is the one edgepipe
recorded and every probability is within ±{tolerance:g} of the float32 reference's (`--tolerance X`
changes it), else 1 with one line per failing image.
""" if golden else "")
    return f"""# {model} for a Raspberry Pi

{source}

Written by edgepipe {__version__}. Needs the 64-bit Raspberry Pi OS (Bookworm, Python 3.11): there is
no 32-bit build of tflite-runtime 2.14.

## Run it

```sh
scp -r {folder} pi@raspberrypi.local:              # 1. on your computer: copy this folder to the Pi
cd {folder} && python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt   # 2. on the Pi
{run}      # 3. self-test, then your photos
```

`classify.py` prints `path: label probability, ...` (the top 5; `--top-k N`), one line per image;
`--json` gives one JSON object a line, `--threads N` sets the interpreter's threads (default: one per
core). Folders are searched recursively. An image it cannot read gives a `path: skipped: why` line.
{self_test}
## The files

| file | what it is |
| --- | --- |
{table}

## What the model expects (for your own app)

Decode the photo to RGB (after its EXIF orientation), resize it to {size}x{size} bilinear with half-pixel
centres and no antialiasing (TensorFlow's `tf.image.resize`; Pillow's `resize` antialiases when it
shrinks, which gives other pixels), no crop, and feed the values 0..255 {feed}.
Do not subtract a mean or divide by a std: the model computes `(x - {contract.get('mean')}) / {contract.get('std')}` itself.
"""


def write_pi_bundle(tflite: Path, labels: list[str], contract: dict, golden_dir: Path | None, out: Path,
                    source: str, *, tolerance: float | None = None) -> Path:
    """Writes the Raspberry Pi bundle of one .tflite file to ``out`` (replaced whole, atomically).

    From a run directory (as the deploy stage, ``pipeline.stages._deploy_run``, calls it)::

        files = manifest["stages"]["quantize"]["outputs"]      # {"tflite-int8": {"path": ...}, "golden": ...}
        write_pi_bundle(run / files["tflite-int8"]["path"],     # the TFLite variant to ship (paths are run-relative)
                        labels=(run / "export" / "labels.txt").read_text(encoding="utf-8").splitlines(),
                        contract=read_json(run / "export" / "preprocessing.json"),
                        golden_dir=run / files["golden"]["path"],  # run / "quantize" / "golden"
                        out=run / "deploy" / "raspberry-pi", source="tflite-int8 (why it was chosen)")

    Args:
        tflite: the model; its file name is kept in the bundle.
        labels: class names in output order (``export/labels.txt``).
        contract: ``export/preprocessing.json`` (see :func:`pi_contract`).
        golden_dir: the quantize stage's ``golden/`` folder, copied for ``--self-test``; None: no self-test.
        out: the bundle folder. A folder that exists must be a bundle written before (or empty).
        source: one line for the README and ``bundle.json`` saying where the model came from.
        tolerance: the self-test's largest probability difference; None: by the file's
            quantisation (:data:`SELF_TEST_TOLERANCE`).

    Returns:
        ``out``.

    Raises:
        ConfigError: every problem found with the arguments at once (labels that do not fit the
            model, a contract classify.py cannot follow, golden images of another model, an ``out``
            that would replace something else).
    """
    from pipeline.golden import copy_golden

    tflite, out = Path(tflite), Path(out)
    card = _card(tflite)
    problems = _problems(tflite, labels, contract, golden_dir, out, card)
    if tolerance is not None and not tolerance >= 0:
        problems.append(f"tolerance {tolerance}: must be 0 or more")
    if problems:
        raise ConfigError(f"Pi bundle of {tflite.name}: " + "; ".join(problems))
    tolerance = SELF_TEST_TOLERANCE.get(card.gate_key, max(SELF_TEST_TOLERANCE.values())) \
        if tolerance is None else float(tolerance)
    pi = pi_contract(contract, card)
    with atomic_dir(out) as tmp:
        shutil.copyfile(tflite, tmp / tflite.name)
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
        (tmp / "preprocessing.json").write_text(json.dumps(pi, indent=2) + "\n", encoding="utf-8")
        shutil.copyfile(CLASSIFY_TEMPLATE, tmp / "classify.py")
        (tmp / "classify.py").chmod(0o755)
        (tmp / "requirements.txt").write_text(
            "# Raspberry Pi OS Bookworm 64-bit (Python 3.11, aarch64): pip install -r requirements.txt\n"
            + "".join(f"{name}=={version}\n" for name, version in PI_REQUIREMENTS.items()), encoding="utf-8")
        if golden_dir is not None:
            copy_golden(Path(golden_dir), tmp / GOLDEN_DIR)
        (tmp / "README.md").write_text(_readme(out.name, tflite.name, source, tolerance, golden_dir is not None, pi),
                                       encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        info = {
            "about": "A Raspberry Pi bundle: run `python classify.py --self-test`, then `python classify.py PHOTOS`.",
            "model": tflite.name,
            "quantization": card.gate_key,
            "source": source,
            "written_by": f"edgepipe {__version__}",
            "requirements": dict(PI_REQUIREMENTS),
            "self_test": {"golden": f"{GOLDEN_DIR}/golden.json" if golden_dir is not None else None,
                          "tolerance": tolerance,
                          "compares": "top-1 label, and each listed probability within the tolerance of the "
                                      "float32 reference's"},
            "sha256": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        }
        (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out
