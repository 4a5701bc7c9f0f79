"""COCO-format annotations: strict schema validation, category mapping, lenient data repair.

    dataset = load_coco("instances_train.json", "images/", for_training=True)
    dataset.categories.num_classes        # contiguous labels 0..C-1
    dataset.categories.state_dict()       # keep in checkpoints; CategoryMap.from_state_dict(...)
    dataset.records[i].annotations        # validated, repaired annotations of image i
    print(dataset.problems.summary())

Two kinds of failure, on purpose:
- a malformed json (a field of the wrong type or shape, a dangling id) raises `CocoFormatError`
  before training, naming the file and the field (`annotations[12].bbox: expected 4 numbers,
  got 3 in /path/instances_train.json`);
- bad data (missing, corrupt or mis-sized image files, degenerate polygons, zero-area boxes, bad
  RLE, images without annotations) is reported once per file to a `DataProblems` collector and
  skipped or repaired, so that the pipelines downstream only ever see loadable samples.
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from dimaskdino._optional import LazyModule
from dimaskdino.data import problems as P
from dimaskdino.data.problems import DataProblems
from dimaskdino.data.rasterize import polygon_area

mask_utils = LazyModule("pycocotools.mask", "COCO annotations (RLE masks)")  # extra "data"


class CocoFormatError(ValueError):
    """The annotation json does not follow the COCO schema; the message names file and field."""


# ---------------------------------------------------------------------------------------------
# Categories
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryMap:
    """Original COCO category ids <-> contiguous labels 0..C-1 (in the json's `categories` order
    sorted by id, as Detectron2 does)."""

    coco_ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "_label_of", {cid: i for i, cid in enumerate(self.coco_ids)})

    @property
    def num_classes(self) -> int:
        return len(self.coco_ids)

    def __contains__(self, coco_id: int) -> bool:
        return coco_id in self._label_of

    def label(self, coco_id: int) -> int:
        return self._label_of[coco_id]

    def coco_id(self, label: int) -> int:
        return self.coco_ids[label]

    def labels_to_coco_ids(self, labels) -> np.ndarray:
        """Vectorized label -> original category id (for predictions)."""
        return np.asarray(self.coco_ids, dtype=np.int64)[np.asarray(labels, dtype=np.int64)]

    def state_dict(self) -> dict:
        return {"coco_ids": list(self.coco_ids), "names": list(self.names)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CategoryMap":
        return cls(tuple(int(i) for i in state["coco_ids"]), tuple(str(n) for n in state["names"]))


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """One validated instance. Exactly one of `polygons` / `rle` is set.

    polygons: parts, each a (K, 2) float64 array of (x, y) in original image pixels, K >= 3 and
    non-zero area. rle: a compressed pycocotools RLE dict of the image size.
    """

    ann_id: int
    label: int
    iscrowd: bool
    bbox: tuple[float, float, float, float]  # xywh as in the json (training recomputes boxes)
    polygons: list[np.ndarray] | None = None
    rle: dict | None = None


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    path: str
    height: int
    width: int
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def num_instances(self) -> int:
        """Non-crowd instances (the ones training uses)."""
        return sum(not a.iscrowd for a in self.annotations)


@dataclass
class CocoDataset:
    json_path: str
    image_root: str
    categories: CategoryMap
    records: list[ImageRecord]
    problems: DataProblems

    def __len__(self) -> int:
        return len(self.records)


# ---------------------------------------------------------------------------------------------
# Image headers (size and a cheap integrity check without decoding)
# ---------------------------------------------------------------------------------------------


class ImageFileError(Exception):
    pass


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg" / "png" / "other"
    height: int | None
    width: int | None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f) -> tuple[int, int]:
    """Walk JPEG marker segments up to the frame header; returns (height, width)."""
    f.seek(2)
    while True:
        if f.read(1) != b"\xff":
            raise ImageFileError("bad JPEG marker (corrupt header)")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes before a marker
            marker = f.read(1)
        if not marker:
            raise ImageFileError("no JPEG frame header before the end of the file")
        m = marker[0]
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
            continue  # markers without a length field
        if m in (0xD9, 0xDA):
            raise ImageFileError("no JPEG frame header before the image data")
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            raise ImageFileError("truncated JPEG header")
        (length,) = struct.unpack(">H", length_bytes)
        if m in _JPEG_SOF:
            data = f.read(5)
            if len(data) < 5:
                raise ImageFileError("truncated JPEG frame header")
            _, h, w = struct.unpack(">BHH", data)
            if h == 0 or w == 0:
                raise ImageFileError(f"JPEG frame header with size {h}x{w}")
            return h, w
        if length < 2:
            raise ImageFileError("bad JPEG segment length")
        f.seek(length - 2, os.SEEK_CUR)


def read_image_header(path: str) -> ImageHeader:
    """Format and size of an image file from its header; raises ImageFileError when the file is
    not a readable image. JPEG files must also end with the end-of-image marker: a truncated JPEG
    makes DALI's decoder fail the whole pipeline, so it has to be caught here."""
    with open(path, "rb") as f:
        head = f.read(32)
        if head[:3] == b"\xff\xd8\xff":
            h, w = _jpeg_size(f)
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64))
            tail = f.read().rstrip(b"\x00\r\n \t")
            if not tail.endswith(b"\xff\xd9"):
                raise ImageFileError("truncated JPEG (no end-of-image marker)")
            return ImageHeader("jpeg", h, w)
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            if len(head) < 24 or head[12:16] != b"IHDR":
                raise ImageFileError("truncated PNG header")
            w, h = struct.unpack(">II", head[16:24])
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 12))
            if b"IEND" not in f.read():
                raise ImageFileError("truncated PNG (no IEND chunk)")
            return ImageHeader("png", h, w)
        if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        ):
            return ImageHeader("other", None, None)  # DALI decodes these; size not checked
    raise ImageFileError("not a JPEG, PNG, BMP, TIFF or WebP file")


