"""What an ImageNet download looks like: its folder layouts, its labels and its odd files.

Layouts, detected automatically (docs/data.md has the full list):

- images root: ``<source>`` when it holds ``train/``, else ``<source>/ILSVRC/Data/CLS-LOC`` (the Kaggle
  download, ``imagenet-object-localization-challenge``);
- training: ``train/<wnid>/*.JPEG``; the class folders, sorted, are the classes in label order;
- validation, the first that matches:

  1. class folders, ``val/<wnid>/*.JPEG``;
  2. flat ``val/*.JPEG`` with ``LOC_val_solution.csv`` (Kaggle: ``ImageId,PredictionString``, the
     first token of ``PredictionString`` is the wnid);
  3. flat ``val/*.JPEG`` with ``ILSVRC2012_validation_ground_truth.txt`` (the devkit: one 1-based
     ILSVRC2012 id per line, for the files in sorted name order), the ids mapped to wnids by
     ``ILSVRC2012_mapping.txt`` (``<id> <wnid>`` lines), else the devkit's ``meta.mat`` (when scipy
     is installed), else the line order of ``LOC_synset_mapping.txt``.

Metadata files are looked up in ``<source>``, the images root, ``<root>/val`` and
``<source>/ILSVRC2012_devkit_t12/data``, first match wins. Class names come from
``LOC_synset_mapping.txt`` when present.

Odd files (:func:`prepare_image`): real ImageNet holds a PNG and about two dozen CMYK JPEGs under
``.JPEG`` names, and grayscale JPEGs. They are re-encoded once, here, as RGB JPEGs; every normal RGB
JPEG is kept byte for byte. Empty, truncated and undecodable files raise :class:`BadImage`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.storage import list_dir

log = logging.getLogger(__name__)
Bad = list[dict[str, str]]

SPLITS = ("train", "val")
#: Files with these suffixes (any case) are images; everything else under train/ and val/ is ignored
#: and listed in the manifest. A PNG or CMYK file under a .JPEG name is found by its content.
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12/data")
SYNSETS = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
ID_MAPPING = "ILSVRC2012_mapping.txt"
META_MAT = "meta.mat"
#: The first five ids of the official ILSVRC2012 validation ground truth. Its ids are not in
#: LOC_synset_mapping.txt order (id 1 is n02119789), so that order is refused for this file.
OFFICIAL_GROUND_TRUTH_HEAD = [490, 361, 171, 822, 297]
#: Re-encoding quality for the odd files (4:4:4 chroma): close to lossless, done once per file.
JPEG_QUALITY = 95

EXPECTED = (
    "expected <source>/train/<wnid>/*.JPEG (or the Kaggle download's <source>/ILSVRC/Data/CLS-LOC/train/...) "
    "and validation images either in class folders val/<wnid>/*.JPEG, or flat in val/ with "
    f"{VAL_SOLUTION}, or flat with {GROUND_TRUTH} plus {ID_MAPPING} (or {SYNSETS}); see docs/data.md"
)


class ShardError(RuntimeError):
    """The source folder cannot be sharded. The message names the path and what to do."""


class BadImage(ValueError):
    """A file is empty, truncated or not a decodable image. The message is the reason."""


@dataclass(frozen=True)
class Sample:
    """One image found in the source folder.

    Attributes:
        path: absolute path of the file.
        rel: path relative to the images root, with ``/`` separators (``train/n01440764/x.JPEG``).
        wnid, label: its class and the class index (sorted wnid order).
        size, mtime_ns: from ``stat``, so a changed input changes the shard plan.
    """

    path: str
    rel: str
    wnid: str
    label: int
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """The WebDataset key: the path inside the split without suffix, with no dots (keys end at
        the first dot). Unique within a split, unlike the bare file name."""
        inner = self.rel.split("/", 1)[1]
        return inner.rsplit(".", 1)[0].replace(".", "_")


@dataclass(frozen=True)
class Listing:
    """Everything :func:`scan` found.

    Attributes:
        root: the images root (holding ``train/`` and ``val/``).
        wnids: classes in label order.
        class_names: wnid -> human name (the wnid itself when no names file is found).
        samples: split -> images, sorted by ``rel``.
        ignored: non-image files under ``train/`` and ``val/``, relative to ``root``.
        layout: split -> how its labels were read (recorded in the manifest).
        bad: ``{"path", "reason"}`` of unusable files (:func:`~pipeline.storage.unusable`), in the manifest.
    """

    root: Path
    wnids: list[str]
    class_names: dict[str, str]
    samples: dict[str, list[Sample]]
    ignored: list[str]
    layout: dict[str, str]
    bad: list[dict[str, str]] = field(default_factory=list)


def _is_image(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES  # os.path.splitext's rule, 3x faster


def _samples(
    root: Path, files: list[os.DirEntry], wnid_of: dict[str, str], labels: dict[str, int]
) -> list[Sample]:
    out = []
    # Every entry of one listing shares its folder: its path relative to the root, computed once.
    prefix = {}
    for e in files:
        st = e.stat()
        wnid = wnid_of[e.name]
        folder = e.path[: len(e.path) - len(e.name)]
        if folder not in prefix:
            prefix[folder] = Path(folder).relative_to(root).as_posix() + "/"
        out.append(Sample(e.path, prefix[folder] + e.name, wnid, labels[wnid], st.st_size, st.st_mtime_ns))
    return out


def _class_folders(
    root: Path, split: str, labels: dict[str, int], bad: Bad
) -> tuple[list[Sample], list[str]]:
    """Images and other files of ``<root>/<split>/<wnid>/`` (not split/ itself); unusable ones to ``bad``."""
    top, dirs = list_dir(root / split, bad, root)
    for d in dirs:
        if d.name not in labels:
            raise ShardError(f"{d.path}: class {d.name} is in {split} but not in train")

    def one(d: os.DirEntry) -> tuple[list[Sample], list[str]]:
        files, subdirs = list_dir(Path(d.path), bad, root)  # a list extends atomically across threads
        images, other = [], [e.path for e in subdirs]
        for e in files:
            (images if _is_image(e.name) else other).append(e)
        other = [e if isinstance(e, str) else e.path for e in other]
        return _samples(root, images, {e.name: d.name for e in images}, labels), other

    # Listing 1.3 M files is latency-bound on network storage: a few threads hide it. More threads
    # than cores only fight over the GIL on a local disk (8 threads were 1.8x slower on 2 cores).
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(one, dirs))
    samples = [s for images, _ in parts for s in images]
    ignored = [
        Path(p).relative_to(root).as_posix() for p in [e.path for e in top] + [p for _, o in parts for p in o]
    ]
    return samples, ignored


def _find(names: list[str], dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def read_class_names(path: Path | None, wnids: list[str]) -> dict[str, str]:
    """wnid -> human name from a ``LOC_synset_mapping.txt`` (``<wnid> <names>`` lines), else the wnid."""
    names = {w: w for w in wnids}
    if path is not None:
        for line in path.read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid in names:
                names[wnid] = name.strip() or wnid
    return names


def _kaggle_labels(path: Path) -> dict[str, str]:
    """ImageId -> wnid from ``LOC_val_solution.csv``."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise ShardError(
                f"{path}: expected the columns ImageId,PredictionString, got {reader.fieldnames}"
            )
        out = {}
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise ShardError(f"{path}: image {row['ImageId']} has an empty PredictionString")
            out[row["ImageId"]] = tokens[0]
    return out


