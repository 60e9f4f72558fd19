"""One exception family for everything a user can fix.

Only the CLI catches these; it prints ``str(err)`` as one line and exits with ``err.exit_code``.
Unexpected exceptions are not wrapped, so they keep their traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class PipelineError(Exception):
    """Base class: a problem with input, configuration or environment the user can act on."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(PipelineError):
    """Bad or contradictory options, unknown backbone, missing folder."""


class FetchError(PipelineError):
    """A download, checksum, archive or graph-file problem."""


class DatasetError(PipelineError):
    """Image folders that cannot be trained or verified on."""


class GraphError(PipelineError):
    """A frozen graph that does not have what the backbone spec promises."""


class ConversionError(PipelineError):
    """A converter refused the model."""


class VerificationFailed(PipelineError):
    """At least one converted model drifted past its agreement gate."""

    exit_code = EXIT_GATE_FAILED
