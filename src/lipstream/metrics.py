"""Process-wide Prometheus metrics. The server exports the default registry at /metrics."""

from __future__ import annotations

from prometheus_client import Counter

IMGPROC_DEVICE_FALLBACKS = Counter(
    "lipstream_imgproc_device_fallbacks",
    "imgproc calls that failed on their device (out of memory, driver error) and were run on the CPU",
    ["op"],
)
