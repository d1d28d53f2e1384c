"""``fedfms job``: a configured copy of a shipped job folder (profile, data, partition, rounds, init mode, resume).

The job folders in ``jobs/`` run the CPU demo profile on ``demo/data``. Switching to the paper
profile touches every place the bundle is named (the client's learner and the server's
persistor), so it is one command instead of hand edits::

    fedfms job jobs/fedmsa_prostate --out my_jobs/fedmsa_paper --profile paper \\
        --pretrained-checkpoint /models/sam_vit_b_01ec64.pth --dataset-dir /data/prostate_1024

The network of a SAM job is chosen the same way: ``--strategy`` (any fine-tuning strategy of
:mod:`fedfms.models.strategies`, e.g. FLAP-SAM's baselines ``pdec``, ``dec``, ``attn``, ``lora``,
``lora_dec``), ``--size``, ``--image-size``, and ``--no-pretrained`` (the papers' "-PT" ablation:
the same network from random weights). They become bundle overrides of every place the network is
built (learner, persistor), so the sites and the server build the same one; the copy's
``meta.json`` records every option given.

``--datalist-dir`` points every bundle user (learner, pre-stage) at another partition of the same
data; ``--init-mode`` chooses how a job with the FM-instructed-init workflow
(``jobs/fminit_prostate``) starts: ``random``, ``pretrain`` or ``fm``, and ``--prestage-epochs``
how long that pre-stage trains the student on the server's proxy set. A leave-one-site-out job
(``evaluate_only_sites`` in its server workflows) takes its evaluate-only site from the partition's
``unseen.json`` under ``--dataset-dir``, or from ``--evaluate-only SITE`` when the data is elsewhere;
``--evaluate-only`` makes any other job leave that site out of training too.

How the server copes with silent and hostile sites is set here too: ``--wait-after-min-received``
(seconds the other sites get once ``min_clients`` answered: what a hung site costs per round),
the update bounds ``--max-abs-value``, ``--max-change-norm`` and ``--max-change-ratio``
(:mod:`fedfms.fl.checks.updates`), ``--clip-norm`` (each change scaled down to that norm) and
``--aggregation median|trimmed_mean`` (:mod:`fedfms.fl.aggregators.robust`; on the LoRA products in a
LoRA-SVD job).

``--compress MODE`` (:data:`fedfms.fl.filters.compression.MODES`: fp16, bf16, blockwise8, nf4, fp4)
sends the ``train`` exchange compressed both ways: the server's global model, and each site's
update as the round's change (``WEIGHT_DIFF``; the sites' own dequantisation error of the global
model then does not reach the server), or as weights with ``--compress-full-weights``. The server
decompresses before its update checks and aggregation; a payload it cannot read is refused.

``--algorithm`` chooses how the server and the sites federate (:data:`ALGORITHMS`): ``fedavg``
(the jobs' own), ``fedprox`` (``--fedprox-mu``: the sites' proximal term), ``fedopt`` (a server
optimiser on the mean change: ``--server-optimizer sgd|adam|yogi``, ``--server-lr``,
``--server-momentum``; SGD with momentum is FedAvgM), ``scaffold`` (control variates) or ``ditto``
(``--ditto-lambda``: each site also trains a personal model, scored in the final evaluation).
FedOpt and SCAFFOLD need FedAvg's weighted mean of the exchanged tensors, so they are refused
with LoRA-SVD aggregation (FLAP-SAM and the LoRA baselines: the SVD re-factorisation picks a new
basis each round) and SCAFFOLD with robust aggregation or privacy filters (its control changes
travel beside the weights, untouched by NVFlare's filters). ``--patience N`` ends the rounds once
the mean validation Dice of the global model has not improved for N rounds.

A resumed run (``--resume-from``) must be of the same job: the same network (every key and
shape of the saved global model) and the same server workflows; anything else is refused here,
before any work.

The copy is written next to ``--out`` and renamed into place, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

from fedfms.bundle import bundle_dir, read_method
from fedfms.models.factory import SAM_MODELS
from fedfms.models.sam import SAM_SIZES
from fedfms.models.strategies import get_strategy
from fedfms.data.partition import unseen_site
from fedfms.distillation.prestage import INIT_MODES
from fedfms.errors import DataError
from fedfms.fl.exchange import NORM_STATISTICS
from fedfms.fl.persistors.trainable import read_resume_model, resume_folder
from fedfms.fl.aggregators.robust import check_combine
from fedfms.fl.filters.compression import MODES as COMPRESSION_MODES
from fedfms.fl.workflows.fedopt import SERVER_OPTIMIZERS, server_optimizer_args
from fedfms.paths import find_job

PROFILES = ("cpu_demo", "paper")
DEMO_CONFIG = "cpu_demo.json"
PAPER_ROUNDS = 100  # FedFMS and FLAP-SAM: 100 rounds x 1 local epoch
CONFIG_FILES = ("config_fed_client.json", "config_fed_server.json")
FMINIT_WORKFLOW = "FMInstructedInit"
FMINIT_PAPER_LOCAL_EPOCHS = 5
PAPER_TASK_TIMEOUT = 6 * 3600  # seconds a round's task may take at paper size (the demo's: 600)
PAPER_WAIT_AFTER_MIN = 3600  # at paper size sites' epochs differ by far more than the demo's 60 s
ROBUST_AGGREGATOR = "fedfms.fl.aggregators.robust.RobustAggregator"
LORA_SVD = "LoRASVDAggregator"
LORA_RANK_KEY = "network_def#lora_rank"  # the bundle's network builder takes the LoRA rank as this key
RESUMING_COMPONENTS = ("persistor", "contributions", "model_selector")  # what a resumed run carries over
WIRE_BYTES = "fedfms.fl.filters.wire.WireBytes"  # measures the serialised payload; last in the result chain
EXCLUDE_VARS = "nvflare.app_common.filters.exclude_vars.ExcludeVars"
PERCENTILE_PRIVACY = "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy"
COMPRESS = "fedfms.fl.filters.compression.CompressWeights"
DECOMPRESS = "fedfms.fl.filters.compression.DecompressWeights"
ALGORITHMS = ("fedavg", "fedprox", "fedopt", "scaffold", "ditto")
WORKFLOWS = {"fedopt": "fedfms.fl.workflows.fedopt.ResumableFedOpt", "scaffold": "fedfms.fl.workflows.scaffold.ResumableScaffold"}
DEFAULT_FEDPROX_MU, DEFAULT_DITTO_LAMBDA = 0.01, 0.1  # NVFlare's examples' values


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
    prestage_epochs: int | None = None  # epochs of that workflow's pre-stage on the proxy set
    task_timeout: int | None = None  # seconds per round's task (and the final evaluation); paper profile: 6 h
    min_clients: int | None = None  # acceptable updates a round needs (also meta.json's min_clients)
    norm_statistics: str | None = None  # global (exchanged) or local (FedBN)
    exclude_vars: str | None = None  # regex: these never leave a site (NVFlare's ExcludeVars)
    percentile_privacy: float | None = None  # share only weight changes above this percentile (NVFlare's PercentilePrivacy)
    privacy_gamma: float = 0.01  # PercentilePrivacy's clip of each shared change
    evaluate_only: list[str] | None = None  # leave-one-site-out: sites that only score the final model
    strategy: str | None = None  # SAM jobs: the fine-tuning strategy (what trains and travels)
    size: str | None = None  # SAM jobs: the model size (lite, tiny, vit_b, vit_l, ...)
    image_size: int | None = None  # SAM jobs: the network's input size
    pretrained: bool = True  # False: the same network from random weights ("-PT")
    seed: int | None = None  # every random choice of the run: initial weights, data order, augmentation
    overrides: dict | None = None  # any other bundle keys, e.g. {"learning_rate": 1e-4, "train#samples_per_epoch": 32}
    wait_after_min_received: int | None = None  # seconds the other sites get once min_clients answered; paper profile: 1 h
    max_abs_value: float | None = None  # update check: largest magnitude of any value (validator default 1e4)
    max_change_norm: float | None = None  # update check: largest L2 norm of an update's change (validator default: none)
    max_change_ratio: float | None = None  # update check: largest ratio to the median change of the other sites (default 10)
    clip_norm: float | None = None  # scale each accepted change down to this L2 norm
    aggregation: str | None = None  # mean (FedAvg), median or trimmed_mean
    trim_fraction: float | None = None  # trimmed_mean: share dropped at each end per coordinate (default 0.2)
    lora_rank: int | None = None  # LoRA strategies (flap, lora, lora_dec): rank r of every LoRA layer (FLAP-SAM Table 2: 4-64)
    svd_rank: int | None = None  # LoRA-SVD aggregation: rank of the re-factorised averaged products (default: the LoRA rank)
    compress: str | None = None  # the train exchange, both ways: fp16, bf16, blockwise8, nf4 or fp4 (None: as it is, fp32)
    compress_full_weights: bool = False  # compressed updates carry the weights, not the round's change
    algorithm: str | None = None  # fedavg (the job's), fedprox, fedopt, scaffold or ditto
    fedprox_mu: float | None = None  # fedprox: weight of the proximal term (default 0.01)
    server_optimizer: str | None = None  # fedopt: sgd (FedAvgM with momentum), adam (FedAdam) or yogi (FedYogi); default sgd
    server_lr: float | None = None  # fedopt: the server learning rate (default 1)
    server_momentum: float | None = None  # fedopt: SGD's momentum, Adam's and Yogi's beta1 (default 0.9)
    ditto_lambda: float | None = None  # ditto: weight of the personal model's distance to the global one (default 0.1)
    patience: int | None = None  # end the rounds after this many without a better mean validation Dice

    def __post_init__(self) -> None:
        if self.profile not in (None, *PROFILES):
            raise ValueError(f"unknown profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        if self.init_mode not in (None, *INIT_MODES):
            raise ValueError(f"unknown init mode {self.init_mode!r}; choose from {', '.join(INIT_MODES)}")
        if self.pretrained_checkpoint and not Path(self.pretrained_checkpoint).is_file():
            raise DataError(self.pretrained_checkpoint, "pretrained checkpoint not found")
        if self.pretrained_checkpoint and not self.pretrained:
            raise ValueError("--pretrained-checkpoint and --no-pretrained contradict each other; give one")
        if self.strategy is not None:
            get_strategy(self.strategy)  # an unknown name fails here, listing the strategies
        if self.size not in (None, *SAM_SIZES):
            raise ValueError(f"unknown size {self.size!r}; choose from {', '.join(SAM_SIZES)}")
        if self.image_size is not None and (self.image_size < 16 or self.image_size % 16):
            raise ValueError(f"image_size must be a multiple of 16 (and at least 16), got {self.image_size}")
        if self.resume_from:
            read_resume_model(self.resume_from)
        if self.dataset_dir and not Path(self.dataset_dir).is_dir():
            raise DataError(self.dataset_dir, "no prepared data folder here (--dataset-dir); run `fedfms prepare` first")
        if self.norm_statistics not in (None, *NORM_STATISTICS):
            raise ValueError(f"unknown norm statistics {self.norm_statistics!r}; choose from {', '.join(NORM_STATISTICS)}")
        for name in ("num_rounds", "local_epochs", "min_clients", "prestage_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.task_timeout is not None and self.task_timeout < 0:
            raise ValueError(f"task_timeout must be >= 0, got {self.task_timeout}")
        if self.percentile_privacy is not None and not 0 <= self.percentile_privacy <= 100:
            raise ValueError(f"percentile_privacy must be in [0, 100], got {self.percentile_privacy}")
        if self.exclude_vars:
            re.compile(self.exclude_vars)  # a bad expression fails here, not at the first round
        if self.wait_after_min_received is not None and self.wait_after_min_received < 0:
            raise ValueError(f"wait_after_min_received must be >= 0, got {self.wait_after_min_received}")
        for name in ("max_abs_value", "max_change_norm", "clip_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.max_change_ratio is not None and not self.max_change_ratio >= 1:
            raise ValueError(f"max_change_ratio must be at least 1, got {self.max_change_ratio}")
        for name in ("lora_rank", "svd_rank"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lora_rank is not None and self.svd_rank is not None and self.svd_rank > self.lora_rank:
            raise ValueError(f"svd_rank {self.svd_rank} exceeds lora_rank {self.lora_rank}: the re-factorised layer has only r = lora_rank columns")
        if self.compress not in (None, *COMPRESSION_MODES):
            raise ValueError(f"unknown --compress mode {self.compress!r}; choose from {', '.join(COMPRESSION_MODES)}")
        if self.compress_full_weights and not self.compress:
            raise ValueError("--compress-full-weights applies to a compressed exchange; add --compress MODE")
        if self.compress_full_weights and self.percentile_privacy is not None:
            raise ValueError("percentile privacy shares only weight changes; --compress-full-weights would send the weights themselves")
        self._check_algorithm()
        if self.aggregation is not None or self.trim_fraction is not None:
            check_combine(self.aggregation or "trimmed_mean", 0.2 if self.trim_fraction is None else self.trim_fraction)


    def _check_algorithm(self) -> None:
        """The algorithm's own options, named when they do not apply or are out of range."""
        if self.algorithm not in (None, *ALGORITHMS):
            raise ValueError(f"unknown --algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        owners = {"fedprox_mu": "fedprox", "server_optimizer": "fedopt", "server_lr": "fedopt", "server_momentum": "fedopt", "ditto_lambda": "ditto"}
        for name, owner in owners.items():
            if getattr(self, name) is not None and self.algorithm != owner:
                raise ValueError(f"--{name.replace('_', '-')} applies to --algorithm {owner}; this job's algorithm is {self.algorithm or 'fedavg'}")
        for name in ("fedprox_mu", "ditto_lambda"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value < float("inf")):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if self.server_optimizer is not None and self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown --server-optimizer {self.server_optimizer!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ValueError(f"--server-lr must be positive, got {self.server_lr}")
        if self.server_momentum is not None and not 0 <= self.server_momentum < 1:
            raise ValueError(f"--server-momentum must be in [0, 1), got {self.server_momentum}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"--patience must be >= 1 round, got {self.patience}")
        if self.algorithm == "scaffold":
            if self.exclude_vars or self.percentile_privacy is not None:
                raise ValueError("--algorithm scaffold sends control changes beside the weights, where NVFlare's privacy filters "
                                 "(--exclude-vars, --percentile-privacy) do not reach; they would leak what the filter hides")
            if self.aggregation not in (None, "mean") or self.trim_fraction is not None:
                raise ValueError(f"--algorithm scaffold moves its control variates by the weighted mean of the sites'; "
                                 f"--aggregation {self.aggregation or 'trimmed_mean'} would average the weights another way")


def bundle_args(config: dict) -> list[dict]:
    """Every ``args`` dict in a job config that names a bundle (learner, persistor model, pre-stage)."""
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
    network = _network_overrides(options)
    if network and read_method(bundle_dir(args["bundle_root"]))["model"] not in SAM_MODELS:
        flags = ", ".join("--" + {LORA_RANK_KEY: "lora_rank"}.get(k, k).replace("_", "-") for k in network)
        raise ValueError(f"{flags} apply to SAM jobs; {args['bundle_root']} is not a SAM bundle")
    for key, value in network.items():
        _override(args, key, value)
    for key, value in (options.overrides or {}).items():
        _override(args, key, value)
    if options.seed is not None:
        _override(args, "seed", options.seed)
        if "dataset_dir" in args:  # the learner's round seeds and the pre-stage's training
            args["seed"] = options.seed


def _network_overrides(options: JobOptions) -> dict:
    """The bundle keys that choose a SAM job's network."""
    overrides = {"strategy": options.strategy, "size": options.size, "image_size": options.image_size, LORA_RANK_KEY: options.lora_rank}
    if options.pretrained_checkpoint:
        overrides["pretrained_checkpoint"] = str(Path(options.pretrained_checkpoint).resolve())
    if not options.pretrained:
        overrides["pretrained_checkpoint"] = "scratch"
    return {k: v for k, v in overrides.items() if v is not None}


def _override(args: dict, key: str, value) -> None:
    """Set a bundle key where this component takes it."""
    if "dataset_dir" in args:  # learner and pre-stage: an ``overrides`` dict
        args["overrides"] = {**args.get("overrides", {}), key: value}
    else:  # the persistor's ``bundle_network(**overrides)``
        args[key] = value


def _check_checkpoint(args: dict, options: JobOptions) -> None:
    """The paper profile of a foundation-model bundle needs its pretrained weights; say so now, not at round 0."""
    if options.profile == "paper" and not options.pretrained_checkpoint and options.pretrained:
        method = read_method(bundle_dir(args["bundle_root"]))
        if "pretrained_checkpoint" not in method:
            raise ValueError(f"the paper profile of {args['bundle_root']} needs --pretrained-checkpoint (e.g. sam_vit_b_01ec64.pth), or --no-pretrained for the '-PT' ablation")


def _workflow(server: dict, path_suffix: str) -> dict | None:
    """The ``args`` of the server workflow whose class path ends with ``path_suffix``, if the job has one."""
    return next((w["args"] for w in server["workflows"] if w["path"].endswith(path_suffix)), None)


def check_partition(dataset_dir: str | os.PathLike, datalist_dir: str) -> None:
    """Fail now, not at round 0, when ``dataset_dir`` holds no site datalists under ``datalist_dir``."""
    folder = Path(dataset_dir) / datalist_dir
    if not sorted(folder.glob("*.json")):
        raise DataError(
            folder,
            f"holds no partition (no <site>.json datalists) for --dataset-dir {dataset_dir}; "
            "run `fedfms partition` or choose another --datalist-dir",
        )


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
        if options.dataset_dir and "datalist_dir" in args:
            check_partition(args["dataset_dir"], args["datalist_dir"])
    _set_prestage(server, options)
    fedavg = _workflow(server, "FedAvg")
    _set_lora(learner, fedavg, options)
    paper = options.profile == "paper"
    if options.num_rounds or paper:
        fedavg["num_rounds"] = options.num_rounds or PAPER_ROUNDS
    if options.local_epochs or paper:
        # FedFMS and FLAP-SAM: 1 local epoch per round; FM-instructed initialisation: 5.
        learner["local_epochs"] = options.local_epochs or (FMINIT_PAPER_LOCAL_EPOCHS if _workflow(server, FMINIT_WORKFLOW) else 1)
    if options.task_timeout is not None or paper:
        timeout = options.task_timeout if options.task_timeout is not None else PAPER_TASK_TIMEOUT
        for workflow in server["workflows"]:
            if "task_timeout" in workflow["args"]:
                workflow["args"]["task_timeout"] = timeout
    if options.min_clients:
        fedavg["min_clients"] = options.min_clients
    if options.wait_after_min_received is not None or paper:
        wait = options.wait_after_min_received if options.wait_after_min_received is not None else PAPER_WAIT_AFTER_MIN
        for workflow in server["workflows"]:
            if "wait_time_after_min_received" in workflow["args"]:
                workflow["args"]["wait_time_after_min_received"] = wait
    _set_robustness(server, fedavg, options)
    _set_evaluate_only(server, learner, options)
    if options.norm_statistics:
        learner["norm_statistics"] = options.norm_statistics
        _component(server, fedavg.get("persistor_id", "persistor"))["args"]["norm_statistics"] = options.norm_statistics
    _set_privacy(client, server, learner, options)
    _set_compression(client, server, learner, options)
    _set_algorithm(server, learner, options)
    if options.resume_from:
        check_resume(server, options.resume_from)
        for component_id in RESUMING_COMPONENTS:
            _component(server, component_id)["args"]["resume_from"] = str(Path(options.resume_from).resolve())


def check_resume(server: dict, resume_from: str) -> None:
    """Refuse to resume a run of another job: other server workflows, or a network with other keys or shapes."""
    earlier = resume_folder(resume_from) / "config" / CONFIG_FILES[1]
    if earlier.is_file():
        ran = [w["path"] for w in json.loads(earlier.read_text())["workflows"]]
        planned = [w["path"] for w in server["workflows"]]
        if ran != planned:
            raise DataError(resume_from, f"is a run of another job: its server workflows were {ran}, this job's are {planned}; resume a run of the same job")
    model = _component(server, "persistor")["args"].get("model", {})
    if model.get("path") != "fedfms.bundle.bundle_network":
        return
    from fedfms.bundle import bundle_network

    expected = {k: tuple(v.shape) for k, v in bundle_network(**model["args"]).state_dict().items()}
    saved = {k: tuple(getattr(v, "shape", ())) for k, v in read_resume_model(resume_from)["model"].items()}
    missing, extra = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    shapes = [f"{k} {saved[k]} (this job's: {expected[k]})" for k in sorted(expected.keys() & saved.keys()) if saved[k] != expected[k]]
    if missing or extra or shapes:
        problems = [f"{len(missing)} of this job's keys missing, e.g. {missing[0]}"] if missing else []
        problems += [f"{len(extra)} keys this job's network does not have, e.g. {extra[0]}"] if extra else []
        problems += [f"{len(shapes)} shapes differ, e.g. {shapes[0]}"] if shapes else []
        raise DataError(resume_from, f"holds a global model of another network ({'; '.join(problems)}); resume a run of the same job and model options")


def _set_algorithm(server: dict, learner: dict, options: JobOptions) -> None:
    """The federated algorithm: the server workflow's class and arguments, and what the sites add."""
    workflow = next(w for w in server["workflows"] if w["path"].endswith("ResumableFedAvg"))
    if options.patience is not None:
        workflow["args"]["patience"] = options.patience
    algorithm = options.algorithm or "fedavg"
    lora_svd = (workflow["args"].get("aggregator") or {}).get("path", "").endswith(LORA_SVD)
    if algorithm in ("fedopt", "scaffold") and lora_svd:
        raise ValueError(f"--algorithm {algorithm} cannot serve this job's LoRA strategy: its LoRA-SVD aggregation re-factorises the averaged "
                         f"products, so the LoRA factors change basis every round; use fedavg, fedprox or ditto, or a strategy without LoRA")
    if algorithm == "fedprox":
        workflow["args"]["fedprox_mu"] = DEFAULT_FEDPROX_MU if options.fedprox_mu is None else options.fedprox_mu
    elif algorithm == "ditto":
        learner["ditto_lambda"] = DEFAULT_DITTO_LAMBDA if options.ditto_lambda is None else options.ditto_lambda
    elif algorithm in WORKFLOWS:
        workflow["path"] = WORKFLOWS[algorithm]
    if algorithm == "fedopt":
        momentum = 0.9 if options.server_momentum is None else options.server_momentum
        lr = 1.0 if options.server_lr is None else options.server_lr
        workflow["args"].update(server_optimizer_args(options.server_optimizer or "sgd", lr, momentum))
        learner["send_weight_diff"] = True  # the server optimiser steps on the mean change


def _set_lora(learner: dict, fedavg: dict, options: JobOptions) -> None:
    """The strategy's aggregation, and FLAP-SAM's two ranks: LoRA's r at the sites, the SVD's on the server."""
    strategy = options.strategy or _bundle_strategy(learner)
    uses_lora = get_strategy(strategy).needs == "lora"
    if not uses_lora:
        fedavg.pop("aggregator", None)  # LoRA-SVD aggregation has no LoRA to re-factorise: FedAvg's own weighted mean
    if options.lora_rank is not None and not uses_lora:
        raise ValueError(f"--lora-rank applies to the LoRA strategies (flap, lora, lora_dec); this job's strategy is {strategy}")
    if options.svd_rank is None:
        return
    aggregator = fedavg.get("aggregator")
    if not (aggregator and aggregator["path"].endswith(LORA_SVD)):
        raise ValueError("--svd-rank applies to a job with LoRA-SVD aggregation (flapsam_prostate with a LoRA strategy); this job has none")
    aggregator["args"]["rank"] = options.svd_rank


def _bundle_strategy(learner: dict) -> str:
    """The strategy the learner's bundle trains with: its override, else the bundle's own."""
    return learner.get("overrides", {}).get("strategy") or read_method(bundle_dir(learner["bundle_root"])).get("strategy", "full")


def _set_robustness(server: dict, fedavg: dict, options: JobOptions) -> None:
    """Update bounds, clipping and robust aggregation: what hostile or broken sites can do to the global model."""
    validator = _component(server, "update_validator")["args"]
    for name in ("max_abs_value", "max_change_norm", "max_change_ratio"):
        if getattr(options, name) is not None:
            validator[name] = getattr(options, name)
    if options.clip_norm is not None:
        fedavg["clip_change_norm"] = options.clip_norm
    if options.aggregation is None and options.trim_fraction is None:
        return
    combine = options.aggregation or "trimmed_mean"
    robust = {"combine": combine} | ({"trim_fraction": options.trim_fraction} if options.trim_fraction is not None else {})
    aggregator = fedavg.get("aggregator")
    if aggregator and aggregator["path"].endswith(LORA_SVD):
        aggregator["args"].update(robust)  # the rule applies to the LoRA products
    elif combine != "mean":
        fedavg["aggregator"] = {"path": ROBUST_AGGREGATOR, "args": robust}


def _set_prestage(server: dict, options: JobOptions) -> None:
    """How a job with the FM-instructed-init workflow makes its initial model."""
    if options.init_mode is None and options.prestage_epochs is None:
        return
    prestage = _workflow(server, FMINIT_WORKFLOW)
    if prestage is None:
        flag = "--init-mode" if options.init_mode else "--prestage-epochs"
        raise ValueError(f"{flag} needs a job with the {FMINIT_WORKFLOW} workflow, such as jobs/fminit_prostate")
    if options.init_mode:
        prestage["mode"] = options.init_mode
    if options.prestage_epochs:
        prestage["epochs"] = options.prestage_epochs


def _set_evaluate_only(server: dict, learner: dict, options: JobOptions) -> None:
    """Leave-one-site-out: the sites the server never sends training to (FedAvg and the final evaluation).

    A leave-one-site-out job (``evaluate_only_sites`` in its workflows) takes them from the
    partition when not given; any other job becomes one when they are given.
    """
    sites = options.evaluate_only
    if sites:
        workflows = [w["args"] for w in server["workflows"] if w["path"].endswith(("ResumableFedAvg", "FinalEvaluation"))]
    else:
        workflows = [w["args"] for w in server["workflows"] if "evaluate_only_sites" in w["args"]]
    if not workflows:
        return
    if not sites and options.dataset_dir:
        folder = Path(learner["dataset_dir"]) / learner["datalist_dir"]
        unseen = unseen_site(folder)
        if unseen is None:
            raise DataError(folder, "not a leave-one-site-out partition (no unseen.json); run `fedfms partition --method loso --unseen SITE`")
        sites = [unseen]
    if sites:
        for args in workflows:
            args["evaluate_only_sites"] = sorted(sites)


def _set_privacy(client: dict, server: dict, learner: dict, options: JobOptions) -> None:
    """NVFlare's privacy filters on what leaves each site after training, and what the server then expects."""
    filters = []
    if options.exclude_vars:
        filters.append({"path": EXCLUDE_VARS, "args": {"exclude_vars": options.exclude_vars}})
        _component(server, "update_validator")["args"]["excluded_vars"] = options.exclude_vars
    if options.percentile_privacy is not None:  # (a LoRA-SVD job's server rebuilds weights from the changes)
        percentile = {"percentile": options.percentile_privacy, "gamma": options.privacy_gamma, "data_kinds": ["WEIGHT_DIFF"]}
        filters.append({"path": PERCENTILE_PRIVACY, "args": percentile})
        learner["send_weight_diff"] = True
    if filters:
        add_result_filters(client, filters)


def _set_compression(client: dict, server: dict, learner: dict, options: JobOptions) -> None:
    """Compress the train exchange both ways; decompress on arrival, after the site's wire-size filter and before the server's checks."""
    if not options.compress:
        return
    compress = {"path": COMPRESS, "args": {"mode": options.compress}}
    add_result_filters(client, [compress])  # after any privacy filter, before the wire-size filter
    train_filters(client, "task_data_filters").append({"path": DECOMPRESS, "args": {}})
    train_filters(server, "task_data_filters").append(compress)
    train_filters(server, "task_result_filters").append({"path": DECOMPRESS, "args": {"reject_bad_payload": True}})
    if not options.compress_full_weights:
        learner["send_weight_diff"] = True


def train_filters(config: dict, chain_kind: str) -> list[dict]:
    """The filter list of the ``train`` task in ``config``'s ``task_data_filters`` or ``task_result_filters`` (made if missing).

    NVFlare allows one filter chain per task and direction, so every filter of ``train`` joins one list.
    """
    chains = config.setdefault(chain_kind, [])
    chain = next((c for c in chains if "train" in c["tasks"]), None)
    if chain is None:
        chain = {"tasks": ["train"], "filters": []}
        chains.append(chain)
    return chain["filters"]


def add_result_filters(client: dict, filters: list[dict]) -> None:
    """Add ``filters`` to the train task's result chain, before the wire-size filter (it measures what leaves)."""
    chain = train_filters(client, "task_result_filters")
    wire = [i for i, f in enumerate(chain) if f["path"] == WIRE_BYTES]
    at = wire[0] if wire else len(chain)
    chain[at:at] = filters


def _component(config: dict, component_id: str) -> dict:
    return next(c for c in config["components"] if c["id"] == component_id)


def given_options(options: JobOptions) -> dict:
    """The options that differ from their defaults: what ``fedfms job`` was asked for."""
    defaults = JobOptions()
    return {f.name: value for f in fields(JobOptions) if (value := getattr(options, f.name)) != getattr(defaults, f.name)}


def configure_job(job_dir: str | os.PathLike, out_dir: str | os.PathLike, options: JobOptions) -> Path:
    """Copy ``job_dir`` (a folder, or a shipped job's name) to ``out_dir`` with ``options`` applied; ``out_dir`` must not exist yet."""
    source, out = find_job(job_dir), Path(out_dir)
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
        meta = {**json.loads((staging / "meta.json").read_text()), "name": out.name, "fedfms_job_options": given_options(options)}
        if options.min_clients:
            meta["min_clients"] = options.min_clients
        (staging / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
