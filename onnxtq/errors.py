"""Typed errors: each class has an exit code, each instance a hint for the user.

Exit codes (documented in the README and `onnxtq --help`):
0 success, 1 a bug (an unexpected failure: anything that is not an OnnxtqError), 2 bad input or
usage, 3 the compressed model failed verification, 4 the output would gain nothing (no weight
quantized, or not smaller than the input).
"""

from __future__ import annotations


class OnnxtqError(Exception):
    """Base class: a message that names the problem and a hint that says what to do (the class's own
    hint when the raiser has no better one)."""

    exit_code = 1
    default_hint = "this is a bug in onnxtq: please report it with the output of -v"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint or self.default_hint


class UsageError(OnnxtqError):
    """The command line or pipeline text is malformed, or an output path cannot be used."""

    exit_code = 2
    default_hint = "see onnxtq --help, and onnxtq list-passes --options for the pipeline"


class ModelError(OnnxtqError):
    """The model file cannot be read, is unsafe, or is not valid ONNX."""

    exit_code = 2
    default_hint = "the file is damaged, forged or not one onnxtq reads: export the model again from its framework"


class DataError(OnnxtqError):
    """Calibration data is missing or does not match the model's inputs."""

    exit_code = 2
    default_hint = "give an .npz keyed by the model's input names (axis 0 = samples) or a folder of images"


class PreconditionError(OnnxtqError):
    """A pass cannot run on this model as it stands (opset, missing statistics...)."""

    exit_code = 2
    default_hint = "change the pipeline (see onnxtq list-passes --options)"


class PassError(OnnxtqError):
    """A pass failed unexpectedly; the message names the pass and its position."""

    exit_code = 1


class VerificationError(OnnxtqError):
    """The emitted model failed the checker, onnxruntime, or the fidelity budget."""

    exit_code = 3
    default_hint = "nothing was written; if the input model is sound, this is a bug in onnxtq: please report it"


class NoGainError(OnnxtqError):
    """The output would be no smaller than the input, or no weight was quantized: nothing written."""

    exit_code = 4
    default_hint = "pass --allow-no-gain to write it anyway"