def _id_to_wnid(meta_dirs: list[Path], ground_truth: Path, ids: list[int]) -> tuple[dict[int, str], str]:
    """ILSVRC2012 id -> wnid, and where the mapping came from."""
    if mapping := _find([ID_MAPPING], meta_dirs):
        out = {}
        for n, line in enumerate(mapping.read_text().splitlines(), 1):
            if line.strip():
                parts = line.split()
                if len(parts) < 2 or not parts[0].isdigit():
                    raise ShardError(f"{mapping}:{n}: expected '<ilsvrc_id> <wnid>', got {line!r}")
                out[int(parts[0])] = parts[1]
        return out, mapping.name
    if meta := _find([META_MAT], meta_dirs):
        try:
            from scipy.io import loadmat
        except ImportError:
            log.warning(
                "%s found but scipy is not installed; write %s instead (docs/data.md)", meta, ID_MAPPING
            )
        else:
            synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
            ids_, wnids = synsets["ILSVRC2012_ID"], synsets["WNID"]
            return {int(i): str(w) for i, w in zip(ids_.ravel(), wnids.ravel(), strict=True)}, meta.name
    if synsets := _find([SYNSETS], meta_dirs):
        if ids[: len(OFFICIAL_GROUND_TRUTH_HEAD)] == OFFICIAL_GROUND_TRUTH_HEAD:
            raise ShardError(
                f"{ground_truth} is the official ILSVRC2012 ground truth, whose ids are not in "
                f"{synsets.name} order (id 1 is n02119789): put {ID_MAPPING} ('<id> <wnid>' lines, "
                "exported from the devkit's meta.mat as docs/data.md shows) next to it"
            )
        wnids = [line.split()[0] for line in synsets.read_text().splitlines() if line.strip()]
        log.warning(
            "reading %s ids as line numbers of %s (no %s found)", ground_truth.name, synsets, ID_MAPPING
        )
        return {i: w for i, w in enumerate(wnids, 1)}, f"{synsets.name} line order"
    raise ShardError(
        f"{ground_truth} holds ILSVRC2012 ids but no id-to-wnid mapping was found in "
        f"{', '.join(map(str, meta_dirs))}: add {ID_MAPPING} ('<id> <wnid>' lines)"
    )


