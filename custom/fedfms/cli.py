"""The ``fedfms`` command: synthesise, prepare and partition data; count parameters; configure and report jobs; render bundles.

Exit codes: 0 success; 2 bad input or arguments (the message names the file and the problem);
3 ``prepare --on-error skip`` finished but skipped files (listed in the summary); 4 ``report`` of
a run that has no final test table (it aborted or never reached its final evaluation), or a
``simulate`` run that did not complete (no records, ended early or aborted, no final test table);
5 ``simulate``: ``nvflare simulator`` could not start or exited non-zero; 6 ``simulate``: the
simulator ran past ``--timeout`` and was stopped; 130 ``simulate`` interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from fedfms.errors import DataError

EXIT_BAD_INPUT = 2
EXIT_SKIPPED = 3
EXIT_INCOMPLETE = 4


def _synth_prostate(args: argparse.Namespace) -> int:
    from fedfms.data.synthetic import synthesize_prostate

    sites: int | list[str] = int(args.sites[0]) if len(args.sites) == 1 and args.sites[0].isdigit() else args.sites
    pairs = synthesize_prostate(args.out, sites=sites, cases_per_site=args.cases_per_site, seed=args.seed, shape=args.shape)
    site_names = sorted({image.parent.name for image, _ in pairs})
    print(f"wrote {len(pairs)} cases from {len(site_names)} sites ({', '.join(site_names)}) to {args.out}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fedfms.data.prepare import PrepareOptions, bundle_preparation, prepare

    names = {f.name for f in fields(PrepareOptions)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.bundle:
        bundle = bundle_preparation(args.bundle)
        overrides = sorted(k for k in given if k in bundle and given[k] != bundle[k])
        options = PrepareOptions(**{**bundle, **given, "overrides": overrides})
        print(f"preprocessing_3d of {args.bundle}" + (f", overridden: {', '.join(f'{k}={given[k]}' for k in overrides)}" if overrides else ""))
    else:
        options = PrepareOptions(**given)
    result = prepare(args.src, args.out, options)
    total = sum(len(c["samples"]) for c in result.cases)
    print(
        f"prepared {len(result.cases)} cases ({result.processed} processed, {result.reused} up to date), "
        f"{total} samples -> {result.out_dir} (datalists in {result.out_dir / 'datalists'})"
    )
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s):")
        for s in result.skipped:
            print(f"  {s['file']}: {s['problem']}")
        return EXIT_SKIPPED
    return 0


def _partition(args: argparse.Namespace) -> int:
    from fedfms.data.partition import PartitionOptions, partition

    names = {f.name for f in fields(PartitionOptions)}
    options = PartitionOptions(**{k: v for k, v in vars(args).items() if k in names})
    out = args.out or Path(args.data) / "partitions" / options.method
    result = partition(args.data, out, options)
    print(result.table())
    print(f"client datalists written to {result.out_dir}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from fedfms.models.counting import component_counts, count_parameters
    from fedfms.models.checkpoints import load_checkpoint
    from fedfms.models.factory import MODELS, build_model
    from fedfms.models.litemedsam import NATIVE_IMAGE_SIZE, resolve_checkpoint
    from fedfms.models.sam import SAM_SIZES
    from fedfms.models.strategies import STRATEGIES, trainable_names

    for option, value, known in (("--model", args.model, MODELS), ("--strategy", args.strategy, STRATEGIES), ("--size", args.size, SAM_SIZES)):
        if value not in known:
            raise ValueError(f"{option}: unknown {value!r}; expected one of {', '.join(known)}")
    image_size = args.image_size or (NATIVE_IMAGE_SIZE if args.size == "lite" else 1024)
    model = build_model(
        args.model, args.strategy, size=args.size, image_size=image_size, num_classes=args.num_classes,
        lora_rank=args.lora_rank, depth_adapter=args.depth_adapter,
    )
    print(f"model {args.model}, size {args.size}, image {image_size}, classes {args.num_classes}, strategy {args.strategy}")
    if args.checkpoint:
        print(load_checkpoint(model, resolve_checkpoint(args.checkpoint)).summary())
    count = count_parameters(model)
    print(f"total parameters      {count.total:>13,}")
    print(f"trainable parameters  {count.trainable:>13,}  ({100 * count.trainable / count.total:.2f}%)")
    print(f"bytes per round       {count.bytes_per_round:>13,}  (fp32, trainable parameters one client sends)")
    for part, n in sorted(component_counts(model).items()):
        print(f"  {part:<40}{n:>13,}")
    if args.list:
        print("trainable:")
        print("\n".join(f"  {name}" for name in trainable_names(model, args.strategy)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedfms.experiment.report import is_experiment_dir
    from fedfms.fl.report import IncompleteRun, report

    if is_experiment_dir(args.workspace):  # an experiment's output folder: its tables and figures
        return _experiment_report(args.workspace)
    try:
        print(report(args.workspace, args.png))
    except IncompleteRun as incomplete:
        print(incomplete)
        return EXIT_INCOMPLETE
    return 0


def _experiment_report(out) -> int:
    from fedfms.experiment.report import write_report

    text, files = write_report(out)
    print(text)
    print("report files: " + ", ".join(str(f) for f in files))
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fedfms.experiment.cells import expand_cells, select_cells
    from fedfms.experiment.config import load_config
    from fedfms.experiment.runner import cell_state, experiment_out, run_experiment

    overrides = {"rounds": args.rounds, "epochs": args.epochs, "pretrained_checkpoint": args.pretrained_checkpoint, "device": args.device}
    config = load_config(args.config, overrides)
    out = experiment_out(config, args.out)
    if args.list:
        for cell in select_cells(expand_cells(config), args.only):
            print(f"{cell['id']:<36}{cell_state(out, cell)}")
        return 0
    failed = False
    if not args.report:
        failed = any(r["status"] != "ok" for r in run_experiment(config, out, args.only))
    code = _experiment_report(out)
    return EXIT_INCOMPLETE if failed else code


def _bundle_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON (numbers, true/false, null, lists), else kept as a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _job(args: argparse.Namespace) -> int:
    from fedfms.fl.job_config import JobOptions, configure_job

    names = {f.name for f in fields(JobOptions)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given["overrides"] = dict(args.overrides) if args.overrides else None
    out = configure_job(args.job, args.out, JobOptions(**given))
    print(f"job written to {out}")
    print(f"  simulate it:  fedfms simulate {out} -w WORKSPACE -c SITE,SITE,... -t N   (nvflare simulator, judged by its records; -n N names the sites site-1..N)")
    print(f"  submit it:    nvflare job submit -j {out}   (POC or a provisioned project; see the README's Deploy section)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedfms.fl.simulate import simulate

    given = [("-n", args.n_clients), ("-c", args.clients), ("-t", args.threads), ("-gpu", args.gpu), ("-l", args.log_config), ("-m", args.max_clients)]
    simulator_args = [word for flag, value in given if value is not None for word in (flag, str(value))]
    simulator_args += ["--end_run_for_all"] if args.end_run_for_all else []
    return simulate(args.job, args.workspace, simulator_args, timeout=args.timeout, png=args.png, stream=args.stream)


def _add_simulate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "simulate",
        help="run a job in `nvflare simulator`, print its report, and exit non-zero unless the run completed",
        description="Runs `nvflare simulator JOB -w WORKSPACE ...` with the same arguments, keeps its output in "
        "WORKSPACE/simulator.log, then judges the run by its records (run_status.json, round_metrics.json, "
        "final_test.json), as `fedfms report` reads them, and prints the report. `nvflare simulator` alone exits 0 "
        "even when every site failed.",
        epilog="Exit codes: 0 the run completed and the final model was scored; 2 nothing started: JOB is not a job "
        "folder, WORKSPACE holds the job or this folder (the simulator empties it), or bad arguments; 4 the run did "
        "not complete (no records, ended early or aborted, no final test table; the log's errors are shown); 5 nvflare "
        "simulator could not start or exited non-zero (the log's last lines are shown); 6 it ran past --timeout and "
        "was stopped with every process it started; 130 interrupted (Ctrl-C), stopped the same way.",
    )
    p.add_argument("job", help="a job folder (e.g. one written by `fedfms job`), or the name of a shipped job, e.g. fedmsa_prostate")
    p.add_argument("-w", "--workspace", required=True, help="simulator workspace (emptied by the simulator when it starts)")
    p.add_argument("-n", "--n_clients", type=int, help="number of sites, named site-1..N")
    p.add_argument("-c", "--clients", help="site names, comma separated (e.g. the hospitals: BMC,I2CVB,RUNMC)")
    p.add_argument("-t", "--threads", type=int, help="sites running at the same time (client processes)")
    p.add_argument("-gpu", "--gpu", help="nvflare simulator: GPU ids, comma separated")
    p.add_argument("-l", "--log_config", help="nvflare simulator: log mode (concise, msg_only, full, verbose), file or level")
    p.add_argument("-m", "--max_clients", type=int, help="nvflare simulator: maximum number of clients")
    p.add_argument("--end_run_for_all", action="store_true", help="nvflare simulator: fire END_RUN for all clients")
    p.add_argument("--timeout", type=float, help="seconds the simulator may run; then it is stopped with every process it started (exit 6)")
    p.add_argument("--stream", action="store_true", help="also print the simulator's output as it runs (it is kept in WORKSPACE/simulator.log either way)")
    p.add_argument("--png", help="where to write the Dice-per-round plot (default: in the server app folder)")
    p.set_defaults(run=_simulate)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser("synth", help="write synthetic data in a real raw layout")
    kinds = synth.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser(
        "prostate",
        help="multi-site prostate T2 MRI in the SAML layout (RAW/<SITE>/CaseNN.nii.gz), "
        "patient ages in RAW/<SITE>/clinical.csv",
    )
    p.add_argument("--out", required=True, help="raw data folder to write")
    p.add_argument("--sites", nargs="+", default=["6"], help="number of sites (1-6) or site names (default: 6)")
    p.add_argument("--cases-per-site", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, metavar=("H", "W", "D"), help="one shape for every site (default: per-site shapes)")
    p.set_defaults(run=_synth_prostate)


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("prepare", help="raw 3D volumes -> prepared 2D samples and per-site datalists")
    p.add_argument("--src", required=True, help="raw data folder")
    p.add_argument("--layout", choices=("saml", "fedfms", "msd"), default="saml")
    p.add_argument("--out", required=True, help="prepared data folder")
    # Chain options default to None: the bundle's value with --bundle, else PrepareOptions' default.
    p.add_argument("--bundle", help="a bundle folder: run its preprocessing_3d chain with its options (flags below override them)")
    p.add_argument("--lower-percentile", type=float, help="lower clip percentile; 0 = volume minimum (FedFMS, default)")
    p.add_argument("--upper-percentile", type=float, help="upper clip percentile (FedFMS 99, default; nnU-Net 99.5)")
    p.add_argument("--zscore", action="store_true", default=None, help="z-score with per-site statistics of training volumes")
    p.add_argument("--num-slices", type=int, help="stack size N, odd (FedFMS 1, default; FLAP-SAM 5)")
    p.add_argument("--all-label-slices", action="store_true", default=None, help="keep the labels of all N slices, not only the centre")
    p.add_argument("--image-size", type=int, help="image size (default 1024)")
    p.add_argument("--label-size", type=int, help="label size (default 256: FedFMS with 1024 images)")
    p.add_argument("--multi-class", action="store_true", default=None, help="keep label values instead of merging them to foreground")
    p.add_argument("--num-classes", type=int, help="number of classes with --multi-class (values 0..C-1)")
    p.add_argument("--drop-empty", dest="keep_empty", action="store_false", default=None, help="drop slices without foreground")
    p.add_argument("--axcodes", help="orientation before slicing along the last axis (default RAS)")
    p.add_argument("--image-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--image-store", choices=("compact", "resized"), default="compact",
                   help="compact (default): images smaller than --image-size are written at their own size and resized on load, "
                   "giving the same training input; resized: every image written at --image-size")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="seed of the case-level split")
    p.add_argument("--sites", nargs="+", help="prepare only these sites")
    p.add_argument("--msd-site", default="MSD", help="site name given to an MSD task's cases")
    p.add_argument("--msd-channel", type=int, default=0, help="channel of 4D MSD images (prostate: 0 = T2, 1 = ADC)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="what to do with a bad case")
    p.set_defaults(run=_prepare)


def _add_partition(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("partition", help="client datalists from prepared data")
    p.add_argument("--data", required=True, help="prepared data folder (from fedfms prepare)")
    p.add_argument("--method", choices=("natural", "loso", "quantity", "attribute", "dirichlet"), default="natural")
    p.add_argument("--out", help="output folder (default: DATA/partitions/<method>)")
    p.add_argument("--clients", dest="num_clients", type=int, default=3, help="number of clients (quantity, attribute, dirichlet)")
    p.add_argument("--unseen", dest="unseen_site", help="the held-out site (loso)")
    p.add_argument(
        "--attribute",
        default="gland_volume_ml",
        help="per-case attribute to skew by (attribute): gland_volume_ml, num_slices, or a column of the sites' "
        "clinical.csv such as age (age skew: client 1 youngest)",
    )
    p.add_argument("--attributes-csv", help="CSV with columns site, case, <attribute>... adding per-case attributes")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (quantity, dirichlet); small = skewed")
    p.add_argument("--proxy-fraction", type=float, default=0.1, help="share of each site's training cases kept for the server")
    p.add_argument("--client-prefix", default="site-", help="client names for pooled methods: <prefix>1..K")
    p.add_argument("--client-names", nargs="+", metavar="NAME", help="pooled methods: the clients' names, e.g. the hospitals' (RUNMC BMC HK); sets --clients")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_partition)


def _add_params(commands: argparse._SubParsersAction) -> None:
    # Names are checked when the command runs: importing the model catalogue here (torch, MONAI)
    # would make every `fedfms` command, even --help, start 10+ s slower.
    p = commands.add_parser("params", help="parameter counts and bytes per round of a model and strategy")
    p.add_argument("--model", default="sam", help="sam (FedFMS decoder), flapsam, or a U-Net: unet, basicunet, dynunet, smlite (default sam)")
    p.add_argument("--strategy", default="full", help="full, msa, flap, lora, lora_dec, dec, pdec, attn (default full)")
    p.add_argument("--size", default="vit_b", help="lite (LiteMedSAM), tiny, small, vit_b, vit_l, vit_h (default vit_b)")
    p.add_argument("--image-size", type=int, help="input size (default: 256 for lite, 1024 for the ViT sizes)")
    p.add_argument("--num-classes", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--depth-adapter", action="store_true", help="MSA depth adapter (FedFMS's 14.7M setting)")
    p.add_argument("--checkpoint", help="local checkpoint to load, or 'litemedsam' for the packaged LiteMedSAM weights; prints the key report")
    p.add_argument("--list", action="store_true", help="list the trainable parameter names")
    p.set_defaults(run=_params)


def _add_report(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("report", help="tables and a Dice-per-round plot of a federated run")
    p.add_argument("workspace", help="the simulator workspace (-w), a downloaded job result (<download>/<job id>), or a server app folder")
    p.add_argument("--png", help="where to write the plot (default: in the server app folder)")
    p.set_defaults(run=_report)


def _add_job(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("job", help="a configured copy of a job folder: profile, data, rounds, resume")
    p.add_argument("job", help="a job folder, or the name of a job that ships with fedfms, e.g. fedmsa_prostate")
    p.add_argument("--out", required=True, help="new job folder to write (must not exist)")
    p.add_argument("--profile", choices=("cpu_demo", "paper"), help="paper: the bundle's own sizes, 100 rounds x 1 local epoch")
    p.add_argument("--pretrained-checkpoint", help="local SAM/MedSAM checkpoint (required by the paper profile of SAM jobs)")
    p.add_argument("--dataset-dir", help="prepared data folder (default: the job's, demo/data)")
    p.add_argument("--num-rounds", type=int, help="total federated rounds")
    p.add_argument("--local-epochs", type=int, help="local epochs per round")
    p.add_argument("--resume-from", help="the server app folder (or its FL_global_model.pt) of an interrupted run: continue its rounds, records and best model")
    p.add_argument("--task-timeout", type=int, help="seconds a round's task may take before the round goes on without the silent sites (0: no limit)")
    p.add_argument("--min-clients", type=int, help="acceptable updates a round needs; fewer end the rounds")
    p.add_argument("--norm-statistics", choices=("global", "local"), help="normalisation statistics: averaged with the weights (global) or kept at each site (local, FedBN)")
    p.add_argument("--evaluate-only", action="append", metavar="SITE", help="this site only scores the final model, never trains (leave-one-site-out; default for a leave-one-site-out job: the partition's unseen site)")
    p.add_argument("--exclude-vars", help="regular expression: matching tensors never leave a site (NVFlare's ExcludeVars filter)")
    p.add_argument("--percentile-privacy", type=float, metavar="PERCENTILE", help="sites send weight changes, zeroing those below this percentile of magnitude (NVFlare's PercentilePrivacy)")
    p.add_argument("--privacy-gamma", type=float, default=0.01, help="PercentilePrivacy: each shared change (per training sample) is clipped to +-gamma")
    p.add_argument("--datalist-dir", help="the partition inside the dataset folder, e.g. partitions/quantity")
    p.add_argument("--init-mode", choices=("random", "pretrain", "fm"), help="initial global model of a job with the FM-instructed-init pre-stage")
    p.add_argument("--prestage-epochs", type=int, help="epochs of that pre-stage on the server's proxy set (the job's: 20)")
    p.add_argument("--strategy", help="SAM jobs: fine-tuning strategy, e.g. pdec, dec, attn, lora, lora_dec (FLAP-SAM's baselines), full, msa, flap")
    p.add_argument("--size", help="SAM jobs: model size (lite = LiteMedSAM, tiny, small, vit_b, vit_l, vit_h)")
    p.add_argument("--image-size", type=int, help="SAM jobs: the network's input size (a multiple of 16)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="SAM jobs: the same network from random weights (the papers' -PT ablation)")
    p.add_argument("--seed", type=int, help="seed of the run: initial weights, each site's data order and augmentation (default 0)")
    p.add_argument("--override", dest="overrides", action="append", type=_bundle_override, metavar="KEY=VALUE",
                   help="any other bundle key for every network and learner of the job, VALUE as JSON (e.g. learning_rate=1e-4, train#samples_per_epoch=32)")
    lora = p.add_argument_group("FLAP-SAM's ranks")
    lora.add_argument("--lora-rank", type=int, help="LoRA strategies (flap, lora, lora_dec): the rank r of every LoRA layer (default 32; FLAP-SAM Table 2: 4-64)")
    lora.add_argument("--svd-rank", type=int, help="LoRA-SVD aggregation: rank of the re-factorised averaged products (default: the LoRA rank)")
    wire = p.add_argument_group("compressed exchange")
    wire.add_argument("--compress", choices=("fp16", "bf16", "blockwise8", "nf4", "fp4"),
                      help="the train exchange, both ways: 16-bit casts, 8-bit blockwise or 4-bit NormalFloat/FloatingPoint codes (bitsandbytes, on CPU); default: fp32 as it is")
    wire.add_argument("--compress-full-weights", action="store_true",
                      help="compressed updates carry the weights (default: the round's change, so the sites' error on the global model does not reach the server)")
    algo = p.add_argument_group("federated algorithm")
    algo.add_argument("--algorithm", choices=("fedavg", "fedprox", "fedopt", "scaffold", "ditto"),
                      help="how the server and the sites federate (default fedavg; fedopt and scaffold are refused with LoRA-SVD aggregation)")
    algo.add_argument("--fedprox-mu", type=float, help="fedprox: weight of the sites' proximal term mu/2 ||w - w_global||^2 (default 0.01)")
    algo.add_argument("--server-optimizer", help="fedopt: sgd (FedAvgM with momentum), adam (FedAdam) or yogi (FedYogi) (default sgd)")
    algo.add_argument("--server-lr", type=float, help="fedopt: the server learning rate on the sites' mean change (default 1)")
    algo.add_argument("--server-momentum", type=float, help="fedopt: SGD's momentum, Adam's and Yogi's beta1 (default 0.9)")
    algo.add_argument("--ditto-lambda", type=float, help="ditto: weight of each personal model's distance to the global model (default 0.1)")
    algo.add_argument("--patience", type=int, help="end the rounds once the mean validation Dice of the global model has not improved for this many rounds")
    robust = p.add_argument_group("silent and hostile sites")
    robust.add_argument("--wait-after-min-received", type=int, metavar="SECONDS",
                        help="seconds the other sites get once min_clients have answered: what a hung site costs per round (jobs: 60; paper profile: 3600)")
    robust.add_argument("--max-abs-value", type=float, help="refuse an update holding a value larger in magnitude (default 1e4)")
    robust.add_argument("--max-change-norm", type=float, help="refuse an update whose change against the global model has a larger L2 norm (default: no bound)")
    robust.add_argument("--max-change-ratio", type=float, help="refuse an update whose change norm is more than this times the median of the other sites' (default 10)")
    robust.add_argument("--clip-norm", type=float, help="scale each accepted change down to this L2 norm")
    robust.add_argument("--aggregation", help="mean (FedAvg, weighted), or the robust coordinate-wise median or trimmed_mean (unweighted; on the LoRA products in a LoRA-SVD job)")
    robust.add_argument("--trim-fraction", type=float, help="trimmed_mean: share of values dropped at each end per coordinate (default 0.2)")
    p.set_defaults(run=_job)


def _add_experiment(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "experiment",
        help="run an experiment file (methods x local/centralized/federated/loso, one cell at a time) and write the papers' tables and figures",
        epilog="Exit codes: 0 every cell ok; 2 bad experiment file or arguments; 4 some cell failed (its reason is in its result.json).",
    )
    p.add_argument("config", help="an experiment file (YAML or JSON), or a shipped one: algorithms, amp, cpu, compression, flapsam, fminit, paper")
    p.add_argument("--out", help="output folder (default: the file's `out`, else experiments/<name>)")
    p.add_argument("--report", action="store_true", help="run nothing: write the tables and figures of the cells finished so far")
    p.add_argument("--list", action="store_true", help="run nothing: list the cells and their state (done, failed, changed, pending)")
    p.add_argument("--only", action="append", metavar="PATTERN", help="run only the cells whose id matches this shell pattern (e.g. 'fedmsa-*'); repeatable")
    p.add_argument("--rounds", type=int, help="replace the file's rounds (federated cells; local and centralized ones train rounds x epochs unless the file sets train_epochs)")
    p.add_argument("--epochs", type=int, help="replace the file's local epochs per round")
    p.add_argument("--pretrained-checkpoint", help="replace the file's pretrained_checkpoint (SAM methods; required by the paper profile)")
    p.add_argument("--device", help="replace the file's device, e.g. cuda")
    p.set_defaults(run=_experiment)


def _bundles(args: argparse.Namespace) -> int:
    from fedfms.bundle_files import find_bundles, stale_files, write_bundle

    stale = {}
    for bundle in find_bundles(args.root, args.names):
        changed = stale_files(bundle) if args.check else write_bundle(bundle)
        if changed:
            stale[bundle] = changed
        print(f"{bundle}: {', '.join(changed) if changed else 'up to date'}{' (out of date)' if changed and args.check else ''}")
    if stale and args.check:
        print("error: bundles differ from their source; run `fedfms bundles` to regenerate them", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _add_bundles(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bundles", help="write (or --check) the generated configs, LICENSE and docs of the bundles")
    p.add_argument("names", nargs="*", help="bundle folder names (default: every bundle under --root)")
    p.add_argument("--root", default="bundles", help="the folder holding the bundles")
    p.add_argument("--check", action="store_true", help="only report files that differ from their source; exit 2 if any")
    p.set_defaults(run=_bundles)


def _deploy_template(args: argparse.Namespace) -> int:
    from fedfms.fl.deploy_template import write_deploy_template

    for path in write_deploy_template(args.out, server=args.server, sites=args.sites):
        print(f"wrote {path}")
    print(f"  provision:  nvflare provision -p {Path(args.out) / 'project.yml'} -w WORKSPACE   (one startup kit per participant)")
    print(f"  submit:     python {Path(args.out) / 'submit_job.py'} ADMIN_KIT JOB_FOLDER   (FLARE API; or nvflare job submit)")
    return 0


def _add_deploy_template(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("deploy-template", help="write the NVFlare project file (project.yml) and the FLARE API submit script")
    p.add_argument("--out", required=True, help="folder to write project.yml and submit_job.py into (existing files are not overwritten)")
    p.add_argument("--server", help="the server's DNS name, as clients will reach it (default: localhost, a rehearsal on one machine)")
    p.add_argument("--sites", nargs="+", metavar="NAME", help="the hospitals' client names, as their datalists are named (default: RUNMC BMC HK)")
    p.set_defaults(run=_deploy_template)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfms", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_synth(commands)
    _add_prepare(commands)
    _add_partition(commands)
    _add_params(commands)
    _add_report(commands)
    _add_job(commands)
    _add_simulate(commands)
    _add_deploy_template(commands)
    _add_bundles(commands)
    _add_experiment(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