# ---------------------------------------------------------------------------------------------
# Schema validation helpers: each raises CocoFormatError naming the field
# ---------------------------------------------------------------------------------------------


class _Validator:
    def __init__(self, json_path: str):
        self.json_path = json_path

    def fail(self, where: str, message: str):
        raise CocoFormatError(f"{where}: {message} in {self.json_path}")

    def get(self, obj: dict, key: str, where: str, required: bool = True) -> Any:
        if key not in obj:
            if required:
                self.fail(f"{where}.{key}", "missing")
            return None
        return obj[key]

    def integer(self, value, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            self.fail(where, f"expected an integer, got {value!r}")
        return int(value)

    def numbers(self, value, where: str, count: int | None = None) -> np.ndarray:
        """A list of finite numbers as float64 (vectorized check; COCO has ~40M coordinates)."""
        if not isinstance(value, (list, tuple)):
            self.fail(where, f"expected a list of numbers, got {type(value).__name__}")
        if count is not None and len(value) != count:
            self.fail(where, f"expected {count} numbers, got {len(value)}")
        arr = np.asarray(value) if value else np.zeros(0)
        if arr.ndim != 1 or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
            bad = next((v for v in value if isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v)), value)
            self.fail(where, f"expected finite numbers, got {bad!r}")
        return arr.astype(np.float64)

    def list_of_dicts(self, data: dict, key: str) -> list[dict]:
        value = data.get(key)
        if not isinstance(value, list):
            self.fail(key, "missing" if value is None else f"expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                self.fail(f"{key}[{i}]", f"expected an object, got {type(item).__name__}")
        return value


def _parse_categories(v: _Validator, data: dict) -> CategoryMap:
    cats = v.list_of_dicts(data, "categories")
    if not cats:
        v.fail("categories", "empty: at least one category is needed")
    entries = []
    for i, c in enumerate(cats):
        cid = v.integer(v.get(c, "id", f"categories[{i}]"), f"categories[{i}].id")
        name = c.get("name", str(cid))
        if not isinstance(name, str):
            v.fail(f"categories[{i}].name", f"expected a string, got {name!r}")
        entries.append((cid, name, i))
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        v.fail("categories", f"duplicate category id {dup}")
    entries.sort()
    return CategoryMap(tuple(e[0] for e in entries), tuple(e[1] for e in entries))


def _parse_images(v: _Validator, data: dict, image_root: str) -> list[ImageRecord]:
    records, seen = [], set()
    for i, im in enumerate(v.list_of_dicts(data, "images")):
        where = f"images[{i}]"
        image_id = v.integer(v.get(im, "id", where), f"{where}.id")
        if image_id in seen:
            v.fail(f"{where}.id", f"duplicate image id {image_id}")
        seen.add(image_id)
        file_name = v.get(im, "file_name", where)
        if not isinstance(file_name, str) or not file_name:
            v.fail(f"{where}.file_name", f"expected a file name, got {file_name!r}")
        size = []
        for key in ("height", "width"):
            value = v.get(im, key, where, required=False)
            if value is not None:
                value = v.integer(value, f"{where}.{key}")
                if value <= 0:
                    v.fail(f"{where}.{key}", f"expected a positive size, got {value}")
            size.append(value or 0)  # 0 = unknown: taken from the file header
        records.append(
            ImageRecord(image_id, file_name, os.path.join(image_root, file_name), size[0], size[1])
        )
    return records


def _parse_segmentation(
    v: _Validator, segm, where: str, record: ImageRecord, problems: DataProblems, ann_id: int
) -> tuple[list[np.ndarray] | None, dict | None]:
    """Validated polygons or RLE; degenerate parts are dropped (reported). (None, None) when
    nothing usable is left."""
    if isinstance(segm, list):
        parts = []
        for j, part in enumerate(segm):
            coords = v.numbers(part, f"{where}[{j}]")
            if len(coords) % 2:
                v.fail(f"{where}[{j}]", f"expected an even number of coordinates, got {len(coords)}")
            xy = coords.reshape(-1, 2)
            if len(xy) < 3 or polygon_area(xy) <= 1e-6:
                problems.add(
                    P.DEGENERATE_POLYGON,
                    record.file_name,
                    f"annotation id {ann_id}: polygon with {len(xy)} points and area "
                    f"{polygon_area(xy) if len(xy) >= 3 else 0.0:g} dropped",
                )
                continue
            parts.append(xy)
        return (parts or None), None
    if isinstance(segm, dict):
        size = v.numbers(v.get(segm, "size", where), f"{where}.size", 2)
        counts = v.get(segm, "counts", where)
        if not isinstance(counts, (str, list)):
            v.fail(f"{where}.counts", f"expected a string or a list of integers, got {type(counts).__name__}")
        if [int(s) for s in size.tolist()] != [record.height, record.width]:
            problems.add(
                P.BAD_RLE, record.file_name,
                f"annotation id {ann_id}: RLE size {size.astype(int).tolist()} differs from the image's "
                f"{[record.height, record.width]}; dropped",
            )
            return None, None
        try:
            if isinstance(counts, list):  # uncompressed RLE -> compressed
                rle = mask_utils.frPyObjects({"size": [record.height, record.width], "counts": counts},
                                             record.height, record.width)
            else:
                rle = {"size": [record.height, record.width], "counts": counts.encode("ascii")}
            if mask_utils.area(rle) <= 0:
                problems.add(P.EMPTY_MASK, record.file_name, f"annotation id {ann_id}: empty RLE; dropped")
                return None, None
        except Exception as e:  # pycocotools raises on inconsistent run lengths
            problems.add(P.BAD_RLE, record.file_name, f"annotation id {ann_id}: {e}; dropped")
            return None, None
        return None, rle
    v.fail(where, f"expected a list of polygons or an RLE object, got {type(segm).__name__}")


def _box_polygon(bbox: Sequence[float]) -> np.ndarray:
    x, y, w, h = bbox
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)


