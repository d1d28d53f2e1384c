"""Raw 3D volumes -> prepared 2D samples and per-site MONAI datalists.

Each volume goes through one chain of MONAI dictionary transforms (:func:`volume_transform`, then
:func:`slice_transform`): channel-first, orientation, percentile clipping and rescaling to [0, 1],
optional per-site z-score, masks merged to foreground, in-plane resize of all slices in one call,
and slicing into N-slice stacks. Apart from channel-first (which depends on the file layout) and
the z-score (which needs the site's statistics), the chain is the ``preprocessing_3d`` section of
a bundle's config: ``fedfms prepare --bundle B`` runs that bundle's, flags alone run the shared
source every bundle is rendered from (:mod:`fedfms.bundle_files`). Every sample is saved as ``.npy``:

    DATA/images/<site>/<case>_<slice>.npy   float (N, S, S); (N, H, W) if smaller (compact store, below)
    DATA/labels/<site>/<case>_<slice>.npy   uint8 (1 or N, L, L)
    DATA/cases/<site>/<case>.json           what was written for the case, written last
    DATA/datalists/<site>.json              decathlon-style training/validation/testing lists
    DATA/prepare.json                       options, version, statistics, cases and skipped files

With the default compact store (:data:`IMAGE_STORES`) an image smaller than ``image_size`` is
written without the upsampling, which adds bytes but no information (4 MB a slice at 1024 px);
:class:`fedfms.transforms.RestorePreparedSized` in the bundles' sample chain resizes it on load,
so training reads the same tensors (within float32 rounding).

Paths in datalists are relative to the datalist's folder, so ``monai.data.load_decathlon_datalist``
resolves them without a ``base_dir``. Re-running with the same options and unchanged sources skips
cases whose manifest is current; a case without a manifest (e.g. an interrupted run) is redone.

Each case's ``attributes`` in ``prepare.json`` hold what is computed from its volumes
(:data:`VOLUME_ATTRIBUTES`) and the columns of its site's clinical table
(:mod:`fedfms.data.clinical`, e.g. ``age``). Clinical attributes do not change the samples, so they
stay out of the case manifests and their fingerprints: an edited table is picked up by the next run
without rewriting a single sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import defaultdict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirstd, NormalizeIntensityd

import fedfms
from fedfms.data.clinical import clinical_table_path, read_clinical
from fedfms.data.layouts import CaseRecord, find_cases
from fedfms.data.validation import check_case
from fedfms.errors import DataError
from fedfms.io import load_json, load_volume, save_json, save_npy
from fedfms.paths import resolve_path
from fedfms.transforms import SelectChanneld, SliceStacksd

SPLITS = ("training", "validation", "testing")
WRITER_THREADS = 4
VOLUME_ATTRIBUTES = ("shape", "spacing_mm", "num_slices", "gland_volume_ml")  # see _case_attributes
IMAGE_STORES = {  # how image samples are written; training reads the same tensors either way
    "compact": "an image smaller than image_size is written at its own in-plane size and resized on load "
    "(fedfms.transforms.RestorePreparedSized)",
    "resized": "every image is written at image_size",
}
SECTION = "preprocessing_3d"  # the bundle config section that defines the chain
SECTION_OPTIONS = (  # its options: the PrepareOptions fields a bundle sets
    "axcodes", "lower_percentile", "upper_percentile", "zscore", "num_slices", "all_label_slices",
    "image_size", "label_size", "multi_class", "num_classes", "keep_empty",
)


@dataclass
class PrepareOptions:
    """Every knob of ``fedfms prepare``; recorded in ``prepare.json``.

    The defaults follow FedFMS: per volume, clip to [minimum, 99th percentile] and rescale to
    [0, 1]; single slices; image 1024 and label 256; empty slices kept.
    """

    layout: str = "saml"
    lower_percentile: float = 0.0  # 0 = the volume minimum (FedFMS); nnU-Net style uses 0.5
    upper_percentile: float = 99.0  # FedFMS; nnU-Net style uses 99.5
    zscore: bool = False  # per-site z-score over that site's training volumes, after clipping
    num_slices: int = 1  # stack size N (1, 3, 5): FedFMS 1, FLAP-SAM 5
    all_label_slices: bool = False  # label every slice of the stack (FLAP-SAM), not only the centre
    image_size: int = 1024
    label_size: int | None = 256  # None: same as image_size
    multi_class: bool = False
    num_classes: int | None = None  # required with multi_class
    keep_empty: bool = True
    axcodes: str = "RAS"  # orientation that makes the last axis the axial slice axis
    image_dtype: str = "float32"
    image_store: str = "compact"  # or "resized": see IMAGE_STORES
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    sites: list[str] | None = None  # only these sites; None: all found
    msd_site: str = "MSD"
    msd_channel: int = 0
    on_error: str = "stop"  # or "skip"
    bundle: str | None = None  # the bundle whose preprocessing_3d section defines the chain; None: the shared source
    overrides: list[str] = field(default_factory=list)  # options given as flags over the bundle's

    def __post_init__(self) -> None:
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise ValueError(f"need 0 <= lower < upper <= 100 percentiles, got {self.lower_percentile}, {self.upper_percentile}")
        if self.multi_class and (self.num_classes is None or self.num_classes < 2):
            raise ValueError("multi-class labels need num_classes >= 2")
        if self.image_size < 1 or (self.label_size is not None and self.label_size < 1):
            raise ValueError(f"sizes must be positive, got image {self.image_size}, label {self.label_size}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val and test fractions must be in [0, 1) and sum below 1, got {self.val_fraction}, {self.test_fraction}")
        if self.on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {self.on_error!r}")
        if self.image_dtype not in ("float32", "float16"):
            raise ValueError(f"image_dtype must be float32 or float16, got {self.image_dtype!r}")
        if self.image_store not in IMAGE_STORES:
            raise ValueError(f"image_store must be one of {', '.join(IMAGE_STORES)}, got {self.image_store!r}")
        SliceStacksd(["image"], self.num_slices, label_key=None)  # validates num_slices

    @property
    def label_spatial_size(self) -> int:
        return self.label_size or self.image_size

    def content_options(self) -> dict:
        """The options that change the samples written for a case (not the split)."""
        skip = {"val_fraction", "test_fraction", "seed", "sites", "on_error", "msd_site", "bundle", "overrides"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class SiteStats:
    """Mean and standard deviation of clipped intensities over a site's training volumes."""

    mean: float
    std: float
    voxels: int


