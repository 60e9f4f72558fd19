"""SavedModel → TF.js graph-model bundles, one per :class:`TfjsMode` (weights dtype).

Each bundle is a folder with ``model.json`` (labels and the preprocessing contract in
``userDefinedMetadata``), its weight shards and a static demo page (``index.html`` + ``tf.min.js``,
see :mod:`pipeline.web`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.errors import ConversionError
from pipeline.rundir import atomic_dir
from pipeline.types import TfjsMode
from pipeline.web import PAGE_FILES, add_demo_page

# TF-DF (imported by tensorflowjs) imports IPython for a banner when stdout is not a tty.
os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")

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
