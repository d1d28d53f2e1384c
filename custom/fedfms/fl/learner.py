"""The federated client: a MONAI bundle's training workflow behind NVFlare's ModelLearner API.

Each round the site receives the global values of the strategy's trainable parameters, loads
them into the bundle's network (its frozen weights never leave the site and never arrive), scores
the received global model on its validation split, trains ``local_epochs`` with the bundle's own
trainer (loss, optimiser, handlers and its per-epoch validation), and sends back only the trainable
parameters, weighted by its number of training samples. Train loss and validation Dice are
streamed to the server's TensorBoard through NVFlare's tracking API (a ``TBWriter`` component).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model_learner import ModelLearner
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from fedfms.errors import DataError
from fedfms.paths import resolve_path

EXCLUDED_DATALISTS = {"partition", "server_proxy", "unseen"}


def site_datalist(site: str, datalist_dir: str | os.PathLike) -> str:
    """The datalist a federated site trains on.

    A datalist named after the site is used as is (real hospital names, ``-c RUNMC,BMC``).
    NVFlare's default names ``site-1 .. site-N`` map onto the prepared client datalists in sorted
    order, so the simulator runs on the prepared sites without renaming anything.
    """
    folder = Path(datalist_dir)
    names = sorted(p.stem for p in folder.glob("*.json") if p.stem not in EXCLUDED_DATALISTS)
    if site in names:
        return site
    match = re.fullmatch(r"site-(\d+)", site)
    if match and 1 <= int(match.group(1)) <= len(names):
        return names[int(match.group(1)) - 1]
    raise DataError(folder, f"no datalist for site {site!r}; available: {', '.join(names) or 'none'} (run `make demo` or `fedfms partition`)")


class BundleLearner(ModelLearner):
    """Trains a site's share of a MONAI bundle under NVFlare.

    Args:
        bundle_root: the bundle folder, e.g. ``bundles/fedmsa_prostate`` (relative paths: see :mod:`fedfms.paths`).
        config_files: bundle configs merged in order (``["train.json", "cpu_demo.json"]`` for the demo).
        dataset_dir: prepared data folder (``fedfms prepare`` output).
        datalist_dir: folder of the client datalists inside ``dataset_dir`` (a partition).
        local_epochs: epochs of local training per round.
        tracking_writer_id: id of the client's NVFlare ``TBWriter`` component; empty disables streaming.
        overrides: further bundle config overrides (e.g. ``{"batch_size": 4}``).
    """

    def __init__(
        self,
        bundle_root: str,
        config_files: list[str] | None = None,
        dataset_dir: str = "demo/data",
        datalist_dir: str = "partitions/natural",
        local_epochs: int = 1,
        tracking_writer_id: str = "tb_writer",
        overrides: dict | None = None,
    ) -> None:
        super().__init__()
        self.bundle_root = bundle_root
        self.config_files = list(config_files or ["train.json"])
        self.dataset_dir = dataset_dir
        self.datalist_dir = datalist_dir
        self.local_epochs = local_epochs
        self.tracking_writer_id = tracking_writer_id
        self.overrides = dict(overrides or {})
        self.workflow: ConfigWorkflow | None = None

    def initialize(self) -> None:
        fobs.register(TensorDecomposer)  # torch tensors travel as tensors, as NVFlare's PT components send them
        bundle_root = str(resolve_path(self.bundle_root))
        dataset_dir = str(resolve_path(self.dataset_dir))
        datalist = site_datalist(self.site_name, Path(dataset_dir) / self.datalist_dir)
        self.info(f"site {self.site_name} trains on datalist {datalist} of {dataset_dir}/{self.datalist_dir}")
        self.workflow = ConfigWorkflow(
            config_file=[str(Path(bundle_root) / "configs" / name) for name in self.config_files],
            workflow_type="train",
            bundle_root=bundle_root,
            logging_file=False,
            dataset_dir=dataset_dir,
            datalist_dir=self.datalist_dir,
            sites=datalist,
            max_epochs=self.local_epochs,
            output_dir=str(Path(self.app_root or ".") / "models"),
            log_dir=str(Path(self.app_root or ".") / "logs"),
            **self.overrides,
        )
        self.workflow.initialize()
        self.trainer = self.workflow.trainer
        self.evaluator = self.workflow.parser.get_parsed_content("validate#evaluator")
        self.network = self.trainer.network
        self.exchange_keys = [name for name, p in self.network.named_parameters() if p.requires_grad]
        self.num_train_samples = len(self.trainer.data_loader.dataset)
        self.writer = self.engine.get_component(self.tracking_writer_id) if self.tracking_writer_id and self.engine else None

    def train(self, model: FLModel) -> FLModel:
        self._load_global(model)
        global_dice = self._validate()
        self._track("global_val_dice", global_dice)
        self._train_local()
        local_dice = float(self.evaluator.state.metrics.get("val_mean_dice", float("nan")))
        self._track("local_val_dice", local_dice)
        return FLModel(
            params={k: v.detach().cpu() for k, v in self.network.named_parameters() if k in set(self.exchange_keys)},
            params_type=ParamsType.FULL,
            metrics={"global_val_dice": global_dice, "local_val_dice": local_dice},
            meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: self.num_train_samples, "num_train_samples": self.num_train_samples},
        )

    def validate(self, model: FLModel) -> FLModel:
        self._load_global(model)
        return FLModel(metrics={"val_mean_dice": self._validate()})

    def finalize(self) -> None:
        if self.workflow is not None:
            self.workflow.finalize()

    def _load_global(self, model: FLModel) -> None:
        """Copy the received trainable values into the network; anything else arriving is a bug upstream."""
        received = set(model.params or {})
        expected = set(self.exchange_keys)
        if received != expected:
            missing, extra = sorted(expected - received)[:5], sorted(received - expected)[:5]
            raise ValueError(f"global model keys differ from this strategy's trainable keys: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, parameter in self.network.named_parameters():
                if name in received:
                    parameter.copy_(torch.as_tensor(model.params[name]))

    def _validate(self) -> float:
        self.evaluator.run()
        return float(self.evaluator.state.metrics.get("val_mean_dice", float("nan")))

    def _train_local(self) -> None:
        """Continue the bundle's trainer for ``local_epochs`` more epochs (its state carries across rounds)."""
        state = self.trainer.state
        state.max_epochs = state.epoch + self.local_epochs
        self.trainer.run()
        self._track("train_loss", float(state.output[0]["loss"]) if isinstance(state.output, list) else float(state.output["loss"]))

    def _track(self, tag: str, value: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, global_step=self.current_round or 0)
