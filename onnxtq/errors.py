"""Typed errors: each class has an exit code, each instance a hint for the user.

Exit codes (documented in the README and `onnxtq --help`):
0 success, 1 a pass or onnxruntime failed unexpectedly, 2 bad input or usage,
3 the compressed model failed verification.
"""

from __future__ import annotations


class OnnxtqError(Exception):
    """Base class: a message that names the problem and a hint that says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(OnnxtqError):
    """The command line or pipeline text is malformed."""

    exit_code = 2


class ModelError(OnnxtqError):
    """The model file cannot be read, is unsafe, or is not valid ONNX."""

    exit_code = 2


class DataError(OnnxtqError):
    """Calibration data is missing or does not match the model's inputs."""

    exit_code = 2


class PreconditionError(OnnxtqError):
    """A pass cannot run on this model as it stands (opset, missing statistics...)."""

    exit_code = 2


class PassError(OnnxtqError):
    """A pass failed unexpectedly; the message names the pass and its position."""

    exit_code = 1


class VerificationError(OnnxtqError):
    """The emitted model failed the checker, onnxruntime, or the fidelity budget."""

    exit_code = 3
