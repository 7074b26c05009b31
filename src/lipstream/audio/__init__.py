"""Speech audio -> MuseTalk per-frame conditioning.

- load: any media file or PCM16 chunks -> float32 [N] mono 16 kHz.
- features: offline whisper features and per-frame windows, [F, 50, 384] for whisper-tiny.
- streaming: the same windows from live audio, frame by frame."""

from lipstream.audio.features import audio_features, frame_windows, num_video_frames, whisper_steps
from lipstream.audio.load import PcmStream, decode_pcm16, load_audio, rms_dbfs
from lipstream.audio.streaming import StreamingFeatures

__all__ = [
    "PcmStream",
    "StreamingFeatures",
    "audio_features",
    "decode_pcm16",
    "frame_windows",
    "load_audio",
    "num_video_frames",
    "rms_dbfs",
    "whisper_steps",
]