@dataclass
class _PendingCase:
    """A case whose sample files may still be being written; its manifest comes last."""

    manifest_path: Path
    manifest: dict
    writes: list[Future]
    reused: bool

    def finish(self) -> None:
        for write in self.writes:
            write.result()  # re-raises a failed write before the manifest can claim the case
        save_json(self.manifest_path, self.manifest)


@dataclass
class PrepareResult:
    """What a run did: the datalist entries per site, counts, and the files it had to skip."""

    out_dir: Path
    cases: list[dict]
    processed: int
    reused: int
    skipped: list[dict] = field(default_factory=list)


def preprocessing_section(options: PrepareOptions, part: str, keep_image_size: bool = False) -> list:
    """``part`` (``volume`` or ``slices``) of the ``preprocessing_3d`` config section, built with ``options``.

    The section is the one definition of the chain: the bundle's own (``options.bundle``) or, for
    flag-only runs, the package's shared bundle source that every bundle is rendered from.
    ``keep_image_size`` leaves images at their in-plane size (MONAI's -1: keep that dimension), for
    the compact store; labels are resized as always.
    """
    from fedfms.bundle_files import SHARED, TEMPLATES  # noqa: PLC0415 (the bundle side imports this module's users)

    config = resolve_path(options.bundle) / "configs" / "train.json" if options.bundle else TEMPLATES / SHARED
    parser = ConfigParser()
    parser.read_config(str(config))
    section_options = {name: getattr(options, name) for name in SECTION_OPTIONS}
    if keep_image_size:
        section_options |= {"image_size": -1, "label_size": options.label_spatial_size}
    parser[f"{SECTION}#options"] = section_options
    return parser.get_parsed_content(f"{SECTION}#{part}")


def bundle_preparation(bundle: str | os.PathLike) -> dict:
    """The options of a bundle's ``preprocessing_3d`` section, as :class:`PrepareOptions` fields."""
    parser = ConfigParser()
    parser.read_config(str(resolve_path(bundle) / "configs" / "train.json"))
    parser["bundle_root"] = str(resolve_path(bundle))
    return {name: parser.get_parsed_content(f"{SECTION}#options#{name}") for name in SECTION_OPTIONS}


