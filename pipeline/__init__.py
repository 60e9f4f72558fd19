"""edgepipe: labelled photos in, verified TFLite and TF.js image classifiers out.

The Python API, what the ``edgepipe`` command does::

    import pipeline
    cfg = pipeline.RunConfig(out="runs/flowers", images="photos/train", test_images="photos/test")
    pipeline.run(cfg)                                   # fetch → retrain → ... → verify
    cfg = pipeline.resume("runs/flowers", quant_modes=["int8"], epochs=300)
    pipeline.run(cfg, until="quantize")                 # only what the change touches re-runs
    pipeline.check(pipeline.CheckSettings(reference="model.keras", candidates=("model.tflite",),
                                          images="photos/test", out="check"))  # anyone's conversion
    pipeline.compare(pipeline.CompareSettings(out="cmp", backbones=("mobilenet_v1_0.25_224", "mobilenet_v1_0.25_128"),
                                              options={"images": "photos/train"}))  # one table, a row each

Importing this package imports neither TensorFlow nor scikit-learn; the stages import them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection

from pipeline.version import __version__

__all__ = [
    "__version__", "run", "resume", "load_config", "validate", "RunConfig", "TrainConfig", "AugmentConfig",
    "AppPreprocessing", "CustomGraph", "PipelineError", "ConfigError", "VerificationFailed", "STAGE_NAMES",
    "check", "CheckSettings", "PrepFlags", "Classifier", "ClassifySettings", "compare", "CompareSettings",
]

if TYPE_CHECKING:
    from pipeline.compare import CompareSettings, compare  # noqa: F401
    from pipeline.config import (  # noqa: F401
        AppPreprocessing,
        AugmentConfig,
        CustomGraph,
        RunConfig,
        TrainConfig,
        load_config,
        resume,
        validate,
    )
    from pipeline.errors import ConfigError, PipelineError, VerificationFailed  # noqa: F401

_LAZY = {
    **{name: "pipeline.config" for name in ("RunConfig", "TrainConfig", "AugmentConfig", "AppPreprocessing",
                                            "CustomGraph", "resume", "load_config", "validate")},
    **{name: "pipeline.errors" for name in ("PipelineError", "ConfigError", "VerificationFailed")},
    "STAGE_NAMES": "pipeline.stages",
    **{name: "pipeline.check" for name in ("check", "CheckSettings", "PrepFlags")},
    **{name: "pipeline.classify" for name in ("Classifier", "ClassifySettings")},
    **{name: "pipeline.compare" for name in ("compare", "CompareSettings")},
}


def __getattr__(name: str) -> Any:
    # Names are imported on first use, so `import pipeline` (and the CLI's start) stays cheap and
    # pipeline.config can import pipeline without a circle.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        # Kept as the package's attribute: importing pipeline.check (or pipeline.compare) has just
        # bound the module under the same name, which would shadow the function from now on.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def run(config: "RunConfig", until: str = "verify", *, verbose: bool = False,
        explicit: Collection[str] = ()) -> dict:
    """Validates ``config`` and runs the stages up to ``until``, skipping what is up to date.

    Args:
        config: every option (:class:`RunConfig`; :func:`resume` gives a run directory's saved
            one with changes).
        until: the last stage to run, one of :data:`STAGE_NAMES`.
        verbose: show TensorFlow's and the converters' own output on the console (it is always
            kept in ``RUN/logs/<stage>.log``).
        explicit: names of options the caller set explicitly (only those may contradict another
            option, e.g. ``test_pct`` with ``test_images``).

    Returns:
        The run directory's manifest (``stages`` → status, outputs and their sha256, timing).

    Raises:
        ConfigError: every configuration problem at once, before any work.
        PipelineError: bad input found by a stage (one line naming the file and the fix).
        VerificationFailed: a converted model drifted past its gate (reports are written).
    """
    from pipeline.config import validate as _validate
    from pipeline.errors import ConfigError as _ConfigError
    from pipeline.stages import STAGE_NAMES, run_stages

    if until not in STAGE_NAMES:
        raise _ConfigError(f"until={until!r}: choose one of {', '.join(STAGE_NAMES)}")
    if config.graph is not None:  # reading the graph imports TensorFlow
        from pipeline.console import import_tensorflow_quietly

        import_tensorflow_quietly(verbose)
    _validate(config, needs_images=until != "fetch", given=explicit)
    if until in ("verify", "deploy"):
        from pipeline.runners import not_ready

        problems = not_ready(config.runtimes, arm64_cpu=config.arm64_cpu, cache_dir=config.cache_dir)
        if problems:
            raise _ConfigError("; ".join(problems))
    return run_stages(config, until=until, verbose=verbose)
