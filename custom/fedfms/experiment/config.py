"""An experiment file (YAML or JSON): data, methods, settings, rounds, epochs, seed; checked before anything runs.

Example (every key of the file; ``methods`` entries take the keys marked *)::

    name: cpu                          # default: the file's stem; names the output folder experiments/<name>
    out: experiments/cpu               # where cells and the report go (default experiments/<name>; --out wins)
    profile: cpu_demo                  # cpu_demo: bundle configs train.json + cpu_demo.json; paper: train.json alone
    device: cpu                        # optional: cpu, cuda, cuda:0 (default: the bundles' own choice)
    data: demo/data                    # * prepared data folder (`fedfms prepare`)
    partition: partitions/natural      # * client datalists inside data (local, centralized, federated)
    loso_partition: partitions/loso    # * the leave-one-site-out partition (`fedfms partition --method loso`)
    sites: [BIDMC, BMC, HK]            # * training sites (default: every client datalist of the partition)
    settings: [local, centralized, federated, loso]   # *
    rounds: 2                          # federated rounds
    epochs: 1                          # local epochs per round
    train_epochs: 2                    # local and centralized training epochs (default rounds x epochs)
    seed: 0
    size: lite                         # * SAM methods only (default: the profile's)
    image_size: 64                     # * SAM methods only
    pretrained: true                   # * SAM methods only; false = the papers' "-PT" (random weights)
    pretrained_checkpoint: null        # * SAM methods: a local checkpoint; required with profile paper
    overrides: {train#samples_per_epoch: 64}   # * any other bundle keys (as `fedfms job --override`); a method's add to these
    threads: 3                         # nvflare simulator -t (default: one per participant)
    task_timeout: null                 # seconds per federated task (default: the job's)
    cell_timeout: null                 # seconds a cell may run before it is stopped and recorded failed
    qualitative_slices: 3              # test slices per site whose predictions each cell keeps for the figure
    target_dice: 0.7                   # report: rounds until the mean validation Dice reaches it
    methods:
      - bundle: fedmsa_prostate        # * a folder under bundles/, or a path
        name: fedmsa                   # * default: bundle without _prostate (+ _<strategy>, _<init mode>, _pt)
        strategy: msa                  # * SAM methods: the fine-tuning strategy (default: the bundle's)
        job: fedmsa_prostate           # * the federated job (default: the bundle's, see JOBS)
        init_mode: fm                  # * jobs with the FM-instructed-init pre-stage: random, pretrain, fm
        prestage_epochs: 20            # * epochs of that pre-stage
        compress: blockwise8           # * federated cells: the exchange compressed (`fedfms job --compress`)
        algorithm: fedopt              # * federated cells: fedavg, fedprox, fedopt, scaffold, ditto (`fedfms job --algorithm`)
        algorithm_options: {server_optimizer: adam, server_lr: 0.01}   # * its settings: fedprox_mu, server_optimizer,
                                       #   server_lr, server_momentum, ditto_lambda (as the `fedfms job` flags)

Relative paths (data, bundles, jobs) are looked up as job configs do (:func:`fedfms.paths.resolve_path`:
the working directory, then the source tree, then the installed package). Whether the data is
there is not checked here: a missing data folder fails its cells only, with the path in their
reason, so the other cells still run. Everything else (keys, values, bundles, jobs) is checked
now, and an error names the file and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedfms.errors import DataError
from fedfms.io import load_json
from fedfms.paths import resolve_path

SETTINGS = ("local", "centralized", "federated", "loso")
FEDERATED_SETTINGS = ("federated", "loso")
PROFILES = {"cpu_demo": ("train.json", "cpu_demo.json"), "paper": ("train.json",)}  # profile -> bundle configs
CONFIG_DIR = Path(__file__).parent / "configs"  # the shipped experiments: algorithms, amp, cpu, compression, flapsam, fminit, paper
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SAM_MODELS = ("sam", "flapsam")
# Bundle -> its federated job (jobs/<name>).
JOBS = {
    "fedsam_prostate": "fedsam_prostate",
    "fedmsa_prostate": "fedmsa_prostate",
    "flapsam_prostate": "flapsam_prostate",
    "unet_prostate": "fedunet_prostate",
    "dynunet_prostate": "fednnunet_prostate",
    "smlite_prostate": "fminit_prostate",
}
FMINIT_WORKFLOW = "FMInstructedInit"
NAME = re.compile(r"[a-z0-9][a-z0-9_.]*")  # cell ids are <method>-<setting>: no '-' in names


class ConfigError(DataError):
    """A bad experiment file: the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Key:
    """One key of the file: ``check(value)`` returns the problem (None if the value is fine)."""

    check: Callable[[Any], str | None]
    default: Any = None
    required: bool = False