def volume_transform(options: PrepareOptions, channel: int | None = None) -> Compose:
    """Load-time chain on whole volumes: channel first (by file layout), then the section's reorient, clip and rescale, label merge."""
    transforms = [EnsureChannelFirstd("label", channel_dim="no_channel")]
    if channel is None:
        transforms.append(EnsureChannelFirstd("image", channel_dim="no_channel"))
    else:  # a multi-channel image: the reader's metadata says where its channels are
        transforms += [EnsureChannelFirstd("image"), SelectChanneld("image", channel)]
    return Compose(transforms + preprocessing_section(options, "volume"))


def slice_transform(options: PrepareOptions, stats: SiteStats | None = None, keep_image_size: bool = False) -> Compose:
    """Per-volume chain from clipped volume to samples: z-score (per site), then the section's resize and stacking.

    ``keep_image_size``: images keep their in-plane size (see :func:`stores_compact`).
    """
    transforms = []
    if options.zscore:
        if stats is None:
            raise ValueError("z-score normalisation needs the site's statistics")
        transforms.append(NormalizeIntensityd("image", subtrahend=stats.mean, divisor=stats.std))
    return Compose(transforms + preprocessing_section(options, "slices", keep_image_size))


def stores_compact(options: PrepareOptions, image: torch.Tensor) -> bool:
    """Whether a channel-first volume's images are written at their own in-plane size: with the
    compact store, when that holds fewer values than ``image_size`` squared (an upsampling adds none)."""
    height, width = image.shape[1:3]
    return options.image_store == "compact" and height * width < options.image_size**2


def split_cases(records: Sequence[CaseRecord], options: PrepareOptions) -> dict[tuple[str, str], str]:
    """Assign each case to training/validation/testing, per site, by case, reproducibly from the seed.

    A site with three or more cases gets at least one validation and one test case when the
    fractions ask for any; the rest train. The split ignores whether files turn out to be broken,
    so one bad file does not reshuffle the other cases.
    """
    by_site: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_site[r.site].append(r.case)
    split = {}
    for site, cases in by_site.items():
        cases = sorted(cases)
        random.Random(f"{options.seed}:{site}").shuffle(cases)
        n = len(cases)
        n_test = _share(n, options.test_fraction)
        n_val = min(_share(n, options.val_fraction), n - n_test - 1)
        for i, case in enumerate(cases):
            split[(site, case)] = "testing" if i < n_test else "validation" if i < n_test + n_val else "training"
    return split


