"""FM-instructed initialisation as a server workflow that runs before the federated rounds.

List it in ``config_fed_server.json`` before the FedAvg workflow, with the same persistor:

    {"id": "fminit", "path": "fedfms.fl.workflows.fminit.FMInstructedInit",
     "args": {"mode": "fm", "bundle_root": "bundles/smlite_prostate", ..., "teacher": {"kind": "litemedsam"}}}

NVFlare runs workflows one after the other, so the pre-stage trains the student on the server's
proxy set (:func:`fedfms.distillation.run_prestage`) and hands it to the persistor
(:meth:`fedfms.fl.persistors.trainable.TrainableModelPersistor.adopt_initial_model`); FedAvg's round 0 then
sends the student's weights, and only those, to the clients. Nothing of the proxy set or the
teacher leaves the server. A bad input (no proxy set, an empty one, one without foreground, a
missing teacher checkpoint) stops the job here, before round 0, with an error naming the path.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from nvflare.apis.fl_constant import FLContextKey
from nvflare.app_common.workflows.model_controller import ModelController

from fedfms.bundle import bundle_parser
from fedfms.data.partition import PROXY
from fedfms.distillation import PrestageSettings, TeacherSpec, run_prestage
from fedfms.errors import DataError
from fedfms.fl.site_settings import read_site_settings
from fedfms.io import save_json
from fedfms.paths import resolve_path


class FMInstructedInit(ModelController):
    """Initialise the global model by ``random``, ``pretrain`` or ``fm`` (see :mod:`fedfms.distillation.prestage`).

    Args:
        mode: ``random`` (no pre-stage), ``pretrain`` (supervised on the proxy set) or ``fm``
            (distillation from the teacher).
        bundle_root, config_files: the student's bundle and configs, as the clients' learner has
            them (its sample transforms and output size are used; relative paths: see
            :mod:`fedfms.paths`).
        dataset_dir, datalist_dir: the prepared data and the partition whose ``server_proxy.json`` is read.
        teacher: :class:`~fedfms.distillation.TeacherSpec` fields: ``kind`` (``litemedsam``,
            ``sam_med2d``, ``sam``), ``checkpoint`` (a local path; LiteMedSAM's is packaged),
            ``size``, ``image_size``, ``box_jitter``, ``seed``, ``precision`` (``auto``, the default:
            bf16 where the server's CPU computes it natively, else ``float32``; or either by name).
        epochs, learning_rate, alpha, batch_size, seed: the pre-stage's training.
        cache_dir: where the teacher's logits are cached; default ``<dataset_dir>/teacher_cache``.

    The server's own settings file (:mod:`fedfms.fl.site_settings`: ``local/fedfms_site.json`` in
    its kit, or ``$FEDFMS_SITE_SETTINGS``) replaces ``dataset_dir``, ``datalist_dir`` and
    ``cache_dir`` and sets its threads and device, as a client's does for its data.
        overrides: further overrides of the student bundle's config.
        file_name: the record written to the server app folder (``prestage.json``).
    """

    def __init__(
        self,
        mode: str = "fm",
        bundle_root: str = "bundles/smlite_prostate",
        config_files: list[str] | None = None,
        dataset_dir: str = "demo/data_256",
        datalist_dir: str = "partitions/age",
        teacher: dict | None = None,
        epochs: int = 5,
        learning_rate: float = 1e-4,
        alpha: float = 0.6,
        batch_size: int = 8,
        seed: int = 0,
        cache_dir: str | None = None,
        overrides: dict | None = None,
        file_name: str = "prestage",
        persistor_id: str = "persistor",
    ) -> None:
        super().__init__(persistor_id=persistor_id)
        self.settings = PrestageSettings(mode, alpha, epochs, learning_rate, batch_size, seed)
        self.teacher = TeacherSpec(**(teacher or {})) if mode == "fm" else None
        self.bundle_root = bundle_root
        self.config_files = list(config_files or ["train.json"])
        self.dataset_dir = dataset_dir
        self.datalist_dir = datalist_dir
        self.cache_dir = cache_dir
        self.overrides = dict(overrides or {})
        self.file_name = file_name

    def run(self) -> None:
        if self.settings.mode == "random":
            self.info("initial global model: random (the bundle's network as built), no pre-stage")
            self.persistor.save_initial_model(self.fl_ctx)
            self._write({"mode": "random"})
            return
        if self.persistor.resuming:
            self.info(f"resuming from a saved global model: the {self.settings.mode} pre-stage of the earlier run is not repeated")
            return
        try:
            student, record = self._prestage()
        except (DataError, ValueError) as err:
            self.panic(f"FM-instructed initialisation ({self.settings.mode}) stopped the job before round 0: {err}")
            return
        self.persistor.adopt_initial_model(student, self.fl_ctx)
        self._write(asdict(record))

    def _apply_server_settings(self) -> torch.device:
        """The server's own settings over the job's; the device the pre-stage runs on."""
        workspace = self.fl_ctx.get_workspace()
        settings = read_site_settings(self.fl_ctx.get_identity_name(), workspace.get_site_config_dir() if workspace else None)
        self.info(f"server settings of the pre-stage: {settings.describe()}")
        if settings.output_dir:
            self.warning("output_dir is a client setting; the server writes its records to its app folder")
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        self.dataset_dir = settings.dataset_dir or self.dataset_dir
        self.datalist_dir = settings.datalist_dir or self.datalist_dir
        self.cache_dir = settings.cache_dir or self.cache_dir
        return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _prestage(self):
        device = self._apply_server_settings()
        data = resolve_path(self.dataset_dir)
        parser = bundle_parser(self.bundle_root, self.config_files, dataset_dir=str(data), datalist_dir=self.datalist_dir, **self.overrides)
        if parser.get_parsed_content("activation") != "sigmoid" or parser.get_parsed_content("num_classes") != 1:
            raise ValueError(f"the pre-stage trains a binary student with one sigmoid output; {self.bundle_root} is not one")
        return run_prestage(
            self.persistor.model,
            data / self.datalist_dir / f"{PROXY}.json",
            parser.get_parsed_content("sample_transforms"),
            parser.get_parsed_content("label_size"),
            self.settings,
            self.teacher,
            self.cache_dir or data / "teacher_cache",
            device,
            log=self.info,
        )

    def _write(self, record: dict) -> None:
        save_json(Path(self.fl_ctx.get_prop(FLContextKey.APP_ROOT)) / f"{self.file_name}.json", record)