def _text(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a non-empty string"


def _count(minimum: int) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return None if ok else f"must be a whole number >= {minimum}, got {value!r}"

    return check


def _flag(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _fraction(value) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    return None if ok else f"must be a number in [0, 1], got {value!r}"


def _choice(options: Callable[[], Any]) -> Callable[[Any], str | None]:
    """``options`` is called when checking, so that heavy imports (models) happen only then."""

    def check(value) -> str | None:
        names = list(options())
        return None if value in names else f"unknown value {value!r}; choose from {', '.join(map(str, names))}"

    return check


def _names(value) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        return f"must be a non-empty list of names, got {value!r}"
    return None if len(set(value)) == len(value) else f"names a site twice: {value!r}"


def _settings(value) -> str | None:
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
        return f"must be a non-empty list of distinct settings ({', '.join(SETTINGS)}), got {value!r}"
    unknown = [v for v in value if v not in SETTINGS]
    return f"unknown setting(s) {', '.join(map(str, unknown))}; choose from {', '.join(SETTINGS)}" if unknown else None


def _overrides(value) -> str | None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and k for k in value)
    return None if ok else f"must be a mapping of bundle keys to values (e.g. {{train#samples_per_epoch: 64}}), got {value!r}"


def _image_size(value) -> str | None:
    problem = _count(16)(value)
    return problem or (None if value % 16 == 0 else f"must be a multiple of 16, got {value}")


def _identifier(value) -> str | None:
    ok = isinstance(value, str) and NAME.fullmatch(value)
    return None if ok else f"must be lower-case letters, digits, '_' or '.' (it is part of the cell ids <method>-<setting>), got {value!r}"


def _sam_sizes():
    from fedfms.models.sam import SAM_SIZES

    return SAM_SIZES


def _strategies():
    from fedfms.models.strategies import STRATEGIES

    return STRATEGIES


def _compression_modes():
    from fedfms.fl.filters.compression import MODES

    return MODES


def _algorithms():
    from fedfms.fl.job_config import ALGORITHMS

    return ALGORITHMS


ALGORITHM_OPTIONS = ("fedprox_mu", "server_optimizer", "server_lr", "server_momentum", "ditto_lambda")


def _algorithm_options(value) -> str | None:
    ok = isinstance(value, dict) and set(value) <= set(ALGORITHM_OPTIONS)
    return None if ok else f"must be a mapping of {', '.join(ALGORITHM_OPTIONS)} to values, got {value!r}"


def _init_modes():
    from fedfms.distillation.prestage import INIT_MODES

    return INIT_MODES


# Keys a method can set for itself; the experiment's value is the default.
SHARED = {
    "data": Key(_text, required=True),
    "partition": Key(_text, "partitions/natural"),
    "loso_partition": Key(_text, "partitions/loso"),
    "sites": Key(_names),
    "settings": Key(_settings, required=True),
    "size": Key(_choice(_sam_sizes)),
    "image_size": Key(_image_size),
    "pretrained": Key(_flag, True),
    "pretrained_checkpoint": Key(_text),
    "overrides": Key(_overrides),
}
SAM_ONLY = ("strategy", "size", "image_size", "pretrained", "pretrained_checkpoint")  # choose a SAM network
TOP = {
    "name": Key(_identifier),
    "description": Key(_text),
    "out": Key(_text),
    "profile": Key(_choice(lambda: PROFILES), "cpu_demo"),
    "device": Key(_text),
    "rounds": Key(_count(1), required=True),
    "epochs": Key(_count(1), required=True),
    "train_epochs": Key(_count(1)),
    "seed": Key(_count(0), 0),
    "threads": Key(_count(1)),
    "task_timeout": Key(_count(0)),
    "cell_timeout": Key(_count(1)),
    "qualitative_slices": Key(_count(0), 3),
    "target_dice": Key(_fraction, 0.7),
    **SHARED,
}
METHOD = {
    "name": Key(_identifier),
    "bundle": Key(_text, required=True),
    "job": Key(_text),
    "strategy": Key(_choice(_strategies)),
    "init_mode": Key(_choice(_init_modes)),
    "prestage_epochs": Key(_count(1)),
    "compress": Key(_choice(_compression_modes)),
    "algorithm": Key(_choice(_algorithms)),
    "algorithm_options": Key(_algorithm_options),
    **{k: Key(v.check) for k, v in SHARED.items()},  # no defaults of their own: the experiment's apply
}


@dataclass(frozen=True)
class MethodConfig:
    """One method: a bundle (and its federated job) with the choices that make it FedSAM, FedMSA-PT, FLAP-SAM ..."""

    name: str
    bundle: str  # absolute bundle folder
    job: str | None  # absolute job folder; None when the method has no federated setting
    model: str  # the bundle's method.json model: sam, flapsam, unet, dynunet, smlite
    strategy: str
    pretrained: bool
    settings: tuple[str, ...]
    data: str  # absolute prepared data folder (may not exist: its cells fail)
    partition: str
    loso_partition: str
    sites: tuple[str, ...] | None
    size: str | None = None
    image_size: int | None = None
    pretrained_checkpoint: str | None = None
    init_mode: str | None = None
    prestage_epochs: int | None = None
    compress: str | None = None  # federated cells: the compression mode of the exchange (None: fp32)
    algorithm: str | None = None  # federated cells: how the server and sites federate (None: the job's FedAvg)
    algorithm_options: tuple[tuple[str, Any], ...] = ()  # its settings (fedprox_mu, server_optimizer, ...), sorted
    overrides: tuple[tuple[str, Any], ...] = ()  # bundle keys -> values, sorted (hashable)


@dataclass(frozen=True)
class ExperimentConfig:
    """A checked experiment file; ``path`` is where it was read from."""

    path: Path
    name: str
    profile: str
    rounds: int
    epochs: int
    train_epochs: int
    seed: int
    methods: tuple[MethodConfig, ...]
    description: str | None = None
    out: str | None = None
    device: str | None = None
    threads: int | None = None
    task_timeout: int | None = None
    cell_timeout: int | None = None
    qualitative_slices: int = 3
    target_dice: float = 0.7

    @property
    def config_files(self) -> tuple[str, ...]:
        """The bundle configs of the profile, complete config first."""
        return PROFILES[self.profile]


def shipped_configs() -> list[str]:
    """Names of the experiments shipped with the package (``fedfms experiment NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(config: str | os.PathLike) -> Path:
    """The experiment file ``config`` names: a path, or the name of a shipped experiment (algorithms, amp, cpu, compression, flapsam, fminit, paper)."""
    path = Path(config)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name}.yaml"
    if path.suffix == "" and len(path.parts) == 1 and shipped.is_file():
        return shipped
    raise ConfigError(path, f"no experiment file here, and not a shipped experiment ({', '.join(shipped_configs())})")


def read_file(path: Path) -> dict:
    """The file's top-level mapping (JSON for .json, YAML otherwise); a syntax error names the file and the line."""
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(path, f"is not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(path, f"must hold a mapping of keys (name, data, settings, methods ...), got {type(data).__name__}")
    return data


def load_config(config: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and check an experiment file; ``overrides`` replace its top-level keys (the command line's --rounds ...)."""
    path = find_config(config)
    raw = {**read_file(path), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    return parse_config(raw, path)


def parse_config(raw: dict, path: Path) -> ExperimentConfig:
    """Check every key of ``raw`` (read from ``path``) and resolve the methods."""
    top = _checked(raw, {**TOP, "methods": Key(lambda v: None, required=True)}, path, "")
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods:
        raise ConfigError(path, f"methods: must be a non-empty list of methods (each with a bundle), got {methods!r}")
    resolved = tuple(_method(entry, top, path, f"methods[{i}]") for i, entry in enumerate(methods))
    _check_unique(resolved, path)
    train_epochs = top["train_epochs"] or top["rounds"] * top["epochs"]
    for method in resolved:
        _check_checkpoint(method, top["profile"], path)
    fields = ("description", "out", "device", "threads", "task_timeout", "cell_timeout", "qualitative_slices", "target_dice")
    return ExperimentConfig(
        path=path, name=top["name"] or path.stem, profile=top["profile"], rounds=top["rounds"], epochs=top["epochs"],
        train_epochs=train_epochs, seed=top["seed"], methods=resolved, **{k: top[k] for k in fields},
    )


def _checked(raw: Any, keys: dict[str, Key], path: Path, where: str, defaults: bool = True) -> dict:
    """``raw`` with every key known, present when required and valid; absent keys get their default."""
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        raise ConfigError(path, f"{where}: must be a mapping of keys, got {raw!r}")
    for key in raw:
        if key not in keys:
            raise ConfigError(path, f"{prefix}{key}: unknown key; known keys: {', '.join(keys)}")
    values = {}
    for key, spec in keys.items():
        value = raw.get(key)
        if value is None:
            if spec.required and defaults:
                raise ConfigError(path, f"{prefix}{key}: required key missing")
            values[key] = spec.default if defaults else None
            continue
        problem = spec.check(value)
        if problem:
            raise ConfigError(path, f"{prefix}{key}: {problem}")
        values[key] = value
    return values


def _method(raw: Any, top: dict, path: Path, where: str) -> MethodConfig:
    """One ``methods`` entry, with the experiment's values where it sets none."""
    own = _checked(raw, METHOD, path, where, defaults=False)
    bundle = _bundle(own["bundle"], path, where)
    method = load_json(bundle / "configs" / "method.json")
    model = method["model"]
    if model not in SAM_MODELS:
        given = [k for k in SAM_ONLY if own[k] is not None]
        if given:
            raise ConfigError(path, f"{where}.{given[0]}: applies to SAM methods (sam, flapsam); {bundle.name} is a {model}")
    value = {k: own[k] if own[k] is not None else top[k] for k in SHARED}
    overrides = {**(top["overrides"] or {}), **(own["overrides"] or {})}  # the method's win over the experiment's
    sam = model in SAM_MODELS
    settings = tuple(value["settings"])
    job = _job(own, bundle, path, where) if set(settings) & set(FEDERATED_SETTINGS) else None
    strategy = own["strategy"] or method["strategy"]
    pretrained = bool(value["pretrained"]) if sam else True
    name = own["name"] or _default_name(bundle.name, strategy if strategy != method["strategy"] else None, own["init_mode"], pretrained,
                                        own["compress"], own["algorithm"])
    algorithm_options = own["algorithm_options"] or {}
    _check_algorithm(own["algorithm"], algorithm_options, path, where)
    checkpoint = value["pretrained_checkpoint"] if sam and pretrained else None
    return MethodConfig(
        name=name, bundle=str(bundle), job=job, model=model, strategy=strategy, pretrained=pretrained, settings=settings,
        data=str(resolve_path(value["data"])), partition=value["partition"], loso_partition=value["loso_partition"],
        sites=tuple(value["sites"]) if value["sites"] else None,
        size=value["size"] if sam else None, image_size=value["image_size"] if sam else None,
        pretrained_checkpoint=str(Path(checkpoint).expanduser().resolve()) if checkpoint else None,
        init_mode=own["init_mode"], prestage_epochs=own["prestage_epochs"], compress=own["compress"], overrides=tuple(sorted(overrides.items())),
        algorithm=own["algorithm"], algorithm_options=tuple(sorted(algorithm_options.items())),
    )


def _check_algorithm(algorithm: str | None, options: dict, path: Path, where: str) -> None:
    """The algorithm's settings as ``fedfms job`` checks them (the job's own refusals come when its cells are built)."""
    from fedfms.fl.job_config import JobOptions

    try:
        JobOptions(algorithm=algorithm, **options)
    except ValueError as error:
        raise ConfigError(path, f"{where}.algorithm_options: {error}") from error


def _bundle(value: str, path: Path, where: str) -> Path:
    """A bundle folder: a bare name is a folder under ``bundles/``."""
    name = Path(value)
    folder = resolve_path(Path("bundles") / name if len(name.parts) == 1 else name)
    if not (folder / "configs" / "method.json").is_file():
        raise ConfigError(path, f"{where}.bundle: no fedfms bundle (configs/method.json) at {folder}")
    return folder


def _job(own: dict, bundle: Path, path: Path, where: str) -> str:
    """The method's federated job folder: given, or the bundle's (``JOBS``); a pre-stage option needs a pre-stage."""
    name = own["job"] or JOBS.get(bundle.name)
    if name is None:
        raise ConfigError(path, f"{where}.job: {bundle.name} has no default federated job; name one (e.g. jobs/fedmsa_prostate)")
    folder = resolve_path(Path("jobs") / name if len(Path(name).parts) == 1 else name)
    server = folder / "app" / "config" / "config_fed_server.json"
    if not server.is_file():
        raise ConfigError(path, f"{where}.job: no NVFlare job (app/config/config_fed_server.json) at {folder}")
    if (own["init_mode"] or own["prestage_epochs"]) and FMINIT_WORKFLOW not in server.read_text():
        key = "init_mode" if own["init_mode"] else "prestage_epochs"
        raise ConfigError(path, f"{where}.{key}: needs a job with the {FMINIT_WORKFLOW} pre-stage (jobs/fminit_prostate); {folder.name} has none")
    return str(folder)


def _default_name(bundle: str, strategy: str | None, init_mode: str | None, pretrained: bool, compress: str | None = None,
                  algorithm: str | None = None) -> str:
    """``fedmsa``, ``flapsam_dec``, ``smlite_fm``, ``fedsam_pt``, ``flapsam_nf4``, ``fedmsa_scaffold``: the bundle without ``_prostate`` and what differs."""
    parts = [bundle.removesuffix("_prostate").lower(), strategy, init_mode, None if pretrained else "pt", compress, algorithm]
    return "_".join(p for p in parts if p)


def _check_unique(methods: tuple[MethodConfig, ...], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, method in enumerate(methods):
        if method.name in seen:
            raise ConfigError(path, f"methods[{index}].name: {method.name!r} is also the name of methods[{seen[method.name]}]; give each method its own name")
        seen[method.name] = index


def _check_checkpoint(method: MethodConfig, profile: str, path: Path) -> None:
    """The paper profile trains foundation models from their pretrained weights: the checkpoint is required."""
    if profile == "paper" and method.model in SAM_MODELS and method.pretrained and not method.pretrained_checkpoint:
        raise ConfigError(
            path,
            f"pretrained_checkpoint: required by the paper profile for {method.name} (a local SAM checkpoint such as "
            "sam_vit_b_01ec64.pth; set it in the file or with --pretrained-checkpoint), or pretrained: false for '-PT'",
        )