def _share(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return min(max(1, round(fraction * n)), n - 1)


class Preparer:
    """Runs the preparation of one source folder into one output folder."""

    def __init__(self, src: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions, log: Callable[[str], None] = print):
        self.src = Path(src)
        self.out = Path(out)
        self.options = options
        self.log = log
        # The chains are built once per run: MONAI's config parser looks every _target_ up by scanning
        # modules, which cost more than the volumes' whole computation when done for each case.
        self._volume_chains: dict[int | None, Compose] = {}
        self._slice_chains: dict[tuple[str | None, bool], Compose] = {}

    def run(self) -> PrepareResult:
        records = self._records()
        clinical = self._clinical(records)  # before any volume: a bad table fails the run at once
        split = split_cases(records, self.options)
        skipped: list[dict] = []
        stats = self._site_stats(records, split, skipped) if self.options.zscore else {}
        result = PrepareResult(self.out, [], 0, 0, skipped)
        # Sample files are written by a few threads (file I/O releases the GIL) while the next case
        # is computed; a case's manifest is written only once all its files are complete.
        with ThreadPoolExecutor(max_workers=WRITER_THREADS) as writers:
            writing: _PendingCase | None = None
            unreadable = {(s["site"], s["case"]) for s in skipped}  # already failed in the statistics pass
            for record in records:
                if (record.site, record.case) in unreadable:
                    continue
                try:
                    case = self._prepare_case(record, stats.get(record.site), writers)
                except DataError as err:
                    self._skip_or_raise(record, err, skipped)
                    continue
                if writing:
                    writing.finish()
                writing = None if case.reused else case
                result.reused += case.reused
                result.processed += not case.reused
                key = (record.site, record.case)
                attributes = {**case.manifest["attributes"], **clinical.get(key, {})}
                result.cases.append({**case.manifest, "attributes": attributes, "split": split[key]})
            if writing:
                writing.finish()
        self._write_datalists(result)
        save_json(self.out / "prepare.json", self._summary(result, stats))
        return result

    def _records(self) -> list[CaseRecord]:
        o = self.options
        records = find_cases(self.src, o.layout, msd_site=o.msd_site, msd_channel=o.msd_channel)
        if o.sites:
            unknown = sorted(set(o.sites) - {r.site for r in records})
            if unknown:
                raise DataError(self.src, f"sites not found: {', '.join(unknown)}")
            records = [r for r in records if r.site in o.sites]
        return records

    def _clinical(self, records: list[CaseRecord]) -> dict[tuple[str, str], dict]:
        """Clinical attributes of the cases, from the tables of the sites being prepared.

        A row whose case has no volumes is most likely a typo or a case removed on purpose: it is
        reported and ignored rather than failing the run.
        """
        o = self.options
        sites = sorted({r.site for r in records})
        clinical = read_clinical(self.src, o.layout, sites, msd_site=o.msd_site, reserved=VOLUME_ATTRIBUTES)
        orphans: dict[str, list[str]] = defaultdict(list)
        for site, case in sorted(set(clinical) - {(r.site, r.case) for r in records}):
            orphans[site].append(case)
        for site, cases in orphans.items():
            table = clinical_table_path(self.src, o.layout, site, o.msd_site)
            self.log(f"warning: {table}: no volumes for case(s) {', '.join(cases)}; their rows are ignored")
        return clinical

    def _skip_or_raise(self, record: CaseRecord, err: DataError, skipped: list[dict]) -> None:
        if self.options.on_error == "stop":
            raise err
        self.log(f"skipped {err}")
        skipped.append({"site": record.site, "case": record.case, "file": err.path, "problem": err.problem})

    def _load(self, record: CaseRecord) -> dict:
        """Load, check and bring a case to clipped, oriented, channel-first volumes."""
        image = load_volume(record.image)
        label = load_volume(record.label) if record.label else None
        check_case(record, image, label, self.options.num_classes if self.options.multi_class else None)
        try:
            if record.channel not in self._volume_chains:
                self._volume_chains[record.channel] = volume_transform(self.options, record.channel)
            return self._volume_chains[record.channel]({"image": image, "label": label})
        except RuntimeError as err:  # MONAI's Compose wraps the failing transform's error
            raise DataError(record.image, f"cannot be preprocessed: {err.__cause__ or err}") from err

    def _site_stats(self, records: list[CaseRecord], split: dict, skipped: list[dict]) -> dict[str, SiteStats]:
        """Z-score statistics per site over its training volumes, accumulated in float64."""
        sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        for record in records:
            if split[(record.site, record.case)] != "training":
                continue
            try:
                image = self._load(record)["image"].numpy().astype(np.float64)
            except DataError as err:
                self._skip_or_raise(record, err, skipped)
                continue
            sums[record.site] += (image.size, image.sum(), np.square(image).sum())
        stats = {}
        for site, (n, total, squares) in sums.items():
            mean = total / n
            stats[site] = SiteStats(float(mean), float(np.sqrt(max(squares / n - mean**2, 0.0))) or 1.0, int(n))
        missing = sorted({r.site for r in records} - set(stats))
        if missing:
            raise DataError(self.src, f"z-score needs training volumes, none usable for site(s) {', '.join(missing)}")
        return stats

    def _slice_chain(self, site: str | None, stats: SiteStats | None, keep_image_size: bool) -> Compose:
        """The slice chain for a site's statistics (z-score) and image store, built on first use."""
        key = (site, keep_image_size)
        if key not in self._slice_chains:
            self._slice_chains[key] = slice_transform(self.options, stats, keep_image_size)
        return self._slice_chains[key]

    def _fingerprint(self, record: CaseRecord, stats: SiteStats | None) -> str:
        sources = [record.image, record.label]
        key = {
            "version": fedfms.__version__,
            "options": self.options.content_options(),
            "channel": record.channel,
            "sources": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in sources if p is not None],
            "stats": asdict(stats) if stats else None,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def _manifest_path(self, record: CaseRecord) -> Path:
        return self.out / "cases" / record.site / f"{record.case}.json"

    def _prepare_case(self, record: CaseRecord, stats: SiteStats | None, writers: Executor) -> _PendingCase:
        """Compute a case's samples and start writing them, or reuse them if its manifest is current."""
        fingerprint = self._fingerprint(record, stats)
        manifest_path = self._manifest_path(record)
        if manifest_path.is_file():
            manifest = load_json(manifest_path)
            if manifest.get("fingerprint") == fingerprint and self._samples_exist(manifest):
                return _PendingCase(manifest_path, manifest, [], reused=True)
            manifest_path.unlink()  # stale: nothing may trust the old samples from here on
        volumes = self._load(record)
        attributes = _case_attributes(volumes)
        samples = self._slice_chain(record.site if stats else None, stats, stores_compact(self.options, volumes["image"]))(volumes)
        self._remove_case_samples(record)
        written, writes = self._write_samples(record, samples, writers)
        manifest = {
            "site": record.site,
            "case": record.case,
            "fingerprint": fingerprint,
            "source": {"image": str(record.image), "label": str(record.label), "channel": record.channel},
            "attributes": attributes,
            "samples": written,
        }
        return _PendingCase(manifest_path, manifest, writes, reused=False)

    def _write_samples(self, record: CaseRecord, samples: Iterable[dict], writers: Executor) -> tuple[list[dict], list[Future]]:
        dtype = np.dtype(self.options.image_dtype)
        written, writes = [], []
        for sample in samples:
            name = f"{record.case}_{sample['slice']:03d}.npy"
            image_rel = Path("images", record.site, name)
            label_rel = Path("labels", record.site, name)
            writes.append(writers.submit(save_npy, self.out / image_rel, sample["image"].numpy().astype(dtype, copy=False)))
            writes.append(writers.submit(save_npy, self.out / label_rel, sample["label"].numpy().astype(np.uint8)))
            written.append({"slice": int(sample["slice"]), "image": str(image_rel), "label": str(label_rel)})
        return written, writes

    def _remove_case_samples(self, record: CaseRecord) -> None:
        """Drop samples an earlier run wrote for this case (their number may differ now)."""
        for kind in ("images", "labels"):
            folder = self.out / kind / record.site
            if folder.is_dir():
                for path in folder.glob(f"{record.case}_[0-9][0-9][0-9].npy"):
                    path.unlink()

    def _samples_exist(self, manifest: dict) -> bool:
        return all((self.out / s[k]).is_file() for s in manifest["samples"] for k in ("image", "label"))

    def _write_datalists(self, result: PrepareResult) -> None:
        lists: dict[str, dict[str, list]] = defaultdict(lambda: {s: [] for s in SPLITS})
        for case in result.cases:
            lists[case["site"]][case["split"]].extend(_datalist_entries(case))
        for site, splits in lists.items():
            save_json(self.out / "datalists" / f"{site}.json", {"name": site, "site": site, **splits})

    def _summary(self, result: PrepareResult, stats: dict[str, SiteStats]) -> dict:
        cases = [
            {
                "site": c["site"],
                "case": c["case"],
                "split": c["split"],
                "samples": len(c["samples"]),
                "attributes": c["attributes"],
                "source": c["source"],
            }
            for c in result.cases
        ]
        return {
            "fedfms_version": fedfms.__version__,
            "source": str(self.src.resolve()),
            "options": asdict(self.options),
            "statistics": {"zscore": {site: asdict(s) for site, s in sorted(stats.items())}},
            "sites": sorted({c["site"] for c in cases}),
            "cases": cases,
            "skipped": result.skipped,
        }


def _datalist_entries(case: dict) -> list[dict]:
    """One decathlon entry per sample, paths relative to ``DATA/datalists``."""
    up = Path("..")
    return [
        {
            "image": str(up / s["image"]),
            "label": str(up / s["label"]),
            "site": case["site"],
            "case": case["case"],
            "slice": s["slice"],
        }
        for s in case["samples"]
    ]


def _case_attributes(volumes: dict) -> dict:
    """Per-case facts usable for attribute-skewed partitions and reports (:data:`VOLUME_ATTRIBUTES`)."""
    image, label = volumes["image"], volumes["label"]
    spacing = [float(s) for s in image.pixdim[:3]]
    foreground = int(torch.count_nonzero(label))
    return {
        "shape": [int(s) for s in image.shape[1:]],
        "spacing_mm": spacing,
        "num_slices": int(image.shape[-1]),
        "gland_volume_ml": round(foreground * float(np.prod(spacing)) / 1000.0, 3),
    }


def prepare(src: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions | None = None, log: Callable[[str], None] = print) -> PrepareResult:
    """Prepare every case under ``src`` into ``out``; see the module docstring for the output."""
    return Preparer(src, out, options or PrepareOptions(), log).run()
