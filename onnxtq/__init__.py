"""onnxtq: compress trained ONNX models into smaller ONNX files that stock onnxruntime runs."""

__version__ = "0.1.0"

from onnxtq.compress import DEFAULT_PIPELINE, Guards, compress  # noqa: E402
from onnxtq.errors import OnnxtqError  # noqa: E402
from onnxtq.pass_infra import Context, Pass, PassConfig, PassManager  # noqa: E402
from onnxtq.pipeline import parse  # noqa: E402
from onnxtq.report import PassReport, RunReport, WeightRecord  # noqa: E402

__all__ = [
    "DEFAULT_PIPELINE",
    "Context",
    "Guards",
    "OnnxtqError",
    "Pass",
    "PassConfig",
    "PassManager",
    "PassReport",
    "RunReport",
    "WeightRecord",
    "compress",
    "parse",
    "__version__",
]
