"""`lipstream bench warp-faces`: how the `warp` engine's mouth follows speech on real face photos,
measured with the face mesh on the frames a viewer sees.

Faces (`face_photos`): scikit-image's astronaut (Eileen Collins, NASA, public domain), matplotlib's
Grace Hopper sample (US Navy, public domain) and mahotas's demo portrait of its author Luis Pedro
Coelho (shipped in the MIT-licensed package; used when mahotas is installed, as `install.sh` does).
Each photo is prepared as an avatar the way users prepare theirs (`prepare_avatar`, into a temporary
folder), and speaks the same audio: espeak-ng reading SPEECH with pauses around and between it
(or the synthetic syllables of `bench warp` without espeak-ng, or `--audio FILE`). The frames come
from `render_frames` (features, warp, compositing) and MediaPipe's face mesh reads every one:

  aperture      inner-lip distance (13-14) / the photo's own mouth width
  chin drop     the chin (152) down the face from where it is in the photo, same unit
  envelope      the audio's RMS over each frame's 40 ms

Per face: the Pearson correlation of aperture and envelope at lag 0 (target >= 0.8) and the lag
(frames) where it peaks, and the same correlation over the speaking span only (first to last
audible frame) and over the frames not in silence (in silence the avatar shows its own mouth at rest,
which for a photo with an open smile is far from closed); the correlation of chin drop and aperture
and the chin's drop per unit of aperture; the largest pixel change in the mouth region (lips to
below the chin) over the frames in silence (audio silent for this frame, the next one and the
mouth's SETTLE_MS before it), against the frame the avatar's own crop gives (target 0); jitter (the median
absolute second difference of the aperture over its standard deviation: flicker reads high). It
writes bench/results/warp-faces-<device>-<date>.json and a contact sheet (.jpg, same name) with a
row of mouths over time per face and, under it, the envelope (grey) and the aperture (red)."""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipstream.bench.report import format_table, write_results

FPS = 25
SPEECH = ("Hello! My name is Grace. I am speaking to you from a single photo.",
          "Papa bought five blue boots, and we see the moon.")
PAUSE_S = 0.8  # silence before, between and after the two phrases
TARGET_CORRELATION = 0.8
TILE = 88  # contact sheet: pixels per mouth tile
TILES = 24  # tiles per face, every TILE_STEP frames from the start of the speech
TILE_STEP = 3
PLOT_HEIGHT = 44