def _flat_val(
    root: Path, files: list[os.DirEntry], labels: dict[str, int], meta_dirs: list[Path]
) -> tuple[list[Sample], str]:
    images = [e for e in files if _is_image(e.name)]
    val = root / "val"
    if solution := _find([VAL_SOLUTION], meta_dirs):
        by_id = _kaggle_labels(solution)
        wnid_of, unlabelled = {}, []
        for e in images:
            image_id = os.path.splitext(e.name)[0]
            if image_id in by_id:
                wnid_of[e.name] = by_id[image_id]
            else:
                unlabelled.append(e.name)
        if unlabelled:
            raise ShardError(
                f"{val}: {len(unlabelled)} image(s) have no row in {solution}, e.g. {unlabelled[:5]}"
            )
        if len(by_id) > len(images):
            log.warning("%s labels %d images, %s holds %d", solution, len(by_id), val, len(images))
        how = solution.name
    elif truth := _find([GROUND_TRUTH], meta_dirs):
        ids = [int(line) for line in truth.read_text().split()]
        if len(ids) != len(images):
            raise ShardError(
                f"{truth} has {len(ids)} labels but {val} holds {len(images)} images; the labels follow "
                "the sorted file names, so both must be complete"
            )
        to_wnid, source = _id_to_wnid(meta_dirs, truth, ids)
        missing = sorted(set(ids) - set(to_wnid))
        if missing:
            raise ShardError(f"{truth}: id(s) {missing[:10]} are not in {source}")
        wnid_of = {e.name: to_wnid[i] for e, i in zip(images, ids, strict=True)}
        how = f"{truth.name} + {source}"
    else:
        raise ShardError(
            f"{val} holds {len(images)} images and no class folders, and no {VAL_SOLUTION} or {GROUND_TRUTH} "
            f"was found in {', '.join(map(str, meta_dirs))}: {EXPECTED}"
        )
    unknown = sorted({w for w in wnid_of.values() if w not in labels})
    if unknown:
        raise ShardError(f"{val}: labels name class(es) {unknown[:10]} that train does not hold ({how})")
    return _samples(root, images, wnid_of, labels), how


def scan(source: str | Path) -> Listing:
    """Find the classes, images and labels of an ImageNet download in any accepted layout.

    Raises:
        ShardError: the folder matches no layout (the message names the path and what was
            expected), a label file is malformed, or a split holds no image.
    """
    source = Path(source).absolute()
    if not source.is_dir():
        raise ShardError(
            f"data source {source} does not exist (or is not a folder); set data.root: {EXPECTED}"
        )
    root = next((r for r in (source, source / KAGGLE_ROOT) if (r / "train").is_dir()), None)
    if root is None:
        raise ShardError(f"{source} matches no ImageNet layout (no train/ folder): {EXPECTED}")
    if not (root / "val").is_dir():
        raise ShardError(f"{root / 'val'} is missing: {EXPECTED}")
    meta_dirs = list(dict.fromkeys([source, root, root / "val", source / DEVKIT_DATA]))
    wnids = [e.name for e in list_dir(root / "train")[1]]
    if not wnids:
        raise ShardError(f"{root / 'train'} holds no class folders: {EXPECTED}")
    labels = {w: i for i, w in enumerate(wnids)}

    samples, ignored, layout, bad = {}, [], {}, []
    samples["train"], ignored_train = _class_folders(root, "train", labels, bad)
    layout["train"] = "class folders"
    if list_dir(root / "val")[1]:
        samples["val"], ignored_val = _class_folders(root, "val", labels, bad)
        layout["val"] = "class folders"
    else:
        val_files, _ = list_dir(root / "val", bad, root)
        samples["val"], layout["val"] = _flat_val(root, val_files, labels, meta_dirs)
        ignored_val = [f"val/{e.name}" for e in val_files if not _is_image(e.name)]
    ignored = sorted(ignored_train + ignored_val)
    for split in SPLITS:
        if not samples[split]:
            raise ShardError(
                f"{root / split} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): {EXPECTED}"
            )
        samples[split].sort(key=lambda s: s.rel)
        counts = Counter(s.key for s in samples[split])  # O(n): 1.28 M names in about a second
        if len(counts) != len(samples[split]):
            dup = sorted(k for k, n in counts.items() if n > 1)[:5]
            raise ShardError(f"{root / split}: several files share a name up to the suffix, e.g. {dup}")
    if bad := sorted(bad, key=lambda b: b["path"]):
        log.warning("%d unusable file(s) under %s, listed in the manifest: %s", len(bad), root, bad[:3])
    names = read_class_names(_find([SYNSETS], meta_dirs), wnids)
    log.info(
        "%s: %d classes, %d train and %d val images (val labels: %s)",
        root,
        len(wnids),
        len(samples["train"]),
        len(samples["val"]),
        layout["val"],
    )
    return Listing(root, wnids, names, samples, ignored, layout, bad)


