"""Readers of the training record formats (spec §3): the data-config YAML, parquet and llava-json conversations,
region json. Each reader gives random access to plain records; `datasets.py` turns them into examples.
"""

from __future__ import annotations

import io
import json
import logging
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from perceptiondlm.errors import PerceptionDLMError

logger = logging.getLogger(__name__)

DATA_TYPES = ("parquet", "llava", "region")
_TYPE_ALIASES = {"json": "region"}  # the reference's region YAML says `data_type: json`
LEAF_KEYS = ("data_file", "data_type", "num_samples", "image_root", "row_size")  # row_size: reference, ignored
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
          "model": "assistant", "system": "system"}


class RecordError(PerceptionDLMError):
    """One broken record; `reason` names the skip counter (see `TrainDataset.skipped`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourceSpec:
    """One data source: `name` is the path of group labels in the data config (e.g. "s2/coyo")."""

    name: str
    data_file: Path
    data_type: str
    num_samples: int | None = None  # None = every record once per epoch
    image_root: Path | None = None


# --- data config -----------------------------------------------------------------------------------------------

def _resolve(value: Any, base: Path, where: str, *, directory: bool = False) -> Path:
    """Relative paths: the YAML's directory first, then the current directory; the path must exist."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise PerceptionDLMError(f"{where}: expected a path, got {value!r}")
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_dir() if directory else candidate.exists():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise PerceptionDLMError(f"{where}: {'directory' if directory else 'data file'} not found: {tried}")


def infer_data_type(path: Path) -> str:
    """A folder or *.parquet → parquet, *.jsonl → llava, *.json → region if its head mentions regions."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".jsonl":
        return "llava"
    if path.suffix == ".json":
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 20)
        found = {key: head.find(f'"{key}"') for key in ("mask_rles", "annotations", "conversations")}
        found = {key: pos for key, pos in found.items() if pos >= 0}
        if found:
            return "llava" if min(found, key=found.get) == "conversations" else "region"
    raise PerceptionDLMError(f"{path}: cannot infer the data type (parquet folder/file, llava .json/.jsonl or "
                             "region .json); name it in a data-config YAML with data_type")


def load_data_config(path: str | Path) -> list[SourceSpec]:
    """Sources of a data-config YAML (nested dicts/lists; a dict with `data_file` is a source, other keys are
    group labels) or, for any other path, the single data file itself with its type inferred."""
    path = Path(path)
    if not path.exists():
        raise PerceptionDLMError(f"data path not found: {path}")
    if path.suffix not in (".yaml", ".yml"):
        return [SourceSpec(path.stem, path, infer_data_type(path))]
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PerceptionDLMError(f"{path}: not valid YAML ({err})") from err
    specs = list(_walk(tree, [], path))
    if not specs:
        raise PerceptionDLMError(f"{path}: no data sources (dicts with a data_file key) found")
    return specs


def _walk(node: Any, labels: list[str], config: Path) -> Iterator[SourceSpec]:
    name = "/".join(labels) or "<top>"
    if isinstance(node, dict) and "data_file" in node:
        yield _leaf(node, name, config)
    elif isinstance(node, dict):
        for key, child in node.items():
            yield from _walk(child, [*labels, str(key)], config)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _walk(child, [*labels, str(i)], config)
    else:
        raise PerceptionDLMError(f"{config}: {name} = {node!r} is neither a source (a dict with data_file) nor a "
                                 "group of sources")


def _leaf(node: dict[str, Any], name: str, config: Path) -> SourceSpec:
    where = f"{config}: source {name}"
    unknown = sorted(set(node) - set(LEAF_KEYS))
    if unknown:
        raise PerceptionDLMError(f"{where}: unknown field(s) {unknown}; a source takes {list(LEAF_KEYS)}")
    data_file = _resolve(node["data_file"], config.parent, f"{where}, data_file")
    data_type = node.get("data_type")
    data_type = infer_data_type(data_file) if data_type is None else _TYPE_ALIASES.get(data_type, data_type)
    if data_type not in DATA_TYPES:
        raise PerceptionDLMError(f"{where}: data_type {node['data_type']!r} is not one of {DATA_TYPES}")
    num = node.get("num_samples")
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < -1):
        raise PerceptionDLMError(f"{where}: num_samples must be an int >= 0 (or -1 = all), got {num!r}")
    root = node.get("image_root")
    root = None if root is None else _resolve(root, config.parent, f"{where}, image_root", directory=True)
    return SourceSpec(name, data_file, data_type, None if num in (None, -1) else num, root)


# --- conversations ----------------------------------------------------------------------------------------------

def normalize_conversation(raw: Any, where: str) -> list[dict[str, str]]:
    """`[{"from","value"}]` or `[{"role","content"}]` (a list or its JSON string) → `[{"role","content": str}]`
    with roles user/assistant/system; list contents are joined, their image items become `<image>`."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RecordError("bad_record", f"{where}: conversations is not valid JSON ({err})") from err
    if not isinstance(raw, list) or not raw:
        raise RecordError("bad_record", f"{where}: conversations must be a non-empty list, got {type(raw).__name__}")
    out = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise RecordError("bad_record", f"{where}: a conversation turn is {type(turn).__name__}, not a dict")
        role = turn.get("from") if turn.get("from") is not None else turn.get("role")
        content = turn.get("value") if turn.get("value") is not None else turn.get("content")
        if str(role).lower() not in _ROLES:
            raise RecordError("bad_record", f"{where}: unknown role {role!r}; use one of {sorted(_ROLES)}")
        if isinstance(content, list):
            content = "".join(IMAGE_PLACEHOLDER if isinstance(item, dict) and item.get("type") == "image"
                              else str(item.get("text") or "") if isinstance(item, dict) else str(item)
                              for item in content)
        out.append({"role": _ROLES[str(role).lower()], "content": "" if content is None else str(content)})
    return out


