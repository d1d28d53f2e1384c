"""Leave-one-site-out: the server scores the final global model on the site that never trained."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_component import FLComponent

from fedfms.bundle import evaluate_checkpoint
from fedfms.data.partition import UNSEEN
from fedfms.errors import DataError
from fedfms.io import load_json
from fedfms.paths import resolve_path


class UnseenSiteEvaluator(FLComponent):
    """Runs the bundle's ``evaluate.json`` on the test cases of a leave-one-site-out partition's unseen site.

    ``fedfms partition --method loso --unseen SITE`` writes that site's cases to ``unseen.json``
    (test split only). The unseen site takes no part in training, so its evaluation needs no
    federated client: :class:`fedfms.fl.final_eval.FinalEvaluation` calls :meth:`evaluate` with the
    final global checkpoint once the rounds are over, wherever this component runs (the server in
    the simulator; on a real deployment, the unseen data must be readable from the server).

    Args:
        bundle_root: the bundle the clients train (relative paths: see :mod:`fedfms.paths`).
        config_files: the clients' bundle configs, e.g. ``["train.json", "cpu_demo.json"]``.
        dataset_dir: prepared data folder holding the partition.
        datalist_dir: the leave-one-site-out partition inside ``dataset_dir``.
        overrides: further bundle overrides (e.g. the paper profile's ``pretrained_checkpoint``).
    """

    def __init__(self, bundle_root: str, config_files: list[str], dataset_dir: str, datalist_dir: str = "partitions/loso", overrides: dict | None = None) -> None:
        super().__init__()
        self.bundle_root = bundle_root
        self.config_files = list(config_files)
        self.dataset_dir = dataset_dir
        self.datalist_dir = datalist_dir
        self.overrides = dict(overrides or {})

    @property
    def partition_dir(self) -> Path:
        return resolve_path(self.dataset_dir) / self.datalist_dir

    def site_name(self) -> str:
        """The unseen site's name, from the partition summary."""
        folder = self.partition_dir
        if not (folder / f"{UNSEEN}.json").is_file():
            raise DataError(folder, f"no {UNSEEN}.json: not a leave-one-site-out partition (run `fedfms partition --method loso --unseen SITE`)")
        return load_json(folder / "partition.json")["options"]["unseen_site"]

    def evaluate(self, checkpoint: str | Path, eval_dir: str | Path) -> dict[str, float]:
        """Mean 2D Dice, 2D IoU and 3D Dice of ``checkpoint`` on the unseen site; full tables in ``eval_dir``."""
        self.site_name()  # fail early, naming the folder, when the partition is not leave-one-site-out
        return evaluate_checkpoint(
            self.bundle_root,
            self.config_files,
            checkpoint,
            eval_dir,
            dataset_dir=str(resolve_path(self.dataset_dir)),
            datalist_dir=self.datalist_dir,
            sites=UNSEEN,
            **self.overrides,
        )
