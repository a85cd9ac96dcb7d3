"""Calibration: stream inputs through onnxruntime and reduce each layer's input to statistics."""

from onnxtq.calibration.collect import CalibrationConfig, StatsStore, collect, collect_drift, importance
from onnxtq.calibration.data import ImagePreprocessing, Source, open_source
from onnxtq.calibration.stats import LayerStats

__all__ = [
    "CalibrationConfig",
    "ImagePreprocessing",
    "LayerStats",
    "Source",
    "StatsStore",
    "collect",
    "collect_drift",
    "importance",
    "open_source",
]
