"""Roofline arithmetic: FLOPs, bytes, arithmetic intensity and the bound of a kernel on named hardware.

    python -m tools.roofline                       # V4-Flash expert matmuls at a few token counts
    python -m tools.roofline --m=49152 --k=4096 --n=2048 --e=256 --weights=fp8

Peak numbers are approximate vendor figures (dense, no sparsity). A kernel is memory-bound when its intensity
(FLOPs per byte of HBM traffic) is below the ridge point peak_flops / bandwidth, compute-bound above it; its
time is at least max(FLOPs / peak, bytes / bandwidth).
"""

from __future__ import annotations

import dataclasses

from absl import app, flags


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: dict[str, float]  # FLOP/s by compute dtype
    hbm_bytes_per_s: float

    def ridge(self, compute: str = "bf16") -> float:
        """FLOPs per byte at which compute and memory time are equal."""
        return self.peak_flops[compute] / self.hbm_bytes_per_s


HARDWARE = {
    "h200": Hardware("NVIDIA H200 SXM", {"bf16": 989e12, "fp8": 1979e12}, 4.8e12),
}

# Bytes per weight element, block scales included (FP8: one byte per 128x128 block; MXFP4: one per 32).
WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "fp8": 1.0 + 1.0 / (128 * 128), "mxfp4": 0.5 + 1.0 / 32}


@dataclasses.dataclass(frozen=True)
class Roofline:
    flops: float
    bytes: float
    hardware: str
    compute: str

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    @property
    def ridge(self) -> float:
        return HARDWARE[self.hardware].ridge(self.compute)

    @property
    def bound(self) -> str:
        return "compute" if self.intensity >= self.ridge else "memory"

    @property
    def seconds(self) -> float:
        """Lower bound on the run time."""
        hw = HARDWARE[self.hardware]
        return max(self.flops / hw.peak_flops[self.compute], self.bytes / hw.hbm_bytes_per_s)


def roofline(flops: float, nbytes: float, hardware: str = "h200", compute: str = "bf16") -> Roofline:
    """Roofline of a kernel given its FLOPs and HBM bytes."""
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
    if compute not in HARDWARE[hardware].peak_flops:
        raise ValueError(f"{hardware} has no {compute!r} peak; known: {', '.join(HARDWARE[hardware].peak_flops)}")
    return Roofline(float(flops), float(nbytes), hardware, compute)


def grouped_matmul(m: int, k: int, n: int, e: int, weights: str = "bf16", act_bytes: int = 2, out_bytes: int = 2,
                   hardware: str = "h200", compute: str = "bf16") -> Roofline:
    """Grouped expert matmul [M, K] x [E, K, N] -> [M, N] with each operand read once.

    `compute` is the dtype of the tensor-core math: "bf16" when weights are upcast in the kernel (ours),
    "fp8" for an FP8 x FP8 kernel.
    """
    if weights not in WEIGHT_BYTES:
        raise ValueError(f"unknown weight format {weights!r}; known: {', '.join(WEIGHT_BYTES)}")
    nbytes = m * k * act_bytes + e * k * n * WEIGHT_BYTES[weights] + m * n * out_bytes
    return roofline(2.0 * m * k * n, nbytes, hardware, compute)


def table(rows: list[tuple[str, Roofline]]) -> str:
    head = f"{'case':<34} {'GFLOP':>9} {'MB':>9} {'FLOP/B':>7} {'ridge':>6} {'bound':>8} {'min us':>9}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        lines.append(f"{name:<34} {r.flops / 1e9:>9.1f} {r.bytes / 1e6:>9.1f} {r.intensity:>7.0f} {r.ridge:>6.0f} "
                     f"{r.bound:>8} {r.seconds * 1e6:>9.1f}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_integer("m", None, "rows (tokens x top-k); default: a V4-Flash sweep")
    flags.DEFINE_integer("k", 4096, "contraction size (V4-Flash w1: hidden 4096)")
    flags.DEFINE_integer("n", 2048, "output size (V4-Flash w1: expert hidden 2048)")
    flags.DEFINE_integer("e", 256, "experts")
    flags.DEFINE_enum("weights", None, list(WEIGHT_BYTES), "weight format; default: all")
    flags.DEFINE_enum("hardware", "h200", list(HARDWARE), "hardware entry")


def main(argv):
    del argv
    ms = [FLAGS.m] if FLAGS.m else [t * 6 for t in (256, 2048, 8192, 32768)]
    formats = [FLAGS.weights] if FLAGS.weights else ["bf16", "fp8", "mxfp4"]
    rows = [(f"M={m} ({m / FLAGS.e:.0f}/expert) {f}", grouped_matmul(m, FLAGS.k, FLAGS.n, FLAGS.e, f,
                                                                    hardware=FLAGS.hardware))
            for m in ms for f in formats]
    print(f"grouped matmul K={FLAGS.k} N={FLAGS.n} E={FLAGS.e} on {HARDWARE[FLAGS.hardware].name}")
    print(table(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
