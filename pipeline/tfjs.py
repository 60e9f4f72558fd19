"""The tfjs stage: SavedModel → TF.js graph-model bundles, one per :class:`TfjsMode` (weights dtype).

:func:`convert_all` is the stage as a function; :func:`convert_tfjs` converts one bundle.

Each bundle is a folder with ``model.json`` (labels and the preprocessing contract in
``userDefinedMetadata``), its weight shards and a static demo page (``index.html`` + ``tf.min.js``,
see :mod:`pipeline.web`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from pipeline.console import log
from pipeline.errors import ConversionError
from pipeline.rundir import atomic_dir
from pipeline.types import TfjsMode
from pipeline.web import PAGE_FILES, add_demo_page

# TF-DF (imported by tensorflowjs) imports IPython for a banner when stdout is not a tty.
os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")

LARGE_BYTES = 30 * 1000 * 1000  # a bundle over this is slow to download on a phone

# Weight dtype maps for the converter; "*" matches every weight.
QUANTIZATION = {
    TfjsMode.FLOAT32: None,
    TfjsMode.FLOAT16: {"float16": "*"},
    TfjsMode.UINT8: {"uint8": "*"},
}


def convert_tfjs(
    saved_model_dir: Path, out_dir: Path, mode: TfjsMode, metadata: dict,
    shard_size_bytes: int = 4 * 1024 * 1024,
) -> Path:
    """Converts the SavedModel into ``out_dir`` (replaced atomically) and returns it.

    Args:
        metadata: JSON-serialisable; stored as ``userDefinedMetadata`` in model.json.

    Raises:
        ConversionError: the converter refused the model.
        PipelineError: ``tf.min.js`` for the demo page is not installed (``make setup``).
    """
    from tensorflowjs.converters import tf_saved_model_conversion_v2 as tfjs_conv

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        # The converter writes into an empty folder of its own choosing.
        target = tmp / "bundle"
        try:
            tfjs_conv.convert_tf_saved_model(
                str(saved_model_dir), str(target),
                signature_def="serving_default", saved_model_tags="serve",
                quantization_dtype_map=QUANTIZATION[mode],
                weight_shard_size_bytes=shard_size_bytes,
                metadata={"edgepipe": json.loads(json.dumps(metadata))},
                use_structured_outputs_names=True,
            )
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConversionError(f"TF.js {mode.value} conversion of {saved_model_dir} failed: {first}") from err
        for item in target.iterdir():
            os.replace(item, tmp / item.name)
        shutil.rmtree(target)
        add_demo_page(tmp)
    return out_dir


def bundle_size(bundle: Path) -> int:
    """Bytes of the model (``model.json`` + shards); the demo page's files are not the model."""
    files = (p for p in Path(bundle).iterdir() if p.is_file() and p.name not in PAGE_FILES)
    return sum(p.stat().st_size for p in files)


def convert_all(
    saved_model_dir: Path, modes: Sequence[TfjsMode], out_dir: Path, metadata: dict,
    golden_dir: Path | None = None, shard_size_bytes: int = 4 * 1024 * 1024,
) -> tuple[dict[TfjsMode, Path], list[str]]:
    """Writes ``out_dir/<mode>/`` for every mode: model.json + shards, the demo page and, when
    ``golden_dir`` is given, a copy of the golden self-test images.

    Returns:
        The bundle folder of each mode, and warnings (uint8 accuracy, bundles over 30 MB).

    Raises:
        ConversionError: the converter refused the model.
    """
    from pipeline.golden import GOLDEN_DIR, copy_golden

    bundles, warnings = {}, []
    if TfjsMode.UINT8 in modes:
        # tfjs-examples' quantization study: MobileNetV2 top-1 0.618 → 0.280 with 8-bit weights.
        warnings.append("TF.js uint8 weights are known to collapse MobileNet accuracy (tfjs-examples: "
                        "MobileNetV2 top-1 0.618 → 0.280); trust the verify figures, not the size")
    for mode in modes:
        t0 = time.perf_counter()
        bundle = convert_tfjs(saved_model_dir, Path(out_dir) / mode.value, mode, metadata,
                              shard_size_bytes=shard_size_bytes)
        if golden_dir is not None:
            copy_golden(golden_dir, bundle / GOLDEN_DIR)
        size = bundle_size(bundle)
        log.info(f"tfjs: {mode.value} bundle {size / 1e6:.2f} MB in {time.perf_counter() - t0:.1f} s")
        if size > LARGE_BYTES:
            warnings.append(f"TF.js {mode.value} bundle is {size / 1e6:.1f} MB: over 30 MB, browsers on phones "
                            "download it slowly and may run out of memory; try --tfjs float16 or a smaller backbone")
        bundles[mode] = bundle
    return bundles, warnings
