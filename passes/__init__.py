"""The built-in rewrite passes, installed as `onnxtq.passes`: an explicit table by name."""

from onnxtq.passes.auto import AutoPass
from onnxtq.passes.calibrate import CalibratePass
from onnxtq.passes.compact_names import CompactNamesPass
from onnxtq.passes.crq import CrqPass
from onnxtq.passes.dequantize_at_load import DequantizeAtLoadPass
from onnxtq.passes.ecsq import EcsqPass
from onnxtq.passes.fold_bn import FoldBatchNormPass
from onnxtq.passes.gather_codes import GatherCodesPass
from onnxtq.passes.guard_matmul_2bit import GuardMatmul2bitPass
from onnxtq.passes.kq import KqPass
from onnxtq.passes.lower_codes import LowerCodesPass
from onnxtq.passes.refine import RefinePass
from onnxtq.passes.rtn import RtnPass
from onnxtq.passes.tq import TqPass

REGISTRY = {
    p.name: p
    for p in (
        FoldBatchNormPass,
        CalibratePass,
        RtnPass,
        CrqPass,
        TqPass,
        EcsqPass,
        KqPass,
        AutoPass,
        RefinePass,
        DequantizeAtLoadPass,
        CompactNamesPass,
    )
}

#: What every pipeline ends with: not named in pipelines.
FINALIZERS = (GuardMatmul2bitPass,)
#: What a profile's pipelines end with, after those (onnxtq.profiles).
PROFILE_FINALIZERS = {"portable": (LowerCodesPass,), "fast": (DequantizeAtLoadPass,), "lowmem": (GatherCodesPass,)}

__all__ = [
    "AutoPass",
    "FINALIZERS",
    "REGISTRY",
    "CalibratePass",
    "CompactNamesPass",
    "CrqPass",
    "DequantizeAtLoadPass",
    "EcsqPass",
    "FoldBatchNormPass",
    "GatherCodesPass",
    "GuardMatmul2bitPass",
    "KqPass",
    "LowerCodesPass",
    "PROFILE_FINALIZERS",
    "RefinePass",
    "RtnPass",
    "TqPass",
]