def _parse_annotations(
    v: _Validator,
    data: dict,
    records: list[ImageRecord],
    cats: CategoryMap,
    problems: DataProblems,
    dropped_ids: set[int],
) -> None:
    """Attach validated annotations to their records. Annotations of images already left out
    (missing or corrupt file) are still schema-checked, but their data problems are not reported:
    the file problem already was."""
    by_id = {r.image_id: r for r in records}
    scratch = DataProblems(log=P.SILENT)
    seen_ids = set()
    for i, an in enumerate(v.list_of_dicts(data, "annotations")):
        where = f"annotations[{i}]"
        ann_id = v.integer(an.get("id", i), f"{where}.id")
        image_id = v.integer(v.get(an, "image_id", where), f"{where}.image_id")
        record = by_id.get(image_id)
        if record is None:
            v.fail(f"{where}.image_id", f"no image with id {image_id}")
        cat = v.integer(v.get(an, "category_id", where), f"{where}.category_id")
        if cat not in cats:
            v.fail(f"{where}.category_id", f"no category with id {cat}")
        bbox = v.numbers(v.get(an, "bbox", where), f"{where}.bbox", 4).tolist()
        iscrowd = an.get("iscrowd", 0)
        if iscrowd not in (0, 1, True, False):
            v.fail(f"{where}.iscrowd", f"expected 0 or 1, got {iscrowd!r}")
        if ann_id in seen_ids:
            v.fail(f"{where}.id", f"duplicate annotation id {ann_id}")
        seen_ids.add(ann_id)
        if record.image_id in dropped_ids:
            report = scratch
        elif record.height <= 0 or record.width <= 0:
            v.fail(f"images[id={image_id}]", "height/width missing (needed for its annotations)")
        else:
            report = problems

        segm = an.get("segmentation")
        polygons, rle = (None, None)
        if segm is not None and segm != []:
            polygons, rle = _parse_segmentation(v, segm, f"{where}.segmentation", record, report, ann_id)
        zero_box = bbox[2] <= 0 or bbox[3] <= 0
        if polygons is None and rle is None:
            if segm is None or segm == []:
                if zero_box:
                    report.add(P.ZERO_AREA_BOX, record.file_name,
                               f"annotation id {ann_id}: zero-area box and no segmentation; dropped")
                    continue
                # Repair: a detection-only annotation gets its box as mask.
                report.add(P.NO_SEGMENTATION, record.file_name,
                           f"annotation id {ann_id}: no segmentation; its box is used as mask")
                polygons = [_box_polygon(bbox)]
            else:
                continue  # every part was degenerate (reported above)
        elif zero_box:
            report.add(P.ZERO_AREA_BOX, record.file_name,
                       f"annotation id {ann_id}: box {bbox} ignored; the box is recomputed from the mask")
        record.annotations.append(
            Annotation(ann_id, cats.label(cat), bool(iscrowd), tuple(bbox), polygons, rle)
        )


