"""One error hierarchy for all of cpuflow.

Every failure a user can cause or meet is a :class:`CpuflowError`. The CLI maps
it to a one-line message and ``exit_code``; the server maps it to ``http_status``
and ``code``. Messages name the thing that is wrong and what to do about it, and
never carry a stack trace.
"""
from __future__ import annotations


class CpuflowError(Exception):
    """Base of every error cpuflow raises on purpose."""

    exit_code = 1
    http_status = 500
    code = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


# --- bad input from the user -------------------------------------------------
class InvalidArgument(CpuflowError):
    """A parameter is out of its valid range or of the wrong kind."""

    exit_code = 2
    http_status = 422
    code = "invalid_argument"


class ImageInputError(InvalidArgument):
    """An init image cannot be read or is not acceptable."""

    code = "invalid_image"


class ResourceLimitError(InvalidArgument):
    """A request would exceed a pixel, memory or length budget."""

    http_status = 413
    code = "too_large"


# --- model folders and weights --------------------------------------------------
class ModelError(CpuflowError):
    """A model folder or weights file is missing, damaged or inconsistent."""

    exit_code = 3
    http_status = 500
    code = "model_error"


class ManifestError(ModelError):
    code = "manifest_error"


class IntegrityError(ModelError):
    """A file does not match the size / sha256 the manifest recorded."""

    code = "integrity_error"


class IncompatibleModelError(ModelError):
    """Components that do not fit together (widths, channels)."""

    code = "incompatible_model"


class UnsafeFileError(ModelError):
    """A file that must not be loaded (pickle without opt-in, path escaping the folder)."""

    code = "unsafe_file"


# --- environment ---------------------------------------------------------------
class MissingDependency(CpuflowError):
    """An optional extra (export, serve, a backend) is not installed."""

    exit_code = 4
    code = "missing_dependency"


class BackendError(CpuflowError):
    """A backend failed to load or run a component."""

    exit_code = 5
    code = "backend_error"


class DiskSpaceError(CpuflowError):
    exit_code = 6
    code = "disk_space"


# --- faults during a run --------------------------------------------------------
class NumericalError(CpuflowError):
    """Non-finite values in latents or images: never saved as a success."""

    exit_code = 7
    code = "numerical_error"


class Cancelled(CpuflowError):
    exit_code = 130
    http_status = 409
    code = "cancelled"


# --- export stage ---------------------------------------------------------------
class ExportError(CpuflowError):
    exit_code = 8
    code = "export_error"


class SourceError(ExportError):
    """The export source is missing, unreadable or of an unknown architecture."""

    code = "source_error"


class ValidationFailed(ExportError):
    """An exported component differs from torch beyond its tolerance."""

    code = "validation_failed"
