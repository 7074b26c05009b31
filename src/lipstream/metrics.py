"""Process-wide Prometheus metrics. The server exports the default registry at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IMGPROC_DEVICE_FALLBACKS = Counter(
    "lipstream_imgproc_device_fallbacks",
    "imgproc calls that failed on their device (out of memory, driver error) and were run on the CPU",
    ["op"],
)

SERVER_VIEWERS = Gauge("lipstream_server_viewers", "connected viewers, by transport", ["transport"])
SERVER_FRAMES_SENT = Counter("lipstream_server_frames_sent", "video frames handed to viewers, by transport",
                             ["transport"])

# The real-time core (stream/): sessions and the per-device scheduler.
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
STAGE_SECONDS = Histogram("lipstream_stage_seconds",
                          "time of one call of a pipeline stage: features (one feature pass of a session), "
                          "engine (one batched generate), composite (one compositor call), encode (one "
                          "streamed frame)",
                          ["stage"], buckets=_SECONDS_BUCKETS)
BATCH_FRAMES = Histogram("lipstream_batch_frames", "frames in one engine batch",
                         buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
FIRST_FRAME_SECONDS = Histogram("lipstream_first_frame_seconds",
                                "from the audio that made an utterance's first frame computable to that frame "
                                "being shown", buckets=_SECONDS_BUCKETS)
FRAMES = Counter("lipstream_frames", "frames produced by sessions (rate() gives frames/s), by kind", ["kind"])
DROPPED_FRAMES = Counter("lipstream_dropped_frames",
                         "speech frames shown as the idle frame because their face was not ready in time")
SHED_FRAMES = Counter("lipstream_shed_frames",
                      "speech frames dropped before the engine because they could no longer be ready in time "
                      "(also counted as dropped)")
STALLED_FRAMES = Counter("lipstream_stalled_frames",
                         "frames inside an utterance held (idle frame, silence) because its audio had not arrived")
SCHEDULER_QUEUE_DEPTH = Gauge("lipstream_scheduler_queue_depth", "frames waiting for the engine, by device",
                              ["device"])
ACTIVE_SESSIONS = Gauge("lipstream_active_sessions", "open stream sessions")
