"""GPU figures the cost model needs: presets from datasheets, or a measured profile.

Efficiency factors turn datasheet peaks into what kernels reach; host-to-device
figures are what pinned-memory copies reach in practice (not the bus peak).
A profile written by `emoe profile` (YAML with the same keys) replaces a preset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from traces import yamlio


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bytes: float        # per GPU
    hbm_bytes_per_s: float     # per GPU, datasheet
    flops_per_s: float         # dense bf16 tensor-core peak per GPU
    h2d_bytes_per_s: float     # pinned host-to-device copy bandwidth reached, per GPU link
    h2d_latency_s: float       # fixed cost per copy (driver, DMA setup)
    count: int = 1             # GPUs; idealised expert/tensor parallel: everything scales by count
    flops_efficiency: float = 0.6
    hbm_efficiency: float = 0.8
    layer_overhead_s: float = 30e-6   # kernel launches and sync per transformer layer
    step_overhead_s: float = 2e-3     # scheduler, sampling, host work per engine step
    source: str = ""
    # Measured cost functions from `emoe profile` for one model shape (see sim/costmodel.py);
    # when they match the scenario's model they replace the roofline.
    measured: dict | None = None

    @property
    def total_memory(self) -> float:
        return self.memory_bytes * self.count

    @property
    def flops(self) -> float:
        return self.flops_per_s * self.flops_efficiency * self.count

    @property
    def hbm(self) -> float:
        return self.hbm_bytes_per_s * self.hbm_efficiency * self.count

    @property
    def h2d(self) -> float:
        return self.h2d_bytes_per_s * self.count

    def copy_time(self, nbytes: float) -> float:
        """Seconds to move one expert of nbytes to the device (split over `count` links)."""
        return self.h2d_latency_s + nbytes / self.h2d


GB = 1e9
GiB = 2 ** 30
# Datasheet figures (NVIDIA A100, H100, H200, L4 datasheets; RTX 4090 spec sheet).
# H2D: pinned cudaMemcpy reaches ~80% of the PCIe link peak (PCIe4 x16 ~25 GB/s,
# PCIe5 x16 ~50 GB/s); per-copy latency ~10 us (CUDA memcpy launch + DMA setup).
PRESETS: dict[str, HardwareSpec] = {
    h.name: h for h in [
        HardwareSpec("a100-40gb", 40 * GiB, 1555 * GB, 312e12, 25 * GB, 10e-6,
                     source="NVIDIA A100 datasheet (SXM4 40GB, PCIe 4.0 host link)"),
        HardwareSpec("a100-80gb", 80 * GiB, 2039 * GB, 312e12, 25 * GB, 10e-6,
                     source="NVIDIA A100 datasheet (SXM4 80GB, PCIe 4.0 host link)"),
        HardwareSpec("h100-80gb", 80 * GiB, 3350 * GB, 989e12, 50 * GB, 10e-6,
                     source="NVIDIA H100 SXM5 datasheet (PCIe 5.0 host link)"),
        HardwareSpec("h200", 141 * GB, 4800 * GB, 989e12, 50 * GB, 10e-6,
                     source="NVIDIA H200 SXM datasheet (PCIe 5.0 host link)"),
        HardwareSpec("l4", 24 * GiB, 300 * GB, 121e12, 25 * GB, 10e-6,
                     source="NVIDIA L4 datasheet (PCIe 4.0 x16)"),
        HardwareSpec("rtx-4090", 24 * GiB, 1008 * GB, 165e12, 25 * GB, 10e-6,
                     source="GeForce RTX 4090 spec sheet (PCIe 4.0 x16; bf16 dense with fp32 accumulate)"),
    ]
}

HW_FIELDS = {f.name for f in fields(HardwareSpec)}
PROFILE_SECTIONS = {"hardware", "measured", "copies", "info"}   # what `emoe profile` writes


def load_profile(path) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"hardware profile '{p}' does not exist; write one with "
                                "`emoe profile --device cuda -o PROFILE.yaml` or use a preset")
    data = yamlio.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a hardware profile is a mapping of {sorted(HW_FIELDS)}")
    # `emoe profile` writes {hardware, measured, copies, info}; a hand-written profile may be
    # the hardware fields alone. Anything else is a typo that would silently leave a default.
    if "hardware" in data:
        unknown = set(data) - PROFILE_SECTIONS
        hw = data["hardware"]
        if not isinstance(hw, dict):
            raise ValueError(f"{p}: 'hardware' must be a mapping of {sorted(HW_FIELDS)}")
        hw = dict(hw)
        unknown |= {f"hardware.{k}" for k in set(hw) - HW_FIELDS}
    else:
        hw = dict(data)
        unknown = set(hw) - HW_FIELDS - {"measured"}
    if unknown:
        raise ValueError(f"{p}: unknown hardware profile key(s) {sorted(unknown)}; a profile holds "
                         f"{sorted(PROFILE_SECTIONS)} (as `emoe profile` writes it) or the fields {sorted(HW_FIELDS)}")
    if "measured" in data:
        hw["measured"] = data["measured"]
    return {k: v for k, v in hw.items() if k in HW_FIELDS}


def get_hardware(spec, base_dir: Path | None = None) -> HardwareSpec:
    """A preset name, or a mapping {preset|profile, count, any field override}."""
    if isinstance(spec, HardwareSpec):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KeyError(f"unknown hardware preset '{spec}'; choose one of: {', '.join(PRESETS)} "
                           "or give {profile: PROFILE.yaml}")
        return PRESETS[spec]
    if not isinstance(spec, dict):
        raise TypeError("hardware must be a preset name or a mapping")
    d = dict(spec)
    unknown = set(d) - HW_FIELDS - {"preset", "profile"}
    if unknown:
        raise KeyError(f"unknown hardware key(s) {sorted(unknown)}; allowed: preset, profile, "
                       f"{', '.join(sorted(HW_FIELDS))}")
    base = asdict(get_hardware(d.pop("preset", "a100-40gb")))
    if "profile" in d:
        prof = Path(d.pop("profile"))
        if base_dir is not None and not prof.is_absolute():
            prof = base_dir / prof
        base.update(load_profile(prof))
        base["source"] = f"profile {prof}"
    base.update(d)
    for f in HW_FIELDS - {"name", "source", "measured"}:
        v = base[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"hardware.{f} must be a non-negative number, got {v!r}")
    for f in ("memory_bytes", "hbm_bytes_per_s", "flops_per_s", "h2d_bytes_per_s", "count"):
        if not base[f] > 0:
            raise ValueError(f"hardware.{f} must be positive, got {base[f]!r}")
    if int(base["count"]) != base["count"]:
        raise ValueError(f"hardware.count must be a whole number of GPUs, got {base['count']!r}")
    base["count"] = int(base["count"])
    block = (base.get("measured") or {}).get("kv_block_tokens", 1)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{base.get('source') or 'hardware'}: measured.kv_block_tokens must be a whole number of "
                         f"tokens >= 1 (the replay's KV block), got {block!r}; profile again or remove it")
    return HardwareSpec(**base)

