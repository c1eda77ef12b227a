"""Streaming the WebDataset shards into training and evaluation, the same number of batches per rank.

DDP hangs when one rank runs out of batches before another (a collective waits forever), and
WebDataset's node splitting gives ranks unequal shard counts whenever the shard count does not
divide ``world_size * loader_workers``. Training therefore splits by *consumer* (a rank's loader
worker) with a per-epoch shuffle of the shard list from a shared seed, cycles a consumer's shards
when they run short, and stops every consumer after the same number of full batches. Evaluation
reads every sample exactly once (ranks may see different counts; results are summed with one
all-reduce, which every rank calls exactly once).

Every stream is a ``webdataset.DataPipeline``: the consumer's shard list (:class:`ShardList`),
webdataset's tar reader (``tarfile_to_samples``), webdataset's shuffle buffer and a slice to the
quota (training), then the decode. Shards are read from a local folder, ``pipe:``, ``http(s)://``
(webdataset's openers) or, through fsspec, from any URI the shard stage wrote to (``s3://``...).
With ``train.augment.fast_decode`` the JPEG decoder skips resolution the transform would throw
away (:class:`FastDecode`, docs/data.md).
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import MANIFEST, Store, read_manifest
from pipeline.shardsets import foreign_urls
from pipeline.storage import HashingStream, shard_ends_problem
from pipeline.transforms import FastDecode, build_transforms, dct_scale, draft  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)
Records = dict[str, dict[str, Any]]  # shard url -> its manifest record


class SampleError(RuntimeError):
    """A sample in a shard cannot be decoded. The message names the shard and the key."""


def shard_urls(folder: str | Path, split: str) -> tuple[list[str], int]:
    """Shard locations of ``split`` (absolute paths, or URIs for remote storage) and its sample count:
    from the shard stage's ``manifest.json`` in ``folder``, else from a set written by others
    (:func:`pipeline.shardsets.foreign_urls`: timm's ``_info.json``, or plain ``<split>-*.tar``)."""
    store = Store(folder)
    if not store.exists(MANIFEST) and (found := foreign_urls(store, split)) is not None:
        return found
    entry = read_manifest(folder)["splits"][split]  # raises, naming the file and the fix, if missing
    return [store.url_of(s["name"]) for s in entry["shards"]], int(entry["count"])


def shard_records(folder: str | Path, split: str) -> dict[str, dict[str, Any]]:
    """url -> the manifest's record of that shard (``samples``, ``bytes``, ``sha256``): what a reader
    checks each shard against (:class:`ShardList`)."""
    store = Store(folder)
    if not store.exists(MANIFEST):  # a set written by others: nothing to check against
        return {}
    return {store.url_of(s["name"]): s for s in read_manifest(folder)["splits"][split]["shards"]}


_VERIFIED: set[str] = set()  # shards whose sha256 this process has checked (``verify_sha256``)


_FIX = "re-run the shard stage (dvc repro -f -s shard), which rewrites shards whose sha256 does not match"


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    import fsspec

    return fsspec.open(url, mode).open()


def _register_schemes(urls: Iterable[str]) -> None:
    """Let webdataset's ``gopen`` open every URL scheme fsspec knows (``s3://``, ``memory://``...).

    webdataset opens local paths, ``file:``, ``pipe:``, ``http(s)://`` (curl) and ``gs://`` itself;
    any other scheme is added to its dispatch table (``webdataset.gopen.gopen_schemes``) as an fsspec
    opener. Runs in the process that reads (a DataLoader worker has its own table).
    """
    from webdataset.gopen import gopen_schemes

    for url in urls:
        scheme, sep, _ = url.partition("://")
        if sep and scheme not in gopen_schemes:
            gopen_schemes[scheme] = _fsspec_gopen


class ShardList(IterableDataset):
    """The first stage of every shard stream: ``{"url": ...}`` for webdataset's ``tarfile_to_samples``.

    It also keeps what the later stages need to name a failure: the shard being read (webdataset
    opens and expands one shard at a time, in this order) and how many samples each shard gave
    (:meth:`count`, a stage placed after the tar reader).

    A tar reader stops without error at a cut that falls on a member boundary or at a zeroed
    block, so before a shard is read its two closing zero blocks are required, and with
    ``expected`` (:func:`shard_records`) it is checked against the manifest: its size before it
    is read; its sample count once read to its end; and, with ``verify_sha256``
    (``data.shards.verify_sha256``), its sha256 the first time this process reads it to its end
    (hashed as it streams). A mismatch raises :class:`SampleError` naming the shard.

    Args:
        urls: shard locations: paths, ``file:``, ``pipe:``, ``http(s)://`` or any fsspec URI.
        cycle: start over after the last shard (training); a whole pass without a sample is an error.
        expected: url -> manifest record, for the checks above (None: no checks).
        verify_sha256: hash every shard on its first read in this process (needs ``expected``).
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        cycle: bool = False,
        expected: dict[str, dict[str, Any]] | None = None,
        verify_sha256: bool = False,
    ) -> None:
        super().__init__()
        self.urls, self.cycle = list(urls), cycle
        self.current: str | None = None
        self.seen: dict[str, int] = {}
        self.expected, self.verify_sha256 = expected or {}, verify_sha256
        self.pending: deque[tuple[str, Any]] = deque()

    def __iter__(self) -> Iterator[dict[str, str]]:
        _register_schemes(self.urls)
        while True:
            before = sum(self.seen.values())
            for url in self.urls:
                self.current = url
                yield {"url": url}
            if not self.cycle:
                return
            if sum(self.seen.values()) == before:  # would otherwise spin forever, hanging every rank
                raise SampleError(f"shards {self.urls} hold no samples")

    def count(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage: pass samples through, counting them per shard."""
        for sample in samples:
            url = sample["__url__"]
            self.seen[url] = self.seen.get(url, 0) + 1
            yield sample

    def fail(self, exn: Exception) -> bool:
        """webdataset handler: any error reading a shard stops the stream, naming the shard and the fix."""
        if isinstance(exn, SampleError):
            raise exn
        reason = exn.args[0] if exn.args else type(exn).__name__
        if isinstance(exn, FileNotFoundError):
            raise SampleError(f"shard {self.current} is missing: {_FIX}") from exn
        raise SampleError(f"shard {self.current} is unreadable ({reason}): {_FIX}") from exn

    def open(self, src: Iterable[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage, webdataset's ``url_opener`` with the checks before reading."""
        from webdataset.gopen import gopen

        for sample in src:
            url, expect = sample["url"], self.expected.get(sample["url"])
            try:
                if problem := shard_ends_problem(url, expect):
                    raise SampleError(f"shard {url} {problem}; {_FIX}")
                stream = gopen(url)
            except SampleError:
                raise
            except Exception as exn:  # noqa: BLE001 - named by the handler, with the fix
                self.fail(exn)
            if expect is not None and self.verify_sha256 and url not in _VERIFIED:
                stream = HashingStream(stream)
            self.pending.append((url, stream))
            yield {**sample, "stream": stream}

    def check(self, files: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pipeline stage between webdataset's tar expander and its grouping: at each shard's end
        (the expander's empty end-of-shard marker), its sample count and, if asked, its sha256."""
        count, last = 0, None
        for f in files:
            if f == {}:
                url, stream = self.pending.popleft()
                self._verify(url, count, stream)
                count, last = 0, None
            elif "fname" in f:
                # The sample key as webdataset's grouping forms it (base_plus_ext: the name up to the
                # first dot of its last path part); a sample's members are consecutive, so a new key
                # is a new sample. String operations: a regular expression per member cost 3 us.
                folder, slash, name = f["fname"].rpartition("/")
                key = folder + slash + name.partition(".")[0]
                if key != last:
                    count, last = count + 1, key
            yield f

    def _verify(self, url: str, count: int, stream: Any) -> None:
        expect = self.expected.get(url)
        if expect is None:
            return
        if count != int(expect["samples"]):
            raise SampleError(
                f"shard {url} holds {count} samples, its manifest record {expect['samples']}: it was cut or "
                f"zeroed after it was written (a tar reader stops silently there); {_FIX}"
            )
        if isinstance(stream, HashingStream):
            if (digest := stream.finish()) != expect["sha256"]:
                raise SampleError(
                    f"shard {url}: sha256 {digest}, its manifest record {expect['sha256']}; {_FIX}"
                )
            _VERIFIED.add(url)

    def samples(self) -> Any:
        """The samples of these shards in order, as webdataset dicts (``__key__``, ``__url__``,
        ``jpg``, ``cls``...): :meth:`open`, webdataset's tar expander, :meth:`check`, webdataset's
        grouping into samples, then :meth:`count`."""
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        return wds.DataPipeline(
            self,
            self.open,
            lambda streams: tar_file_expander(streams, handler=self.fail),
            self.check,
            lambda files: group_by_keys(files, handler=self.fail),
            self.count,
        )


def read_samples(
    urls: list[str], expected: Records | None = None, *, verify_sha256: bool = False
) -> Iterator[dict[str, Any]]:
    """The samples of ``urls`` in order (:class:`ShardList`, checked against ``expected``)."""
    return iter(ShardList(urls, expected=expected, verify_sha256=verify_sha256).samples())


def decode_sample(sample: dict[str, Any], transform: Callable) -> tuple[torch.Tensor, int]:
    """JPEG bytes -> transformed RGB tensor, and the class index.

    A transform with ``takes_encoded = True`` (:class:`FastDecode`) gets the opened, not yet
    decoded image, so it can choose the decoding scale; any other gets the decoded RGB image.
    """
    from PIL import Image

    try:
        image_bytes = next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample)
        with Image.open(io.BytesIO(image_bytes)) as img:
            image = (
                transform(img)
                if getattr(transform, "takes_encoded", False)
                else transform(img.convert("RGB"))
            )
        label = int(sample["cls"])
    except Exception as err:  # noqa: BLE001 - PIL raises many types; re-raised with the sample named
        raise SampleError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')}: {err}") from err
    return image, label


class ShardStream(IterableDataset):
    """Samples of a list of shards for one (rank, loader worker) consumer.

    Args:
        urls: every shard of the split.
        rank, world_size: this process's DDP rank and the number of ranks.
        transform: applied to each PIL image.
        batches_per_rank: if set (training), each rank yields exactly this many batches of
            ``batch_size`` samples, spread over its loader workers in whole batches (so no worker
            emits a partial batch), cycling its shards as needed; shards are shuffled per epoch
            with ``seed`` so assignment changes every epoch but agrees across ranks. If None
            (evaluation), each sample of the split is yielded by exactly one consumer, once.
        shuffle_buffer: in-memory sample shuffle (training only).
        expected: url -> manifest record: each shard is checked against it (:class:`ShardList`).
        verify_sha256: also check each shard's sha256 on its first read (:class:`ShardList`).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        rank: int,
        world_size: int,
        transform: Callable,
        batches_per_rank: int | None = None,
        batch_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 512,
        expected: Records | None = None,
        verify_sha256: bool = False,
    ) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size, self.expected = list(urls), rank, world_size, expected
        self.verify_sha256 = verify_sha256
        self.transform, self.batches_per_rank, self.batch_size = transform, batches_per_rank, batch_size
        self.seed, self.shuffle_buffer, self.epoch, self.skip = seed, shuffle_buffer, 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's shuffle; skip its first batches (resuming mid-epoch) without decoding them."""
        self.epoch, self.skip = epoch, skip_batches

    def _consumer(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        return iter(self.pipeline())

    def pipeline(self) -> Any:
        """This consumer's stream as a ``webdataset.DataPipeline``: its shards (:class:`ShardList`),
        webdataset's tar reader, and, for training, webdataset's shuffle buffer and the quota."""
        import webdataset as wds

        def decode(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
            return decode_sample(sample, self.transform)

        consumer, consumers, workers = self._consumer()
        if self.batches_per_rank is None:
            # Split by consumer, as webdataset's split_by_node then split_by_worker would, but with
            # the rank given (tests run several ranks in one process). May be empty: more consumers
            # than shards leaves this one nothing to evaluate.
            shards = ShardList(
                self.urls[consumer::consumers], expected=self.expected, verify_sha256=self.verify_sha256
            )
            return wds.DataPipeline(shards.samples(), wds.map(decode))

        urls = list(self.urls)
        random.Random(self.seed * 100_003 + self.epoch).shuffle(urls)
        # Every consumer gets at least one shard, even with fewer shards than consumers.
        mine = [urls[i % len(urls)] for i in range(consumer, max(len(urls), consumers), consumers)]
        worker = consumer % workers
        steps = self.batches_per_rank
        # The DataLoader takes batch i from worker i % workers, so worker w owns batches w, w+W, ...
        owned = steps // workers + (1 if worker < steps % workers else 0)
        skipped = min(owned, self.skip // workers + (1 if worker < self.skip % workers else 0))
        rng = random.Random(f"{self.seed}-{self.epoch}-{consumer}")
        return wds.DataPipeline(
            # Cycled: a consumer with few samples starts over.
            ShardList(mine, cycle=True, expected=self.expected, verify_sha256=self.verify_sha256).samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2, rng=rng),
            # Exactly the quota, the same on every rank; a resumed epoch skips its first batches
            # before they are decoded.
            wds.slice(skipped * self.batch_size, owned * self.batch_size),
            wds.map(decode),
        )


def batches_per_epoch(num_samples: int, world_size: int, batch_per_rank: int) -> int:
    """Full batches each rank runs per epoch (the same on every rank); at least one."""
    return max(1, num_samples // (world_size * batch_per_rank))


def build_train_loader(
    folder: str | Path,
    *,
    rank: int,
    world_size: int,
    batch_per_rank: int,
    transform: Callable,
    seed: int,
    loader_workers: int = 0,
    accumulation: int = 1,
    verify_sha256: bool = False,
) -> tuple[DataLoader, int]:
    """The training loader and its optimizer steps per epoch (identical on every rank).

    The loader yields ``steps * accumulation`` micro-batches of ``batch_per_rank // accumulation``.
    With ``verify_sha256`` each shard's sha256 is checked on its first read (:class:`ShardList`).
    """
    urls, count = shard_urls(folder, "train")
    steps = batches_per_epoch(count, world_size, batch_per_rank)
    micro = batch_per_rank // accumulation
    dataset = ShardStream(
        urls,
        rank=rank,
        world_size=world_size,
        transform=transform,
        batches_per_rank=steps * accumulation,
        batch_size=micro,
        seed=seed,
        expected=shard_records(folder, "train"),
        verify_sha256=verify_sha256,
    )
    loader = DataLoader(
        dataset,
        batch_size=micro,
        num_workers=loader_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    return loader, steps


def build_eval_loader(
    folder: str | Path,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable,
    loader_workers: int = 0,
    verify_sha256: bool = False,
) -> tuple[DataLoader, int]:
    """The validation loader (every sample once over all ranks) and the split's sample count.
    With ``verify_sha256`` each shard's sha256 is checked on its first read (:class:`ShardList`)."""
    urls, count = shard_urls(folder, "val")
    dataset = ShardStream(
        urls,
        rank=rank,
        world_size=world_size,
        transform=transform,
        expected=shard_records(folder, "val"),
        verify_sha256=verify_sha256,
    )
    workers = min(loader_workers, max(0, math.ceil(len(urls) / world_size)))
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers), count