def _check_image_files(records: list[ImageRecord], problems: DataProblems, num_threads: int) -> list[bool]:
    """Header check of every image file (threaded: it is I/O); fills in missing sizes."""

    def check(record: ImageRecord) -> bool:
        if not os.path.isfile(record.path):
            problems.add(P.MISSING_IMAGE, record.file_name, record.path)
            return False
        try:
            header = read_image_header(record.path)
        except (OSError, ImageFileError) as e:
            problems.add(P.CORRUPT_IMAGE, record.file_name, str(e))
            return False
        if header.height is None:
            return record.height > 0
        if record.height <= 0:
            record.height, record.width = header.height, header.width
            return True
        if header.format == "jpeg" and (header.width, header.height) == (record.height, record.width):
            # Swapped: an EXIF orientation (decoders apply it, and annotation tools annotate the
            # rotated view, so the json's size is the decoded one).
            return True
        if (header.height, header.width) != (record.height, record.width):
            problems.add(
                P.SIZE_MISMATCH, record.file_name,
                f"file is {header.height}x{header.width}, json says {record.height}x{record.width}; skipped",
            )
            return False
        return True

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        return list(pool.map(check, records))


def load_coco(
    json_path: str,
    image_root: str,
    *,
    for_training: bool = True,
    problems: DataProblems | None = None,
    check_files: bool = True,
    num_threads: int = 8,
) -> CocoDataset:
    """Load and validate a COCO instances json.

    for_training: images without (non-crowd) instances are left out (reported once each), as
    Detectron2 does for training; evaluation keeps them.
    check_files: header-check every image file (missing, corrupt, truncated, wrong size are
    reported and left out); needed for DALI, whose decoder failure would stop the pipeline.
    """
    problems = problems if problems is not None else DataProblems()
    json_path = os.fspath(json_path)
    v = _Validator(json_path)
    try:
        with open(json_path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"not valid json ({e}) in {json_path}") from None
    if not isinstance(data, dict):
        v.fail("(top level)", f"expected an object, got {type(data).__name__}")

    categories = _parse_categories(v, data)
    records = _parse_images(v, data, os.fspath(image_root))
    ok = _check_image_files(records, problems, num_threads) if check_files else [True] * len(records)
    dropped = {r.image_id for r, good in zip(records, ok) if not good}
    _parse_annotations(v, data, records, categories, problems, dropped)
    records = [r for r, good in zip(records, ok) if good]

    if for_training:
        kept = []
        for r in records:
            if r.num_instances == 0:
                problems.add(P.NO_ANNOTATIONS, r.file_name, "no usable non-crowd instance; skipped in training")
            else:
                kept.append(r)
        records = kept
    return CocoDataset(json_path, os.fspath(image_root), categories, records, problems)
