"""GPUs and the paths between them, through NVML (``nvidia-ml-py``, optional).

Without the package, without a driver or without GPUs, :func:`detect` returns no GPUs:
a CPU machine is a normal machine, not an error.

Path classes, closest first (the names NCCL's topology uses): ``NV<k>`` k NVLinks
between the two GPUs, directly or through NVSwitches; ``PIX`` one PCIe switch between
them; ``PXB`` several PCIe switches, no host bridge; ``PHB`` through the CPU's host
bridge; ``NODE`` across host bridges of one NUMA node; ``SYS`` across the
inter-socket link. ``X`` is a device to itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .model import Gpu

PCIE_CLASSES = ("PIX", "PXB", "PHB", "NODE", "SYS")

# NVML's nvmlGpuTopologyLevel_t values, from its header: INTERNAL 0, SINGLE 10,
# MULTIPLE 20, HOSTBRIDGE 30, NODE 40, SYSTEM 50.
_NVML_LEVEL = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def pci_class(a: str, b: str, numa_a: int = -1, numa_b: int = -1) -> str:
    """The PCIe path class between two devices given their sysfs paths.

    A path looks like ``/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0``: the root
    complex, then one component per bridge down to the device. Devices whose parents
    are the same bridge sit on one switch (PIX); devices that share a bridge below the
    root complex are PXB; the same root complex is PHB; otherwise NODE when both are on
    one NUMA node, SYS when not or when that is not known. A device without a PCI
    path (virtual) is SYS.
    """
    if not a or not b:
        return "SYS"
    pa = [c for c in Path(a).parts if c.startswith("pci") or _is_bdf(c)]
    pb = [c for c in Path(b).parts if c.startswith("pci") or _is_bdf(c)]
    if not pa or not pb:
        return "SYS"
    if pa == pb:
        return "X"
    if pa[0] != pb[0]:
        return "NODE" if numa_a >= 0 and numa_a == numa_b else "SYS"
    if pa[:-1] == pb[:-1]:
        return "PIX"
    common = 0
    for x, y in zip(pa, pb):
        if x != y:
            break
        common += 1
    return "PXB" if common > 1 else "PHB"


def _is_bdf(component: str) -> bool:
    # a PCI address: dddd:bb:dd.f
    parts = component.split(":")
    return len(parts) == 3 and "." in parts[2]


def _load_nvml() -> Any | None:
    try:
        import pynvml  # from the nvidia-ml-py package
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError_* subclasses: no driver, no GPU, no permission
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect(sysfs: Path = Path("/sys"), nvml: Any | None = None) -> tuple[tuple[Gpu, ...], tuple[tuple[str, ...], ...]]:
    """(GPUs, path matrix) of this node; ((), ()) without NVML or GPUs.

    ``nvml`` stands in for the pynvml module (tests pass a fake)."""
    own = nvml is None
    nvml = nvml or _load_nvml()
    if nvml is None:
        return (), ()
    try:
        return _detect(nvml, sysfs)
    except Exception:  # noqa: BLE001 - a failing driver call leaves the node without GPU facts
        return (), ()
    finally:
        if own:
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def _detect(nvml: Any, sysfs: Path):
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    bus_ids = [_text(nvml.nvmlDeviceGetPciInfo(h).busId).lower() for h in handles]
    gpus = []
    for i, (h, bus) in enumerate(zip(handles, bus_ids)):
        # NVML's busId has an 8-digit domain (00000000:1B:00.0); sysfs uses 4.
        short = bus[-12:] if len(bus) > 12 else bus
        dev = sysfs / "bus/pci/devices" / short
        pci_path = str(Path(os.path.realpath(dev))) if dev.exists() else ""
        try:
            numa = int((dev / "numa_node").read_text().strip()) if pci_path else -1
        except (OSError, ValueError):
            numa = -1
        mem = nvml.nvmlDeviceGetMemoryInfo(h).total // (1 << 20)
        gpus.append(Gpu(index=i, name=_text(nvml.nvmlDeviceGetName(h)), memory_mib=int(mem),
                        numa_node=numa, pci_path=pci_path))
    # NVLinks: to another GPU directly, or to a non-GPU device (an NVSwitch).
    direct = [[0] * count for _ in range(count)]
    switch = [0] * count
    max_links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
    for i, h in enumerate(handles):
        for link in range(max_links):
            try:
                if nvml.nvmlDeviceGetNvLinkState(h, link) != getattr(nvml, "NVML_FEATURE_ENABLED", 1):
                    continue
                remote = _text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId).lower()
            except Exception:  # noqa: BLE001 - NVML_ERROR_NOT_SUPPORTED / INVALID_ARGUMENT past the last link
                continue
            if remote in bus_ids:
                direct[i][bus_ids.index(remote)] += 1
            else:
                switch[i] += 1
    paths = []
    for i in range(count):
        row = []
        for j in range(count):
            links = direct[i][j] + (min(switch[i], switch[j]) if switch[i] and switch[j] else 0)
            if i == j:
                row.append("X")
            elif links:
                row.append(f"NV{links}")
            else:
                level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
                row.append(_NVML_LEVEL.get(int(level), "SYS"))
        paths.append(tuple(row))
    return tuple(gpus), tuple(paths)
