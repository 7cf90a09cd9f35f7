"""Peak memory of one benchmark cell: host RSS, and GPU memory where the backend uses a GPU.

Host: Linux keeps the resident-set high-water mark (``VmHWM`` in
``/proc/self/status``) and resets it when ``5`` is written to
``/proc/self/clear_refs``; the peak of a cell is its high-water mark minus the
RSS before the backend was loaded (weights + runtime + activations).  In-process
figures are indicative, not exact; two things make them read low, and both are
undone before the baseline and before each cell: garbage of earlier work that is
freed after the baseline was taken (``gc.collect``), and freed heap pages that
stay resident, so that reusing them adds nothing to RSS (glibc's ``malloc_trim``).
Elsewhere host peaks are not measured (None).

GPU: PyTorch's own peak (``torch.cuda.max_memory_allocated``) for torch-cuda; for
ONNX Runtime and TensorRT, which allocate outside PyTorch, the device's used
memory after the cell minus before the load (``torch.cuda.mem_get_info``).
"""

from __future__ import annotations

import gc
from pathlib import Path

from kdtool.heap import release_freed

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _settle() -> None:
    """Free what is garbage now and hand freed heap pages back to the kernel."""
    gc.collect()
    release_freed()


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    def __init__(self):
        # Without a resettable high-water mark a cell's peak would be the process's: say None.
        self.host = _status_kb("VmHWM") is not None and _reset_peak()
        self.base_rss_kb = 0
        self.gpu_kind: str | None = None

    def start_backend(self, backend: str) -> None:
        """Call before loading a backend: its memory is measured from here."""
        if self.host:
            _settle()
        self.base_rss_kb = _status_kb("VmRSS") or 0
        self.gpu_kind = None
        if backend in ("torch-cpu", "ort-cpu"):
            return
        import torch

        if not torch.cuda.is_available():
            return
        torch.cuda.synchronize()
        if backend == "torch-cuda":
            self.gpu_kind = "torch peak allocated"
            self.base_gpu = torch.cuda.memory_allocated()
        else:
            self.gpu_kind = "device used"
            free, total = torch.cuda.mem_get_info()
            self.base_gpu = total - free

    def start_cell(self) -> None:
        if self.host:
            _settle()
            _reset_peak()
        if self.gpu_kind == "torch peak allocated":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def cell_peak(self) -> dict:
        """peak_rss_mb, gpu_mem_mb and gpu_mem_kind of the cell that just ran, in MB of
        10**6 bytes, the unit of the table's file sizes beside them."""
        rss = None
        if self.host:
            hwm = _status_kb("VmHWM")
            rss = None if hwm is None else max(0, hwm - self.base_rss_kb) * 1024 / 1e6
        gpu = None
        if self.gpu_kind is not None:
            import torch

            torch.cuda.synchronize()
            if self.gpu_kind == "torch peak allocated":
                now = torch.cuda.max_memory_allocated()
            else:
                free, total = torch.cuda.mem_get_info()
                now = total - free
            gpu = max(0, now - self.base_gpu) / 1e6
        return {"peak_rss_mb": rss, "gpu_mem_mb": gpu, "gpu_mem_kind": self.gpu_kind}
