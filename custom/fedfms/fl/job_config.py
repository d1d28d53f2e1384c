"""``fedfms job``: a configured copy of a shipped job folder (profile, data, partition, rounds, init mode, resume).

The job folders in ``jobs/`` run the CPU demo profile on ``demo/data``. Switching to the paper
profile touches every place the bundle is named (the client's learner, the server's persistor
and, for leave-one-site-out, the unseen-site evaluator), so it is one command instead of hand
edits::

    fedfms job jobs/fedmsa_prostate --out my_jobs/fedmsa_paper --profile paper \\
        --pretrained-checkpoint /models/sam_vit_b_01ec64.pth --dataset-dir /data/prostate_1024

``--datalist-dir`` points every bundle user (learner, pre-stage, unseen-site evaluator) at another
partition of the same data; ``--init-mode`` chooses how a job with the FM-instructed-init workflow
(``jobs/fminit_prostate``) starts: ``random``, ``pretrain`` or ``fm``.

The copy is written next to ``--out`` and renamed into place, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedfms.bundle import read_method
from fedfms.distillation.prestage import INIT_MODES
from fedfms.errors import DataError
from fedfms.paths import resolve_path

PROFILES = ("cpu_demo", "paper")
DEMO_CONFIG = "cpu_demo.json"
PAPER_ROUNDS = 100  # FedFMS and FLAP-SAM: 100 rounds x 1 local epoch
CONFIG_FILES = ("config_fed_client.json", "config_fed_server.json")
FMINIT_WORKFLOW = "FMInstructedInit"
FMINIT_PAPER_LOCAL_EPOCHS = 5


@dataclass
class JobOptions:
    profile: str | None = None  # None keeps the job's profile
    pretrained_checkpoint: str | None = None  # required by the paper profile of a SAM job
    dataset_dir: str | None = None
    num_rounds: int | None = None  # paper profile default: 100
    local_epochs: int | None = None  # paper profile default: 1
    resume_from: str | None = None
    datalist_dir: str | None = None  # the partition inside dataset_dir, e.g. partitions/quantity
    init_mode: str | None = None  # random, pretrain or fm: jobs with an FM-instructed-init workflow

    def __post_init__(self) -> None:
        if self.profile not in (None, *PROFILES):
            raise ValueError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        if self.init_mode not in (None, *INIT_MODES):
            raise ValueError(f"unknown init mode {self.init_mode!r}; choose from {', '.join(INIT_MODES)}")
        if self.pretrained_checkpoint and not Path(self.pretrained_checkpoint).is_file():
            raise DataError(self.pretrained_checkpoint, "pretrained checkpoint not found")
        if self.resume_from and not Path(self.resume_from).is_file():
            raise DataError(self.resume_from, "global model to resume from not found")
        for name in ("num_rounds", "local_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


def bundle_args(config: dict) -> list[dict]:
    """Every ``args`` dict in a job config that names a bundle (learner, persistor model, unseen evaluator)."""
    found = []

    def visit(node) -> None:
        if isinstance(node, dict):
            if "bundle_root" in node and "config_files" in node:
                found.append(node)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return found


def _set_profile(args: dict, options: JobOptions) -> None:
    if options.profile:
        files = [f for f in args["config_files"] if f != DEMO_CONFIG]
        args["config_files"] = files + [DEMO_CONFIG] if options.profile == "cpu_demo" else files
    if options.pretrained_checkpoint:
        checkpoint = str(Path(options.pretrained_checkpoint).resolve())
        if "dataset_dir" in args:  # learner and unseen-site evaluator: an ``overrides`` dict
            args["overrides"] = {**args.get("overrides", {}), "pretrained_checkpoint": checkpoint}
        else:  # the persistor's ``bundle_network(**overrides)``
            args["pretrained_checkpoint"] = checkpoint


def _check_checkpoint(args: dict, options: JobOptions) -> None:
    """The paper profile of a foundation-model bundle needs its pretrained weights; say so now, not at round 0."""
    if options.profile == "paper" and not options.pretrained_checkpoint:
        method = read_method(resolve_path(args["bundle_root"]))
        if "pretrained_checkpoint" not in method:
            raise ValueError(f"the paper profile of {args['bundle_root']} needs --pretrained-checkpoint (e.g. sam_vit_b_01ec64.pth)")


def _workflow(server: dict, path_suffix: str) -> dict | None:
    """The ``args`` of the server workflow whose class path ends with ``path_suffix``, if the job has one."""
    return next((w["args"] for w in server["workflows"] if w["path"].endswith(path_suffix)), None)


def configure(client: dict, server: dict, options: JobOptions) -> None:
    """Apply ``options`` to a job's client and server configs in place."""
    learner = bundle_args(client)[0]
    for args in bundle_args(client) + bundle_args(server):
        _check_checkpoint(args, options)
        _set_profile(args, options)
        if options.dataset_dir and "dataset_dir" in args:
            args["dataset_dir"] = str(Path(options.dataset_dir).resolve())
        if options.datalist_dir and "datalist_dir" in args:
            args["datalist_dir"] = options.datalist_dir
    if options.init_mode:
        prestage = _workflow(server, FMINIT_WORKFLOW)
        if prestage is None:
            raise ValueError(f"--init-mode needs a job with the {FMINIT_WORKFLOW} workflow, such as jobs/fminit_prostate")
        prestage["mode"] = options.init_mode
    fedavg = _workflow(server, "FedAvg")
    paper = options.profile == "paper"
    if options.num_rounds or paper:
        fedavg["num_rounds"] = options.num_rounds or PAPER_ROUNDS
    if options.local_epochs or paper:
        # FedFMS and FLAP-SAM: 1 local epoch per round; FM-instructed initialisation: 5.
        learner["local_epochs"] = options.local_epochs or (FMINIT_PAPER_LOCAL_EPOCHS if _workflow(server, FMINIT_WORKFLOW) else 1)
    if options.resume_from:
        persistor = next(c for c in server["components"] if c["id"] == fedavg.get("persistor_id", "persistor"))
        persistor["args"]["resume_from"] = str(Path(options.resume_from).resolve())


def configure_job(job_dir: str | os.PathLike, out_dir: str | os.PathLike, options: JobOptions) -> Path:
    """Copy ``job_dir`` to ``out_dir`` with ``options`` applied; ``out_dir`` must not exist yet."""
    source, out = resolve_path(job_dir), Path(out_dir)
    config_dir = Path("app", "config")
    if not all((source / config_dir / name).is_file() for name in CONFIG_FILES):
        raise DataError(source, f"not an NVFlare job folder: {config_dir / CONFIG_FILES[0]} and {CONFIG_FILES[1]} expected")
    if out.exists():
        raise DataError(out, "already exists; choose a new --out folder")
    client, server = (json.loads((source / config_dir / name).read_text()) for name in CONFIG_FILES)
    configure(client, server, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        for name, config in zip(CONFIG_FILES, (client, server)):
            (staging / config_dir / name).write_text(json.dumps(config, indent=4) + "\n")
        meta = json.loads((staging / "meta.json").read_text())
        (staging / "meta.json").write_text(json.dumps({**meta, "name": out.name}, indent=4) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
