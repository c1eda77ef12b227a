"""ImageNet's layouts and odd files: every accepted validation layout gives the same labels, a folder
that matches none is named with what was expected, odd images become RGB JPEGs, bad ones are named."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.demo_data import generate_demo
from pipeline.imagenet import (
    OFFICIAL_GROUND_TRUTH_HEAD,
    BadImage,
    ShardError,
    jpeg_frame,
    prepare_image,
    scan,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layout") / "demo"
    generate_demo(
        out, num_classes=3, train_per_class=2, val_per_class=2, image_size=32, seed=5, show_progress=False
    )
    return out


def _truth(listing) -> dict[str, str]:
    """Validation file name -> wnid."""
    return {Path(s.rel).name: s.wnid for s in listing.samples["val"]}


def _flatten_val(src: Path) -> tuple[Path, list[tuple[str, str]]]:
    """Copy of ``src`` with val/ flat as ILSVRC2012_val_<n>.JPEG; returns (copy, [(image id, wnid)]),
    the ids in sorted order but deliberately not grouped by class."""
    dst = src.parent / f"{src.name}-flat-{len(list(src.parent.iterdir()))}"
    shutil.copytree(src, dst)
    files = sorted((dst / "val").rglob("*.JPEG"), key=lambda p: p.name[::-1])
    labels = []
    for n, f in enumerate(files, 1):
        image_id = f"ILSVRC2012_val_{n:08d}"
        f.rename(dst / "val" / f"{image_id}.JPEG")
        labels.append((image_id, f.parent.name))
    for d in (dst / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    return dst, labels


def test_class_folder_val_and_class_names(demo: Path) -> None:
    listing = scan(demo)
    assert listing.layout == {"train": "class folders", "val": "class folders"}
    assert listing.wnids == sorted(p.name for p in (demo / "train").iterdir())
    assert len(listing.samples["train"]) == 6 and len(listing.samples["val"]) == 6
    names = dict(line.split(" ", 1) for line in (demo / "LOC_synset_mapping.txt").read_text().splitlines())
    assert listing.class_names == names
    assert all(s.label == listing.wnids.index(s.wnid) for s in listing.samples["val"])


def test_kaggle_flat_val_with_solution_csv(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    rows = [f"{i},{w} 1 2 30 31 {w} 4 4 9 9" for i, w in labels]
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    listing = scan(src)
    assert listing.layout["val"] == "LOC_val_solution.csv"
    assert _truth(listing) == {f"{i}.JPEG": w for i, w in labels}


def test_kaggle_download_nests_images_under_ilsvrc_data(demo: Path, tmp_path: Path) -> None:
    src, labels = _flatten_val(demo)
    kaggle = tmp_path / "imagenet-object-localization-challenge"
    (kaggle / "ILSVRC" / "Data").mkdir(parents=True)
    shutil.move(src, kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    shutil.move(kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_synset_mapping.txt", kaggle)
    rows = [f"{i},{w} 1 2 30 31" for i, w in labels]
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    listing = scan(kaggle)
    assert listing.root == kaggle / "ILSVRC" / "Data" / "CLS-LOC"
    assert _truth(listing) == {f"{i}.JPEG": w for i, w in labels}
    assert listing.class_names[listing.wnids[0]] != listing.wnids[0]  # names found one level up


def _ground_truth(src: Path, labels: list[tuple[str, str]], id_of: dict[str, int]) -> None:
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[w]}\n" for _, w in labels))


def test_devkit_ground_truth_with_mapping_file(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    wnids = sorted({w for _, w in labels})
    id_of = {w: 3 - k for k, w in enumerate(wnids)}  # ids deliberately not in sorted-wnid order
    _ground_truth(src, labels, id_of)
    (src / "ILSVRC2012_mapping.txt").write_text("".join(f"{i} {w}\n" for w, i in id_of.items()))
    listing = scan(src)
    assert listing.layout["val"] == "ILSVRC2012_validation_ground_truth.txt + ILSVRC2012_mapping.txt"
    assert _truth(listing) == {f"{i}.JPEG": w for i, w in labels}


def test_devkit_ground_truth_with_meta_mat(demo: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    src, labels = _flatten_val(demo)
    wnids = sorted({w for _, w in labels})
    id_of = {w: 3 - k for k, w in enumerate(wnids)}
    _ground_truth(src, labels, id_of)
    devkit = src / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    synsets = np.array(
        [(i, w, 0) for w, i in id_of.items()],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")],
    )
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets})
    assert _truth(scan(src)) == {f"{i}.JPEG": w for i, w in labels}


def test_ground_truth_in_synset_mapping_line_order(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    wnids = sorted({w for _, w in labels})
    _ground_truth(src, labels, {w: k + 1 for k, w in enumerate(wnids)})
    listing = scan(src)
    assert "LOC_synset_mapping.txt line order" in listing.layout["val"]
    assert _truth(listing) == {f"{i}.JPEG": w for i, w in labels}


def test_official_ground_truth_is_not_read_in_synset_order(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    ids = OFFICIAL_GROUND_TRUTH_HEAD + [1] * (len(labels) - len(OFFICIAL_GROUND_TRUTH_HEAD))
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    with pytest.raises(ShardError, match="ILSVRC2012_mapping.txt"):
        scan(src)


def test_flat_val_without_labels_names_the_folder_and_the_options(demo: Path) -> None:
    src, _ = _flatten_val(demo)
    with pytest.raises(ShardError) as err:
        scan(src)
    message = str(err.value)
    assert str(src / "val") in message
    assert "LOC_val_solution.csv" in message and "ILSVRC2012_validation_ground_truth.txt" in message


def test_image_without_a_label_row_is_named(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    rows = [f"{i},{w} 1 2 3 4" for i, w in labels[1:]]
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    with pytest.raises(ShardError, match=labels[0][0]):
        scan(src)


def test_ground_truth_count_must_match_the_images(demo: Path) -> None:
    src, labels = _flatten_val(demo)
    (src / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(ShardError, match="1 labels but"):
        scan(src)


def test_folder_matching_no_layout_is_named_with_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.JPEG").write_bytes(b"x")
    with pytest.raises(ShardError) as err:
        scan(tmp_path)
    assert str(tmp_path) in str(err.value) and "train/<wnid>/*.JPEG" in str(err.value)


def test_same_file_name_in_two_classes_gets_two_keys(demo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(demo, src)
    a, b = sorted((src / "train").iterdir())[:2]
    shutil.copy(next(a.iterdir()), a / "0.JPEG")
    shutil.copy(next(b.iterdir()), b / "0.JPEG")
    keys = [s.key for s in scan(src).samples["train"]]
    assert len(keys) == len(set(keys)) and f"{a.name}/0" in keys


# --- odd files -----------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _picture(mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, 48, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (40, 1)), np.tile(x[:40, None], (1, 48)), np.full((40, 48), 90, np.uint8)], -1)
    return Image.fromarray(rgb).convert(mode)


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
        return np.asarray(img, dtype=np.float32)


def test_rgb_jpeg_is_kept_byte_for_byte() -> None:
    data = _encode(_picture(), "JPEG", quality=80)
    assert prepare_image(data) == (data, None)


@pytest.mark.parametrize(
    "mode,fmt,kind",
    [("CMYK", "JPEG", "cmyk"), ("L", "JPEG", "gray"), ("RGB", "PNG", "png"), ("RGBA", "PNG", "png")],
)
def test_odd_images_become_rgb_jpegs_close_to_the_original(mode: str, fmt: str, kind: str) -> None:
    original = _picture(mode)
    data, converted_from = prepare_image(_encode(original, fmt))
    assert converted_from == kind
    expected = np.asarray(Image.open(io.BytesIO(_encode(original, fmt))).convert("RGB"), dtype=np.float32)
    assert np.abs(_rgb(data) - expected).mean() < 3  # quality 95: close to lossless


def test_transparent_png_pixels_become_white() -> None:
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    data, _ = prepare_image(_encode(img, "PNG"))
    assert _rgb(data).mean() > 250


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda good: b"", "empty file"),
        (lambda good: good[: len(good) // 2], "truncated"),
        (lambda good: b"this is not an image at all" * 10, "not an image"),
    ],
)
def test_bad_files_are_refused_with_a_reason(make, reason: str) -> None:
    good = _encode(_picture(), "JPEG", quality=90)
    with pytest.raises(BadImage, match=reason):
        prepare_image(make(good))


def _with_thumbnail() -> bytes:
    """A JPEG whose EXIF block holds a JPEG thumbnail, with its own markers (end-of-image included)."""
    thumb = _encode(_picture().resize((12, 10)), "JPEG", quality=70)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    app1 = b"Exif\x00\x00" + exif.tobytes() + thumb  # not a valid IFD pointer, but real bytes to skip
    body = _encode(_picture(), "JPEG", quality=85)
    segment = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    return body[:2] + segment + body[2:]


JPEG_KINDS = {
    "baseline": lambda: _encode(_picture(), "JPEG", quality=85),
    "progressive": lambda: _encode(_picture(), "JPEG", quality=85, progressive=True),
    "optimized, 4:2:0": lambda: _encode(_picture(), "JPEG", quality=75, optimize=True, subsampling=2),
    "restart markers": lambda: _encode(_picture(), "JPEG", quality=85, restart_marker_blocks=1),
    "EXIF thumbnail": _with_thumbnail,
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_marker_walk_accepts_every_clean_rgb_jpeg(kind: str) -> None:
    data = JPEG_KINDS[kind]()
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # PIL decodes it: the walk must not refuse it
    frame = jpeg_frame(data)
    assert frame is not None and frame.plain_rgb and (frame.height, frame.width) == (40, 48)
    assert prepare_image(data, "markers") == prepare_image(data, "decode") == (data, None)


@pytest.mark.parametrize("mode,components", [("L", 1), ("CMYK", 4)])
def test_marker_walk_reads_the_component_count(mode: str, components: int) -> None:
    frame = jpeg_frame(_encode(_picture(mode), "JPEG"))
    assert frame is not None and frame.components == components and not frame.plain_rgb


@pytest.mark.parametrize("kind", JPEG_KINDS)
@pytest.mark.parametrize("verify", ["markers", "decode"])
def test_every_truncation_is_refused_by_either_check(kind: str, verify: str) -> None:
    data = JPEG_KINDS[kind]()
    for cut in range(1, len(data) - 1, max(1, len(data) // 97)):  # ~100 cuts, header to last byte
        with pytest.raises(BadImage, match="truncated|undecodable|not an image"):
            prepare_image(data[:cut], verify)


def test_marker_inside_the_image_data_defers_to_a_decode() -> None:
    data = bytearray(JPEG_KINDS["baseline"]())
    sos = data.find(b"\xff\xda")
    middle = sos + 12 + (len(data) - sos) // 2
    data[middle : middle + 2] = b"\xff\xc0"  # a second frame header in the middle of the scan
    assert jpeg_frame(bytes(data)) is None
    # Not refused on the walk's word: libjpeg decides, and both checks agree.
    outcomes = set()
    for verify in ("markers", "decode"):
        try:
            outcomes.add(prepare_image(bytes(data), verify))
        except BadImage as err:
            outcomes.add(str(err))
    assert len(outcomes) == 1
