"""What a run did, as data: per weight (bytes before/after, bits, distortion, or why skipped),
per pass (typed figures: rates, predicted and measured fidelity, layers kept at higher precision),
and for the whole model. Rendered as a table for people and JSON for machines; the notes are
sentences for people, never a place a program has to parse a number from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class WeightRecord:
    name: str
    node: str
    op: str
    status: str  # quantized | folded | refined | observed | skipped
    kind: str = ""
    shape: tuple = ()
    bytes_before: int = 0
    bytes_after: int = 0
    bits: float | None = None  # stored bits per weight, scales and zero points included
    weight_sqnr_db: float | None = None  # 10·log10(‖W‖² / ‖W − Ŵ‖²)
    output_sqnr_db: float | None = None  # same for the layer output, E‖Wx‖² / E‖(W − Ŵ)x‖², from calibration
    output_error: float | None = None  # the layer-output error itself, E‖(W − Ŵ)x‖² by calibration
    bias_corrected: bool = False  # the layer's bias absorbed the mean output error (onnxtq.bias)
    nominal_bits: float | None = None  # code bits per weight at their bit depths, before containers and steps
    bound_bits: float | None = None  # Gaussian rate-distortion bound at the output error reached, bits per weight
    detail: str = ""  # how the pass coded it (transform, bands, bit depths)
    reason: str = ""
    codec: str = ""  # the codec an allocation over several chose (auto)
    share: float | None = None  # its share of the allocation's predicted network-output error (auto)

    @classmethod
    def of(cls, site, status: str, **fields) -> WeightRecord:
        """A record for a WeightSite (anything with name, node, op, kind and shape)."""
        return cls(site.name, site.node, site.op, status, site.kind, site.shape, **fields)


@dataclass
class Rate:
    """A quantizing pass's rate over the weights it quantized, in bits per weight."""

    weights: int  # weights quantized
    stored: float  # bits the file stores for them: codes in their containers, steps, zero points, bases
    nominal: float | None = None  # code bits at their depths, before containers (tq, kq) or the codes' entropy (ecsq)
    bound: float | None = None  # Gaussian rate-distortion bound at the distortion reached (tq)
    predicted: float | None = None  # what the allocation predicted (tq)
    entropy: float | None = None  # entropy of the codes, steps or codebook included: `onnxtq pack`'s size (ecsq)
    target: float | None = None  # what the pass aimed at (tq rate, ecsq entropy)


@dataclass
class Additivity:
    """The allocation's prediction of the network-output error (Σ gain·layer error) against a measurement."""

    samples: int
    predicted_sqnr_db: float
    measured_sqnr_db: float


@dataclass
class Kept:
    """A layer a pass quantized at other than its main bit depth (first/last, depthwise)."""

    name: str
    kind: str
    bits: int
    bytes: int


@dataclass
class Attempt:
    """One round of a target run's loop: what the allocation aimed at, what it predicted, what was measured."""

    aim: float  # the allocation's budget, in bits of the quantizable weights
    predicted: float | None  # the target's quantity as predicted (bytes, bits per weight, SQNR dB; None: agreement)
    measured: float  # the same, measured on the emitted model (fidelity on the held-out inputs; agreement less
    # onnxtq.target.AGREEMENT_Z standard errors)
    bytes: int  # the emitted model's size
    meets: bool


@dataclass
class TargetResult:
    """A target run (auto): the target, the held-out inputs it was measured on, every round, the outcome."""

    kind: str  # size | served_size | bits | sqnr | agreement
    value: float
    holdout_samples: int
    attempts: list[Attempt] = field(default_factory=list)
    met: bool = False
    sqnr_db: float | None = None  # the chosen model's worst output SQNR on the held-out inputs
    agreement: float | None = None  # its expected top-1 agreement with the original there (class-score outputs)
    agreement_observed: float | None = None  # the share of held-out inputs whose top-1 class agrees
    served_bytes: int | None = None  # brotli -q 11 of the chosen model (served_size targets)
    corrected: int = 0  # layers whose predicted error was corrected by measuring their marginal effect


@dataclass
class PassReport:
    pass_name: str
    spec: str
    records: list[WeightRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # sentences for people
    seconds: float = 0.0
    stats: str = ""  # the calibration statistics the pass saw: fresh | recalibrated | none ("" if it reads none)
    rate: Rate | None = None
    additivity: Additivity | None = None
    transformed: int | None = None  # tq: layers that kept their transform
    kept: list[Kept] = field(default_factory=list)
    target: TargetResult | None = None

    @property
    def changed(self) -> list[WeightRecord]:
        return [r for r in self.records if r.status in ("quantized", "folded", "refined")]

    @property
    def skipped(self) -> list[WeightRecord]:
        return [r for r in self.records if r.status == "skipped"]

    @property
    def modified(self) -> bool:
        return bool(self.changed)

    @property
    def bias_corrected(self) -> tuple[int, int]:
        """(layers whose bias absorbed the mean error, layers quantized)."""
        done = [r for r in self.records if r.status == "quantized"]
        return sum(r.bias_corrected for r in done), len(done)

    def summary(self) -> str:
        saved = sum(r.bytes_before - r.bytes_after for r in self.changed)
        what = f"changed={len(self.changed):4d} skipped={len(self.skipped):4d} saved={saved:+,d} B"
        if not self.records and self.notes:  # a pass that does not touch weights says what it did
            what = self.notes[0]
        return f"{self.spec:<28} {what}  {self.seconds:6.1f} s"


@dataclass
class RunReport:
    pipeline: str
    source: str
    output: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    calibration: str = ""
    session: str = ""
    onnxruntime: str = ""  # the oldest release that runs the file (onnxtq.profiles.min_onnxruntime)
    passes: list[PassReport] = field(default_factory=list)
    verification: dict = field(default_factory=dict)
    transfer: dict = field(default_factory=dict)  # bytes sent: brotli, gzip, packed (onnxtq.served)
    error: str = ""  # why a sweep's pipeline produced no model (the sweep goes on with the next)
    exit_code: int = 0  # the exit code that failure has on its own (onnxtq.errors)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    def table(self) -> str:
        lines = [p.summary() for p in self.passes]
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        lines.append(f"model: {self.bytes_before:,d} B -> {self.bytes_after:,d} B ({ratio:.2f}x smaller)")
        if self.transfer:
            t = self.transfer
            sent = f"brotli -q 11 {t['brotli']:,d} B, gzip -9 {t['gzip']:,d} B, onnxtq pack {t['packed']:,d} B"
            lines.append(f"sent: {sent}")
        lines += [output_line(name, v) for name, v in self.verification.get("outputs", {}).items()]
        return "\n".join(lines)


def output_line(name: str, v: dict) -> str:
    """One line for people: the output's SQNR and max error, or how many of its values are NaN/Inf."""
    if v.get("nonfinite") or v.get("reference_nonfinite"):
        return (
            f"output {name}: {v['nonfinite']:,d} of {v['values']:,d} values are NaN/Inf "
            f"(the original's: {v['reference_nonfinite']:,d})"
        )
    return f"output {name}: SQNR {v['sqnr_db']:.1f} dB, max |err| {v['max_abs_err']:.3g}"