def open_image(ref: bytes | Path, where: str) -> Image.Image:
    """Decode an image (raw bytes or a file) as RGB; failures are a RecordError("unreadable_image")."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        name = "image bytes" if isinstance(ref, bytes) else f"image {ref}"
        raise RecordError("unreadable_image", f"{where}: cannot read {name} ({err})") from err


def image_size(ref: Path) -> tuple[int, int]:
    """(W, H) from the file header only; (0, 0) if unreadable (the record is skipped later)."""
    try:
        with Image.open(ref) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return 0, 0


@dataclass
class RecordStats:
    """Per-record facts for length estimates: text bytes, turns, images, image size (0 = unknown), regions."""

    text_bytes: np.ndarray
    turns: np.ndarray
    images: np.ndarray
    width: np.ndarray
    height: np.ndarray
    regions: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple[int, int, int, int, int, int]]) -> RecordStats:
        cols = np.asarray(rows, dtype=np.int64).reshape(-1, 6).T
        return cls(*cols)


def _conversation_stats(conversation: list[dict[str, str]]) -> tuple[int, int, int]:
    text = "".join(t["content"] for t in conversation)
    images = text.count(IMAGE_PLACEHOLDER)
    return len(text.encode()) - images * len(IMAGE_PLACEHOLDER), len(conversation), images


class _Packed:
    """Records kept as one JSON byte buffer + offsets: no per-record Python objects, so forked dataloader
    workers share the memory instead of copying it page by page through refcount updates."""

    def __init__(self, items: Iterable[Any]) -> None:
        chunks = [json.dumps(x, separators=(",", ":"), ensure_ascii=False).encode() for x in items]
        self._offsets = np.cumsum([0, *map(len, chunks)], dtype=np.int64)
        self._blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> Any:
        return json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes())


def _read_json_records(path: Path) -> list[Any]:
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PerceptionDLMError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise PerceptionDLMError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _image_path(value: Any, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RecordError("bad_record", f"{where}: an image entry must be a path string, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else root / path


# --- readers ----------------------------------------------------------------------------------------------------

class LlavaConversations:
    """llava json (a list) or jsonl: `image` (str | list) or `images`, paths relative to `image_root`, and
    `conversations`. Records with `video` or `mask_rle` are not supported (skipped)."""

    def __init__(self, path: Path, image_root: Path) -> None:
        self.path, self.image_root = Path(path), Path(image_root)
        records = _read_json_records(self.path)
        self._records = _Packed(records)
        self._sizes: tuple[np.ndarray, np.ndarray] | None = None
        rows = []
        for rec in records:
            try:
                conv = normalize_conversation(rec.get("conversations") if isinstance(rec, dict) else None, "")
                refs = rec.get("images", rec.get("image"))
                rows.append((*_conversation_stats(conv)[:2], 1 if isinstance(refs, str) else len(refs or [])))
            except (RecordError, TypeError):
                rows.append((0, 0, 0))
        self._text = np.asarray(rows, dtype=np.int64).reshape(-1, 3)  # text bytes, turns, images

    def __len__(self) -> int:
        return len(self._records)

    def record(self, i: int) -> dict[str, Any]:
        where = f"{self.path}#{i}"
        rec = self._records[i]
        if not isinstance(rec, dict):
            raise RecordError("bad_record", f"{where}: a record must be a JSON object")
        if "video" in rec or "mask_rle" in rec:
            raise RecordError("unsupported", f"{where}: video and mask_rle llava records are not supported")
        refs = rec.get("images", rec.get("image"))
        refs = [] if refs is None else [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list):
            raise RecordError("bad_record", f"{where}: image/images must be a path or a list of paths")
        images = [_image_path(r, self.image_root, where) for r in refs]
        return {"images": images, "conversation": normalize_conversation(rec.get("conversations"), where),
                "where": where}

    def stats(self) -> RecordStats:
        """Header reads (threaded) give the size of single-image records; multi-image records use 1 tile each."""
        if self._sizes is None:
            width, height = np.zeros(len(self), np.int64), np.zeros(len(self), np.int64)
            single = [i for i in range(len(self)) if self._text[i, 2] == 1]
            paths = []
            for i in single:
                try:
                    paths.append(self.record(i)["images"][0])
                except (RecordError, IndexError):
                    paths.append(Path("/nonexistent"))
            with ThreadPoolExecutor(8) as pool:
                for i, (w, h) in zip(single, pool.map(image_size, paths), strict=True):
                    width[i], height[i] = w, h
            self._sizes = width, height
        t = self._text
        return RecordStats(t[:, 0], t[:, 1], t[:, 2], *self._sizes, np.zeros(len(self), np.int64))


class ParquetConversations:
    """A folder of *.parquet (or one file) with `conversations` and `images`/`image` columns. A read takes one
    row group's two columns once and slices the row out; a small per-process LRU keeps the last decoded row
    groups (`cache_groups`, `cache_bytes`), so neighbouring rows do not re-read the group."""

    def __init__(self, path: Path, image_root: Path, cache_groups: int = 4, cache_bytes: int = 1 << 29) -> None:
        import pyarrow.parquet as pq

        self.path, self.image_root = Path(path), Path(image_root)
        self.cache_groups, self.cache_bytes = cache_groups, cache_bytes
        if self.path.is_dir():
            files = sorted(self.path.glob("*.parquet")) or sorted(self.path.rglob("*.parquet"))
        else:
            files = [self.path]
        if not files:
            raise PerceptionDLMError(f"{self.path}: no *.parquet files in this folder")
        self._files, self._columns, self._groups = files, [], []
        for f in files:
            try:
                handle = pq.ParquetFile(f)
            except (OSError, ValueError) as err:
                raise PerceptionDLMError(f"{f}: not a readable parquet file ({err})") from err
            meta, names = handle.metadata, set(handle.schema_arrow.names)
            if "conversations" not in names:
                raise PerceptionDLMError(f"{f}: no 'conversations' column (columns: {sorted(names)})")
            image_col = next((c for c in ("images", "image") if c in names), None)
            self._columns.append(["conversations"] + ([image_col] if image_col else []))
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._groups.append(np.cumsum([0, *rows], dtype=np.int64))
        self._file_offsets = np.cumsum([0] + [int(g[-1]) for g in self._groups], dtype=np.int64)
        self._stats: RecordStats | None = None
        self._reset()

    def _reset(self) -> None:
        self._pid, self._cache, self._cached_bytes = os.getpid(), OrderedDict(), 0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": OrderedDict(), "_cached_bytes": 0}

    def __len__(self) -> int:
        return int(self._file_offsets[-1])

    def _row_group(self, f: int, g: int) -> Any:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked worker must not share the parent's cache
            self._reset()
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = pq.ParquetFile(self._files[f]).read_row_group(g, columns=self._columns[f])
        if table.nbytes <= self.cache_bytes:
            self._cache[key] = table
            self._cached_bytes += table.nbytes
            while len(self._cache) > self.cache_groups or self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return table

    def record(self, i: int) -> dict[str, Any]:
        f = bisect_right(self._file_offsets, i) - 1
        local = i - int(self._file_offsets[f])
        g = bisect_right(self._groups[f], local) - 1
        row = self._row_group(f, g).slice(local - int(self._groups[f][g]), 1).to_pylist()[0]
        where = f"{self._files[f]}#{local}"
        refs = row.get("images", row.get("image"))
        refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
        images: list[bytes | Path] = []
        for ref in refs:
            if isinstance(ref, dict) and ref.get("bytes") is None and ref.get("path"):
                images.append(_image_path(ref["path"], self.image_root, where))
            else:
                data = ref.get("bytes") if isinstance(ref, dict) else ref
                if not isinstance(data, bytes):
                    raise RecordError("bad_record", f"{where}: an image must be bytes or {{'bytes': ...}}")
                images.append(data)
        return {"images": images, "conversation": normalize_conversation(row["conversations"], where),
                "where": where}

    def stats(self) -> RecordStats:
        """Reads only the conversations column; images are counted by their `<image>` placeholders."""
        import pyarrow.parquet as pq

        if self._stats is None:
            rows = []
            for f in self._files:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=["conversations"]):
                    for raw in batch.column(0).to_pylist():
                        try:
                            rows.append((*_conversation_stats(normalize_conversation(raw, "")), 0, 0, 0))
                        except RecordError:
                            rows.append((0, 0, 0, 0, 0, 0))
            self._stats = RecordStats.from_rows(rows)
        return self._stats


class RegionRecords:
    """Region json: a list of records with an image (`image` | `image_file` | `image_path`, relative to
    `image_root`) and regions as `mask_rles` + `captions` or `annotations` [{segmentation|mask_rle, caption}].
    A mask is a COCO RLE (compressed or uncompressed) or null (= the whole image)."""

    def __init__(self, path: Path, image_root: Path) -> None:
        self.path, self.image_root = Path(path), Path(image_root)
        records = _read_json_records(self.path)
        self._records = _Packed(records)
        rows = []
        for rec in records:
            try:
                masks, captions = _regions(rec, "")
            except RecordError:
                rows.append((0, 0, 0, 0, 0, 0))
                continue
            size = next((m.get("size") for m in masks if isinstance(m, dict)), None)
            h, w = (int(v) for v in size) if isinstance(size, list) and len(size) == 2 else (0, 0)
            rows.append((sum(len(str(c).encode()) for c in captions), 2, 1, w, h, len(masks)))
        self._stats = RecordStats.from_rows(rows)

    def __len__(self) -> int:
        return len(self._records)

    def stats(self) -> RecordStats:
        """Image sizes come from the RLE `size` fields (no file is opened)."""
        return self._stats

    def record(self, i: int) -> dict[str, Any]:
        where = f"{self.path}#{i}"
        rec = self._records[i]
        masks, captions = _regions(rec, where)
        image = next((rec[k] for k in ("image", "image_file", "image_path") if rec.get(k) is not None), None)
        return {"image": _image_path(image, self.image_root, where), "masks": masks, "captions": captions,
                "where": where}


def _regions(rec: Any, where: str) -> tuple[list[Any], list[str]]:
    if not isinstance(rec, dict):
        raise RecordError("bad_record", f"{where}: a region record must be a JSON object")
    if "mask_rles" in rec:
        masks, captions = rec["mask_rles"], rec.get("captions")
        masks = [masks] if isinstance(masks, dict) else masks
        captions = [captions] if isinstance(captions, str) else captions
    elif "annotations" in rec:
        anns = rec["annotations"] if isinstance(rec["annotations"], list) else []
        if not all(isinstance(a, dict) and ("segmentation" in a or "mask_rle" in a) for a in anns):
            raise RecordError("bad_record", f"{where}: every annotation needs segmentation (or mask_rle) + caption")
        masks = [a["segmentation"] if "segmentation" in a else a["mask_rle"] for a in anns]
        captions = [a.get("caption") for a in anns]
    else:
        raise RecordError("bad_record", f"{where}: no regions (give mask_rles + captions or annotations)")
    if not isinstance(masks, list) or not isinstance(captions, list) or len(masks) != len(captions) or not masks:
        raise RecordError("bad_record", f"{where}: need equally long, non-empty lists of masks and captions")
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise RecordError("empty_text", f"{where}: every region needs a non-empty caption string")
    return masks, captions


def open_source(spec: SourceSpec, default_image_root: Path | None = None) -> Any:
    """The reader for `spec`; images resolve against spec.image_root, else `default_image_root`, else the
    data file's directory (a parquet folder: the folder itself)."""
    if not spec.data_file.exists():
        raise PerceptionDLMError(f"source {spec.name}: data file not found: {spec.data_file}")
    root = spec.image_root or default_image_root or (
        spec.data_file if spec.data_file.is_dir() else spec.data_file.parent)
    readers = {"parquet": ParquetConversations, "llava": LlavaConversations, "region": RegionRecords}
    if spec.data_type not in readers:
        raise PerceptionDLMError(f"source {spec.name}: data_type {spec.data_type!r} is not one of {DATA_TYPES}")
    return readers[spec.data_type](spec.data_file, Path(root))
