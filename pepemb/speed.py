"""Throughput and peak memory of a model's forward pass over batches, measured the same way for
a student and its teacher: after a warm-up batch, weights counted once, activations by the peak
growth of CUDA's allocator or the process's resident set."""

from __future__ import annotations

import resource
import sys
import time

import torch

MB = 2**20


def compare_speed(student, teacher, batches: list[dict], device) -> dict:
    """{"student": ..., "teacher": ..., "speedup": student / teacher}: measure_speed of both
    models on the same batches (the teacher's entries only with a teacher)."""
    speed = {"student": measure_speed(student, student, batches, device)}
    if teacher is not None:
        speed["teacher"] = measure_speed(
            lambda ids, mask: teacher.model(input_ids=ids, attention_mask=mask), teacher.model, batches, device
        )
        speed["speedup"] = {k: speed["student"][k] / speed["teacher"][k] for k in ("sequences_per_s", "tokens_per_s")}
    return speed


@torch.inference_mode()
def measure_speed(forward, model, batches: list[dict], device) -> dict:
    """Throughput of forward(input_ids, attention_mask) over the batches, after one warm-up
    batch (allocator, kernel selection and lazily built tables are first-call costs), and its
    peak memory: the weights' bytes plus the peak growth during the timed batches."""
    batches = [(b["input_ids"].to(device), b["attention_mask"].to(device)) for b in batches]
    forward(*batches[0])
    synchronize(device)
    meter = PeakMemory(device)
    with meter:
        start = time.perf_counter()
        for ids, mask in batches:
            forward(ids, mask)
        synchronize(device)
        seconds = time.perf_counter() - start
    sequences = sum(ids.shape[0] for ids, _ in batches)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    weights = tensor_bytes(model.state_dict()) / MB
    return {
        "sequences_per_s": sequences / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
        "batches": len(batches),
        "sequences": sequences,
        "tokens": tokens,
        "weights_mb": weights,
        "activation_peak_mb": meter.growth_mb,
        "peak_memory_mb": weights + meter.growth_mb,
        "memory_measure": meter.measure,
    }


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(state) -> int:
    """Bytes of a state_dict's tensors, each storage once (tied weights), including the packed
    weights of torch's int8 Linear layers, which are not parameters."""
    seen, total = set(), 0

    def add(value):
        nonlocal total
        if isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        elif isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()

    for value in state.values():
        add(value)
    return total


class PeakMemory:
    """Peak memory growth while the block runs, in MB, and `measure`, saying how it was taken.

    CUDA: torch.cuda.max_memory_allocated above what was allocated at the start (exact, for
    torch's allocations). Linux CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above the resident set at the start; memory that the allocator kept
    from earlier batches is reused without growing it, so this can undercount. Elsewhere:
    growth of the lifetime peak (ru_maxrss), 0 when the block stays below an earlier peak.
    """

    def __init__(self, device):
        self.device, self.growth_mb, self.measure = device, 0.0, ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.measure = "CUDA max_memory_allocated growth over the timed batches"
        elif self._reset_linux_peak():
            self.start = _proc_status_kb("VmRSS") * 1024
            self.measure = "process peak RSS growth (Linux VmHWM, reset before timing); may undercount"
        else:
            self.start = _max_rss_bytes()
            self.measure = "growth of the process's lifetime peak RSS (ru_maxrss); 0 if below an earlier peak"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.measure.startswith("process peak RSS"):
            peak = _proc_status_kb("VmHWM") * 1024
        else:
            peak = _max_rss_bytes()
        self.growth_mb = max(peak - self.start, 0) / MB

    @staticmethod
    def _reset_linux_peak() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def _proc_status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
