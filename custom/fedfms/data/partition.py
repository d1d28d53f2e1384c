"""Client datalists from prepared per-site datalists: who holds which cases in a federation.

Methods (all assign whole cases, never single slices; every case goes to exactly one owner):
    ``natural``:   one client per site, as the hospitals hold the data.
    ``loso``:      leave one site out: the other sites are clients, the unseen site is test-only.
    ``quantity``:  cases pooled and dealt to K clients in Dirichlet(alpha)-drawn proportions.
    ``attribute``: cases sorted by a per-case attribute and cut into K contiguous groups
                   (e.g. by age: the youngest patients at client 1).
    ``dirichlet``: each source site's cases spread over K clients in Dirichlet(alpha) proportions,
                   so a small alpha gives each client few, different sites.
Pooled methods keep each case's prepared split (training/validation/testing) and deal every split
separately, so each client gets cases of each split when there are enough.

Before assignment a server proxy set is carved from the training cases (``proxy_fraction`` of each
site's training cases); no client sees it. Output, with paths relative to the output folder:

    OUT/<client>.json        decathlon-style training/validation/testing lists
    OUT/server_proxy.json    the proxy set, as ``training``
    OUT/unseen.json          (loso) the unseen site, as ``testing``
    OUT/partition.json       options, owners of every case, per-client counts
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedfms.data.prepare import SPLITS
from fedfms.errors import DataError
from fedfms.io import load_json, save_json

METHODS = ("natural", "loso", "quantity", "attribute", "dirichlet")
PROXY = "server_proxy"
UNSEEN = "unseen"

CaseKey = tuple[str, str]  # (site, case)
SUMMARY = "partition"


def client_datalists(folder: str | os.PathLike) -> list[str]:
    """Names of the client datalists in a datalist folder: not the summary, the proxy or the unseen site."""
    return sorted(p.stem for p in Path(folder).glob("*.json") if p.stem not in {SUMMARY, PROXY, UNSEEN})


def unseen_site(folder: str | os.PathLike) -> str | None:
    """The site a leave-one-site-out partition keeps out of training (its ``unseen.json``), else None."""
    folder = Path(folder)
    if not (folder / f"{UNSEEN}.json").is_file():
        return None
    return load_json(folder / f"{SUMMARY}.json")["options"]["unseen_site"]


@dataclass
class PartitionOptions:
    """Every knob of ``fedfms partition``; recorded in ``partition.json``."""

    method: str = "natural"
    num_clients: int = 3  # quantity, attribute, dirichlet
    unseen_site: str | None = None  # loso
    # attribute: a prepared case attribute (clinical.csv columns too, e.g. age) or a column of attributes_csv
    attribute: str = "gland_volume_ml"
    attributes_csv: str | None = None  # per-case table with columns site, case, <attribute>...
    alpha: float = 0.5  # Dirichlet concentration for quantity and dirichlet
    proxy_fraction: float = 0.1
    client_prefix: str = "site-"
    client_names: tuple[str, ...] | None = None  # pooled methods: the clients' names (e.g. the hospitals'), instead of <prefix>1..K
    seed: int = 0

    def __post_init__(self) -> None:
        if self.client_names is not None:
            self._check_client_names()
        if self.method not in METHODS:
            raise ValueError(f"unknown partition method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "loso" and not self.unseen_site:
            raise ValueError("leave-one-site-out needs the unseen site (--unseen SITE)")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {self.num_clients}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.proxy_fraction < 1:
            raise ValueError(f"proxy_fraction must be in [0, 1), got {self.proxy_fraction}")


    def _check_client_names(self) -> None:
        names = tuple(self.client_names)
        if self.method in ("natural", "loso"):
            raise ValueError(f"client names are the sites' own in a {self.method} partition; --client-names is for quantity, attribute, dirichlet")
        reserved = sorted(set(names) & {SUMMARY, PROXY, UNSEEN})
        if reserved:
            raise ValueError(f"client name {reserved[0]!r} is reserved for a partition file; choose another")
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"client names must be distinct and non-empty, got {', '.join(names)}")
        self.client_names = names
        self.num_clients = len(names)


@dataclass
class Case:
    """A prepared case: its split, its datalist entries (absolute paths) and its attributes."""

    site: str
    case: str
    split: str
    entries: list[dict]
    attributes: dict

    @property
    def key(self) -> CaseKey:
        return (self.site, self.case)


def load_prepared_cases(data_dir: str | os.PathLike, attributes_csv: str | os.PathLike | None = None) -> list[Case]:
    """Read every ``DATA/datalists/<site>.json`` and the case attributes of ``DATA/prepare.json``."""
    data_dir = Path(data_dir)
    lists_dir = data_dir / "datalists"
    paths = sorted(lists_dir.glob("*.json")) if lists_dir.is_dir() else []
    if not paths:
        raise DataError(lists_dir, "no prepared datalists found; run `fedfms prepare` first")
    attributes = {(c["site"], c["case"]): dict(c.get("attributes", {})) for c in load_json(data_dir / "prepare.json")["cases"]}
    if attributes_csv:
        for key, row in _read_attributes_csv(Path(attributes_csv)).items():
            attributes.setdefault(key, {}).update(row)
    cases: dict[CaseKey, Case] = {}
    for path in paths:
        datalist = load_json(path)
        for split in SPLITS:
            for entry in datalist.get(split, []):
                key = (entry["site"], entry["case"])
                absolute = {**entry, "image": str((path.parent / entry["image"]).resolve()), "label": str((path.parent / entry["label"]).resolve())}
                case = cases.setdefault(key, Case(key[0], key[1], split, [], attributes.get(key, {})))
                if case.split != split:
                    raise DataError(path, f"case {key[1]} of site {key[0]} appears in both {case.split} and {split}")
                case.entries.append(absolute)
    return sorted(cases.values(), key=lambda c: c.key)


def _read_attributes_csv(path: Path) -> dict[CaseKey, dict]:
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"site", "case"} <= set(rows[0]):
        raise DataError(path, "needs a header with columns 'site' and 'case'")
    return {(r.pop("site"), r.pop("case")): {k: _number(v) for k, v in r.items()} for r in rows}


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def allocate(n: int, proportions: Sequence[float], minimum: int = 0) -> list[int]:
    """Split ``n`` items into counts proportional to ``proportions`` (largest remainder), each >= ``minimum`` when possible."""
    p = np.asarray(proportions, dtype=float)
    p = p / p.sum()
    counts = np.floor(p * n).astype(int)
    for i in np.argsort(-(p * n - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= minimum * len(p):
        while counts.min() < minimum:
            counts[counts.argmax()] -= 1
            counts[counts.argmin()] += 1
    return counts.tolist()


def _deal(cases: list[Case], counts: Sequence[int], clients: Sequence[str]) -> dict[CaseKey, str]:
    owners, start = {}, 0
    for client, count in zip(clients, counts):
        owners.update({c.key: client for c in cases[start : start + count]})
        start += count
    return owners


class Partitioner:
    """Assigns every prepared case to a client, the server proxy set, or the unseen test site."""

    def __init__(self, cases: list[Case], options: PartitionOptions) -> None:
        self.cases = cases
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        self.sites = sorted({c.site for c in cases})
        if options.method == "loso" and options.unseen_site not in self.sites:
            raise ValueError(f"unseen site {options.unseen_site!r} is not among the prepared sites {self.sites}")

    @property
    def clients(self) -> list[str]:
        o = self.options
        if o.method == "natural":
            return list(self.sites)
        if o.method == "loso":
            return [s for s in self.sites if s != o.unseen_site]
        return list(o.client_names) if o.client_names else [f"{o.client_prefix}{i + 1}" for i in range(o.num_clients)]

    def owners(self) -> dict[CaseKey, str]:
        """Owner of every case: a client name, ``server_proxy`` or ``unseen``."""
        o = self.options
        owners = {c.key: UNSEEN for c in self.cases if o.method == "loso" and c.site == o.unseen_site}
        owners.update(self._carve_proxy([c for c in self.cases if c.key not in owners]))
        pool = [c for c in self.cases if c.key not in owners]
        assign: Callable[[list[Case]], dict[CaseKey, str]] = {
            "natural": self._by_site,
            "loso": self._by_site,
            "quantity": self._quantity,
            "attribute": self._attribute,
            "dirichlet": self._dirichlet,
        }[o.method]
        owners.update(assign(pool))
        return owners

    def _carve_proxy(self, cases: list[Case]) -> dict[CaseKey, str]:
        proxy = {}
        for site in self.sites:
            training = [c for c in cases if c.site == site and c.split == "training"]
            random.Random(f"{self.options.seed}:proxy:{site}").shuffle(training)
            share = round(self.options.proxy_fraction * len(training))
            if self.options.proxy_fraction > 0 and len(training) >= 2:
                share = min(max(share, 1), len(training) - 1)  # the site keeps a training case
            proxy.update({c.key: PROXY for c in training[:share]})
        return proxy

    def _by_site(self, cases: list[Case]) -> dict[CaseKey, str]:
        return {c.key: c.site for c in cases}

    def _per_split(self, cases: list[Case]) -> dict[str, list[Case]]:
        groups = {split: [c for c in cases if c.split == split] for split in SPLITS}
        for split, group in groups.items():
            random.Random(f"{self.options.seed}:{split}").shuffle(group)
        return groups

    def _quantity(self, cases: list[Case]) -> dict[CaseKey, str]:
        proportions = self.rng.dirichlet([self.options.alpha] * len(self.clients))
        owners = {}
        for group in self._per_split(cases).values():
            owners.update(_deal(group, allocate(len(group), proportions, minimum=1), self.clients))
        return owners

    def _attribute(self, cases: list[Case]) -> dict[CaseKey, str]:
        name = self.options.attribute
        missing = [f"{c.site}/{c.case}" for c in cases if not isinstance(c.attributes.get(name), (int, float))]
        if missing:
            raise ValueError(
                f"attribute {name!r} is missing or not a number for cases {', '.join(missing[:5])}; case attributes are "
                "those prepare computed or read from each site's clinical.csv, and the columns of --attributes-csv"
            )
        owners = {}
        even = [1.0] * len(self.clients)
        for group in self._per_split(cases).values():
            group.sort(key=lambda c: (c.attributes[name], c.key))
            owners.update(_deal(group, allocate(len(group), even), self.clients))
        return owners

    def _dirichlet(self, cases: list[Case]) -> dict[CaseKey, str]:
        site_proportions = {site: self.rng.dirichlet([self.options.alpha] * len(self.clients)) for site in self.sites}
        owners = {}
        for split, group in self._per_split(cases).items():
            for site in self.sites:
                of_site = [c for c in group if c.site == site]
                owners.update(_deal(of_site, allocate(len(of_site), site_proportions[site]), self.clients))
        return self._ensure_training_case(cases, owners)

    def _ensure_training_case(self, cases: list[Case], owners: dict[CaseKey, str]) -> dict[CaseKey, str]:
        """Move a training case to any client left without one, from the client holding most."""
        training = [c.key for c in cases if c.split == "training"]
        for client in self.clients:
            held = defaultdict(list)
            for key in training:
                held[owners[key]].append(key)
            if not held[client] and len(training) >= len(self.clients):
                donor = max(held, key=lambda k: len(held[k]))
                owners[held[donor][-1]] = client
        return owners


@dataclass
class PartitionResult:
    """Per-owner case and slice counts by split, and the files written."""

    out_dir: Path
    counts: dict[str, dict[str, dict[str, int]]]  # owner -> {"cases"|"slices": {split: n}}
    owners: dict[CaseKey, str]

    def table(self) -> str:
        """A plain-text summary: cases and slices per client and split."""
        header = f"{'owner':<16}{'cases train/val/test':>22}{'slices train/val/test':>24}"
        lines = [header, "-" * len(header)]
        for owner, c in self.counts.items():
            cases = "/".join(str(c["cases"][s]) for s in SPLITS)
            slices = "/".join(str(c["slices"][s]) for s in SPLITS)
            lines.append(f"{owner:<16}{cases:>22}{slices:>24}")
        return "\n".join(lines)


def partition(data_dir: str | os.PathLike, out_dir: str | os.PathLike, options: PartitionOptions | None = None) -> PartitionResult:
    """Partition the prepared data in ``data_dir`` and write the owners' datalists into ``out_dir``."""
    options = options or PartitionOptions()
    cases = load_prepared_cases(data_dir, options.attributes_csv)
    partitioner = Partitioner(cases, options)
    owners = partitioner.owners()
    _check_complete_and_disjoint(cases, owners)
    out_dir = Path(out_dir)
    datalists = _datalists(cases, owners, partitioner.clients, out_dir)
    _remove_previous(out_dir)
    for owner, datalist in datalists.items():
        save_json(out_dir / f"{owner}.json", {"name": owner, **datalist})
    counts = {owner: _count(cases, owners, owner) for owner in datalists}
    save_json(
        out_dir / f"{SUMMARY}.json",
        {
            "data_dir": str(Path(data_dir).resolve()),
            "options": asdict(options),
            "clients": partitioner.clients,
            "files": sorted(f"{owner}.json" for owner in datalists),
            "counts": counts,
            "owners": [{"site": s, "case": c, "owner": o} for (s, c), o in sorted(owners.items())],
        },
    )
    return PartitionResult(out_dir, counts, owners)


