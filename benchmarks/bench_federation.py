"""Wall time of a federated job in `nvflare simulator` against a plain in-process FedAvg loop.

    .venv/bin/python benchmarks/bench_federation.py [--job fedmsa_prostate] [--rounds 10] [--clients 3] [--repeats 2]

Both sides run the same bundle, data (``demo/data`` from ``make demo``), clients, rounds and local
epochs, with the same client code (:class:`fedfms.fl.executors.learner.BundleLearner`): the plain loop calls
it directly, site after site, and averages the returned parameters by sample count in PyTorch.
The simulator adds NVFlare's runtime (job deployment, messaging, serialization, persistence,
recording, TensorBoard streaming) and runs the clients in parallel processes. Each side is timed
as a whole command, from process start (interpreter and imports included) to exit, alternating
the two for ``--repeats`` pairs; prints every time, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel

from fedfms.bundle import bundle_network
from fedfms.fl.job_config import JobOptions, configure_job
from fedfms.fl.executors.learner import BundleLearner

REPO = Path(__file__).resolve().parents[1]


def job_args(job: str) -> tuple[dict, dict]:
    config = REPO / "jobs" / job / "app" / "config"
    client = json.loads((config / "config_fed_client.json").read_text())["components"][0]["args"]
    persistor = json.loads((config / "config_fed_server.json").read_text())["components"][0]["args"]["model"]["args"]
    return client, persistor


def plain_fedavg(job: str, rounds: int, clients: int, work: Path) -> None:
    """The same rounds with no NVFlare runtime: learners called in turn, weighted mean in PyTorch."""
    client_args, model_args = job_args(job)
    learners = []
    for k in range(clients):
        learner = BundleLearner(**{**client_args, "tracking_writer_id": ""})
        learner.site_name, learner.app_root = f"site-{k + 1}", str(work / f"site-{k + 1}")
        learner.initialize()
        learners.append(learner)
    server = bundle_network(**model_args)
    global_params = {n: p.detach().clone() for n, p in server.named_parameters() if p.requires_grad}
    for _ in range(rounds):
        results = []
        for learner in learners:
            learner.validate(FLModel(params=global_params))  # as ModelLearnerExecutor does before training
            results.append(learner.train(FLModel(params=global_params)))
        weights = torch.tensor([float(r.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND]) for r in results])
        weights /= weights.sum()
        global_params = {k: sum(w * r.params[k] for w, r in zip(weights, results)) for k in global_params}


def plain_command(job: str, rounds: int, clients: int, work: Path) -> float:
    """Wall time of the plain loop as its own process, like the simulator command."""
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--job", job, "--rounds", str(rounds), "--clients", str(clients), "--plain-in", str(work)],
                   cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def simulator(job: str, rounds: int, clients: int, work: Path) -> float:
    """The shipped job with ``num_rounds`` set (`fedfms job`), timed end to end through the CLI."""
    job_dir = configure_job(REPO / "jobs" / job, work / job, JobOptions(num_rounds=rounds))
    server_config = job_dir / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_config.read_text())
    server["workflows"] = [w for w in server["workflows"] if w["id"] == "fedavg"]  # rounds only, like the plain loop
    server_config.write_text(json.dumps(server))
    nvflare = Path(sys.executable).with_name("nvflare")
    start = time.perf_counter()
    subprocess.run([str(nvflare), "simulator", str(job_dir), "-w", str(work / "ws"), "-n", str(clients), "-t", str(clients)],
                   cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="fedmsa_prostate")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs; medians are compared")
    parser.add_argument("--plain-in", help=argparse.SUPPRESS)  # internal: run the plain loop in this folder
    args = parser.parse_args()
    if args.plain_in:
        return plain_fedavg(args.job, args.rounds, args.clients, Path(args.plain_in))
    plain, flare = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            plain.append(plain_command(args.job, args.rounds, args.clients, Path(tmp) / "plain"))
            flare.append(simulator(args.job, args.rounds, args.clients, Path(tmp) / "flare"))
    print(f"job {args.job}, {args.clients} clients, {args.rounds} rounds, {args.repeats} runs each")
    print(f"  plain in-process FedAvg loop   median {median(plain):6.1f} s   runs " + ", ".join(f"{t:.1f}" for t in plain))
    print(f"  nvflare simulator              median {median(flare):6.1f} s   runs " + ", ".join(f"{t:.1f}" for t in flare))
    print(f"  ratio simulator / plain        {median(flare) / median(plain):6.2f}x (target 1.25x)")


if __name__ == "__main__":
    main()