#: How :func:`prepare_image` checks an RGB JPEG it keeps verbatim (``data.shards.verify``).
VERIFY_MODES = ("markers", "decode")
#: Start-of-frame markers (every JPEG coding process) and the segments allowed between two scans.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_BETWEEN_SCANS = frozenset({0xC4, 0xCC, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
#: A marker inside entropy-coded data: 0xFF followed by anything but a stuffed zero, a restart
#: marker (0xD0-0xD7) or another 0xFF (fill).
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's frame header says: coding process, precision, size and colour components."""

    sof: int
    precision: int
    height: int
    width: int
    components: int

    @property
    def plain_rgb(self) -> bool:
        """Baseline, extended or progressive Huffman, 8-bit, three components: every reader decodes it
        to RGB the same way, so it is stored verbatim."""
        return self.sof in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components == 3


def _u16(data: bytes, i: int) -> int:
    return data[i] << 8 | data[i + 1]


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """A JPEG's frame header, if its marker structure is clean; None for anything else.

    Reads markers only, no pixels: every header segment lies inside the file, a frame header
    precedes the first scan, the entropy-coded data holds no marker that does not belong there
    (restart markers; between scans, the segments a progressive JPEG puts there) and an
    end-of-image marker follows it (bytes after it are allowed). A truncated file fails the last
    check. None does not mean unreadable: libjpeg tolerates some damage, so :func:`prepare_image`
    then lets a decode decide.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    i, frame = 2, None
    while True:  # the header, up to and including the first scan's header
        if i + 4 > n or data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            return None
        length = _u16(data, i + 2)
        if length < 2 or i + 2 + length > n:
            return None
        if marker in _SOF and length >= 8:
            frame = JpegFrame(marker, data[i + 4], _u16(data, i + 5), _u16(data, i + 7), data[i + 9])
        i += 2 + length
        if marker == 0xDA:
            break
    while frame is not None:  # the entropy-coded data and whatever lies between scans
        found = _MARKER_IN_SCAN.search(data, i)
        if found is None:
            return None
        i = found.start()
        marker = data[i + 1]
        if marker == 0xD9:
            return frame
        if marker not in _BETWEEN_SCANS or i + 4 > n:
            return None
        length = _u16(data, i + 2)
        if length < 2 or i + 2 + length > n:
            return None
        i += 2 + length
    return None


def prepare_image(data: bytes, verify: str = "markers") -> tuple[bytes, str | None]:
    """The bytes to store for one image file, and what it was converted from (None: kept verbatim).

    An RGB JPEG is kept byte for byte. A PNG (or any other format) under a .JPEG name, a CMYK JPEG
    and a grayscale JPEG are decoded and re-encoded as RGB JPEG at quality 95, 4:4:4, once: every
    reader of the shards (PIL, torchvision.io, DALI/nvJPEG, the reduced-size decode path) then
    sees plain RGB JPEGs, and the CMYK conversion (Adobe's inverted CMYK) is done by one decoder
    rather than by each reader its own way.

    Args:
        data: the file's bytes.
        verify: how a JPEG kept verbatim is checked. ``markers``: its marker structure
            (:func:`jpeg_frame`: truncation, damaged headers, stray markers), no pixels decoded.
            A JPEG whose structure is not clean is decoded, and only refused if that fails.
            ``decode``: a decode at 1/8 scale (libjpeg still reads all the entropy-coded data),
            about 10x slower, which also catches damage that breaks libjpeg without breaking the
            structure. Converted files are always decoded in full.

    Raises:
        BadImage: empty, truncated, or not decodable; the message is the reason.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty file")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if verify == "markers" and (frame := jpeg_frame(data)) is not None and frame.plain_rgb:
        return data, None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
            if fmt == "JPEG" and mode == "RGB":
                # At 1/8 scale libjpeg still reads every byte of entropy-coded data, which is where
                # damage shows, while skipping most of the inverse DCT and the colour conversion.
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                return data, None
            img.load()
            if fmt == "JPEG":
                kind = {"CMYK": "cmyk", "L": "gray"}.get(mode, mode.lower())
            else:
                kind = (fmt or "unknown").lower()  # png, and anything else under a .JPEG name
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white, not black
            else:
                rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImage("not an image (no decoder recognises its content)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        kind = "truncated" if "truncated" in str(err).lower() else "undecodable"
        raise BadImage(f"{kind}: {err}") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return out.getvalue(), kind