def face_photos() -> dict[str, np.ndarray]:
    """The bundled real face photos: name -> uint8 [H, W, 3] BGR."""
    from importlib import resources

    import cv2

    from lipstream.synthetic import astronaut_bgr

    photos = {"astronaut": astronaut_bgr()}
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        photos["grace-hopper"] = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    portrait = resources.files("mahotas.demos") / "data" / "luispedro.jpg"
    photos["luispedro"] = cv2.imdecode(np.frombuffer(portrait.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    return photos


def speech_audio(phrases: tuple[str, ...] = SPEECH) -> tuple[np.ndarray, str]:
    """float32 [N] 16 kHz: the phrases with PAUSE_S of silence before, between and after them, spoken
    by espeak-ng when it is installed, else 2.5 s of synthetic syllables each. Returns (audio, what)."""
    from lipstream.demo import ESPEAK, synthesize_speech
    from lipstream.errors import TextToSpeechError

    pause = np.zeros(round(PAUSE_S * 16000), np.float32)
    try:
        parts = [synthesize_speech(phrase).mono_16k() for phrase in phrases]
        source = f"{ESPEAK} reading {' '.join(phrases)!r}"
    except TextToSpeechError as exc:
        from lipstream.synthetic import speech

        parts = [speech(2.5, seed=seed) for seed in range(1, len(phrases) + 1)]
        source = f"synthetic syllables ({exc})"
    return np.concatenate([pause] + [x for part in parts for x in (part, pause)]), source


@dataclass
class FaceTrack:
    """What the face mesh read on one face's frames, per video frame [F]: aperture and chin drop
    (in the photo's mouth widths; NaN where it found no face), the audio envelope (RMS), the frames
    in silence (bool) and the largest pixel change in the mouth region; plus the mouth tiles."""

    aperture: np.ndarray
    chin: np.ndarray
    envelope: np.ndarray
    silent: np.ndarray
    mouth_change: np.ndarray
    tiles: list[np.ndarray]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def envelope(audio: np.ndarray, frames: int, fps: int = FPS) -> np.ndarray:
    """float32 [frames]: the RMS of each video frame's samples [f*16000//fps, (f+1)*16000//fps)."""
    edges = [f * 16000 // fps for f in range(frames + 1)]
    return np.array([np.sqrt(np.mean(np.square(audio[edges[f]:edges[f + 1]], dtype=np.float64)))
                     for f in range(frames)], np.float32)


def silent_frames(audio: np.ndarray, frames: int, fps: int = FPS) -> np.ndarray:
    """bool [frames]: the samples of the frame, of the frames in the SETTLE_MS before it (the time the
    mouth takes to come to rest) and of the next frame (which it anticipates) are all zero."""
    from lipstream.engines.mouth_features import SETTLE_MS

    quiet = envelope(audio, frames, fps) == 0
    hold = int(np.ceil(SETTLE_MS / 1000 * fps))
    return np.array([quiet[max(f - hold, 0):f + 2].all() for f in range(frames)])


def track_face(avatar, engine, audio: np.ndarray, mesh, fps: int = FPS) -> FaceTrack:
    """Render `audio` on `avatar` (one-frame avatar: a photo) with `engine` and read every frame with
    `mesh` (a lipstream FaceMesh)."""
    import cv2

    from lipstream.avatar.landmarks import CHIN, LOWER_LIP_INNER, MOUTH_LEFT, MOUTH_RIGHT, UPPER_LIP_INNER
    from lipstream.stream.render import render_frames

    rest = mesh.detect(avatar.frames[0])
    if rest is None:
        raise RuntimeError(f"{avatar.name}: the face mesh finds no face in the photo")
    across = rest[MOUTH_RIGHT] - rest[MOUTH_LEFT]
    width = float(np.hypot(*across))
    down = np.array([-across[1], across[0]]) / width
    lips = rest[[MOUTH_LEFT, MOUTH_RIGHT, UPPER_LIP_INNER, LOWER_LIP_INNER, CHIN]]
    (x0, y0), (x1, y1) = lips.min(0), lips.max(0)
    box = (slice(max(int(y0 - 0.2 * width), 0), int(y1 + 0.15 * width)),
           slice(max(int(x0 - 0.25 * width), 0), int(x1 + 0.25 * width)))
    centre = (rest[UPPER_LIP_INNER] + rest[CHIN]) / 2
    half = int(0.9 * width)
    # the avatar's own crops through the same compositing: what every frame shows without mouth motion
    cycle = np.zeros(len(avatar) * 16000 // fps + 16000 // fps, np.float32)
    still = np.concatenate([np.asarray(b) for b in render_frames(avatar, engine, cycle, fps=fps, batch_size=8)])
    aperture, chin, change, tiles = [], [], [], []
    for batch in render_frames(avatar, engine, audio, fps=fps, batch_size=8):
        for frame in np.asarray(batch):
            k = len(aperture)
            own = still[k % len(avatar)]
            change.append(int(np.abs(frame[box].astype(np.int16) - own[box]).max()))
            points = mesh.detect(frame)
            if points is None:
                aperture.append(np.nan)
                chin.append(np.nan)
            else:
                aperture.append(float(np.hypot(*(points[LOWER_LIP_INNER] - points[UPPER_LIP_INNER]))) / width)
                chin.append(float((points[CHIN] - rest[CHIN]) @ down) / width)
            cx, cy = np.round(centre).astype(int)
            tile = frame[max(cy - half, 0):cy + half, max(cx - half, 0):cx + half]
            tiles.append(cv2.resize(tile, (TILE, TILE), interpolation=cv2.INTER_AREA))
    count = len(aperture)
    return FaceTrack(np.array(aperture), np.array(chin), envelope(audio, count, fps), silent_frames(audio, count, fps),
                     np.array(change), tiles)


def face_metrics(track: FaceTrack, rest_aperture: float) -> dict:
    """The figures of one face (see the module doc)."""
    lags = {lag: _pearson(track.aperture[max(lag, 0):len(track.aperture) + min(lag, 0)],
                          track.envelope[max(-lag, 0):len(track.envelope) - max(lag, 0)])
            for lag in range(-4, 5)}
    best = max((lag for lag in lags if np.isfinite(lags[lag])), key=lambda lag: lags[lag], default=0)
    opening = track.aperture - rest_aperture
    ok = np.isfinite(opening) & np.isfinite(track.chin) & (opening > 0.02)
    slope = float(np.polyfit(opening[ok], track.chin[ok], 1)[0]) if ok.sum() > 2 else float("nan")
    found = np.isfinite(track.aperture)
    audible = np.flatnonzero(track.envelope > 0)
    speaking = slice(audible[0], audible[-1] + 1) if audible.size else slice(0, 0)
    second = np.abs(np.diff(track.aperture[found], 2))
    return {"frames": int(track.aperture.size), "face_found": float(found.mean()),
            "aperture_envelope_r": lags[0], "best_lag_frames": int(best), "best_lag_r": lags[best],
            "speaking_r": _pearson(track.aperture[speaking], track.envelope[speaking]),
            "unsilent_r": _pearson(track.aperture[~track.silent], track.envelope[~track.silent]),
            "chin_aperture_r": _pearson(track.chin, track.aperture), "chin_per_aperture": slope,
            "max_aperture": float(np.nanmax(track.aperture)), "max_chin_drop": float(np.nanmax(track.chin)),
            "silent_frames": int(track.silent.sum()),
            "silent_mouth_change": int(track.mouth_change[track.silent].max()) if track.silent.any() else None,
            "jitter": float(np.median(second) / max(np.nanstd(track.aperture), 1e-9)) if second.size else None}


def contact_sheet(named_tracks: list[tuple[str, FaceTrack]], start: int) -> np.ndarray:
    """uint8 BGR image: per face a row of TILES mouth tiles, one every TILE_STEP frames from frame
    `start`, over a plot of the envelope (grey) and the aperture (red) across the same frames."""
    import cv2

    rows = []
    span = TILES * TILE_STEP
    for name, track in named_tracks:
        picks = [min(start + i * TILE_STEP, len(track.tiles) - 1) for i in range(TILES)]
        strip = np.concatenate([track.tiles[k] for k in picks], axis=1)
        cv2.putText(strip, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        plot = np.full((PLOT_HEIGHT, strip.shape[1], 3), 24, np.uint8)
        frames = np.arange(start, min(start + span, len(track.tiles)))
        xs = ((frames - start + 0.5) * TILE / TILE_STEP).astype(np.int32)
        for values, colour in ((track.envelope, (160, 160, 160)), (track.aperture, (60, 60, 230))):
            v = np.nan_to_num(values[frames], nan=0.0)
            v = v / max(float(np.nanmax(values)), 1e-9)
            ys = (PLOT_HEIGHT - 3 - v * (PLOT_HEIGHT - 6)).astype(np.int32)
            cv2.polylines(plot, [np.stack([xs, ys], 1)], False, colour, 1, cv2.LINE_AA)
        rows += [strip, plot]
    return np.concatenate(rows, axis=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--faces", nargs="+", default=None, help="which photos (default: all bundled ones)")
    parser.add_argument("--audio", default=None, metavar="FILE",
                        help="speech to use (default: espeak-ng reading a fixed text, with pauses)")
    parser.add_argument("--out-dir", default=None, help="where to write the JSON and the sheet (default bench/results)")


def run(args: argparse.Namespace) -> int:
    import cv2

    from lipstream.audio.load import load_audio
    from lipstream.avatar.landmarks import LOWER_LIP_INNER, MOUTH_LEFT, MOUTH_RIGHT, UPPER_LIP_INNER, FaceMesh
    from lipstream.avatar.prepare import prepare_avatar
    from lipstream.engines.mouth_features import SETTLE_MS
    from lipstream.engines.warp import WarpEngine

    audio, source = (load_audio(args.audio), f"file {args.audio}") if args.audio else speech_audio()
    print(f"audio: {source}, {audio.shape[0] / 16000:.1f} s", flush=True)
    photos = face_photos()
    names = args.faces or list(photos)
    engine = WarpEngine()
    rows, tracks = [], []
    with tempfile.TemporaryDirectory(prefix="lipstream-warp-faces-") as folder, FaceMesh() as mesh:
        for name in names:
            photo = photos.get(name, f"unknown face (choose from {', '.join(photos)})")
            if isinstance(photo, str):
                print(f"{name}: skipped, {photo}", flush=True)
                continue
            path = Path(folder) / f"{name}.png"
            cv2.imwrite(str(path), photo)
            avatar = prepare_avatar(name, image=path, root=folder, latents=False, progress=False)
            rest = mesh.detect(avatar.frames[0])
            rest_aperture = float(np.hypot(*(rest[LOWER_LIP_INNER] - rest[UPPER_LIP_INNER]))
                                  / np.hypot(*(rest[MOUTH_RIGHT] - rest[MOUTH_LEFT])))
            print(f"{name}: rendering and reading {audio.shape[0] * FPS // 16000} frames ...", flush=True)
            track = track_face(avatar, engine, audio, mesh)
            rows.append({"face": name, "rest_aperture": rest_aperture, **face_metrics(track, rest_aperture)})
            tracks.append((name, track))
    print(format_table(["Face", "aperture~envelope r (lag 0)", "best lag (frames)", "r speaking", "r unsilent",
                        "chin~aperture r",
                        "chin per aperture", "max chin drop", "silent frames", "silent mouth change", "jitter"],
                       [[r["face"], r["aperture_envelope_r"], r["best_lag_frames"], r["speaking_r"], r["unsilent_r"],
                         r["chin_aperture_r"],
                         r["chin_per_aperture"], r["max_chin_drop"], r["silent_frames"], r["silent_mouth_change"],
                         r["jitter"]] for r in rows]))
    for r in rows:
        verdict = "met" if r["aperture_envelope_r"] >= TARGET_CORRELATION else "MISSED"
        print(f"{r['face']}: aperture~envelope r = {r['aperture_envelope_r']:.3f} vs target >= "
              f"{TARGET_CORRELATION}: {verdict}; mouth change in silence: {r['silent_mouth_change']}")
    settings = {"fps": FPS, "audio": source, "seconds": audio.shape[0] / 16000, "settle_ms": SETTLE_MS,
                "opencv": cv2.__version__, "numpy": np.__version__}
    path = write_results("warp-faces", "cpu", settings, rows, Path(args.out_dir) if args.out_dir else None)
    if tracks:
        start = int(np.argmax(tracks[0][1].envelope > 0))
        sheet = path.with_suffix(".jpg")
        cv2.imwrite(str(sheet), contact_sheet(tracks, start), [cv2.IMWRITE_JPEG_QUALITY, 85])
        print(f"contact sheet: {sheet}")
    print(f"results written to {path}")
    return 0