def _check_complete_and_disjoint(cases: list[Case], owners: dict[CaseKey, str]) -> None:
    keys = [c.key for c in cases]
    if len(set(keys)) != len(keys) or set(owners) != set(keys):
        raise AssertionError("partition is not complete and disjoint by case")  # a bug, never bad input


def _datalists(cases: list[Case], owners: dict[CaseKey, str], clients: list[str], out_dir: Path) -> dict[str, dict]:
    lists = {owner: {split: [] for split in SPLITS} for owner in [*clients, *sorted(set(owners.values()) - set(clients))]}
    for case in cases:
        owner = owners[case.key]
        lists[owner][_split_at_owner(case, owner)].extend(_relative(e, out_dir) for e in case.entries)
    return lists


def _split_at_owner(case: Case, owner: str) -> str:
    """The server trains on its proxy cases; the unseen site only tests; clients keep the prepared split."""
    return "training" if owner == PROXY else "testing" if owner == UNSEEN else case.split


def _relative(entry: dict, out_dir: Path) -> dict:
    base = out_dir.resolve()
    return {**entry, "image": os.path.relpath(entry["image"], base), "label": os.path.relpath(entry["label"], base)}


def _count(cases: list[Case], owners: dict[CaseKey, str], owner: str) -> dict[str, dict[str, int]]:
    counts = {"cases": dict.fromkeys(SPLITS, 0), "slices": dict.fromkeys(SPLITS, 0)}
    for case in cases:
        if owners[case.key] == owner:
            split = _split_at_owner(case, owner)
            counts["cases"][split] += 1
            counts["slices"][split] += len(case.entries)
    return counts


def _remove_previous(out_dir: Path) -> None:
    """Remove the datalists of an earlier partition in the same folder, so none is left stale."""
    summary = out_dir / f"{SUMMARY}.json"
    if summary.is_file():
        for name in load_json(summary).get("files", []):
            (out_dir / name).unlink(missing_ok=True)
