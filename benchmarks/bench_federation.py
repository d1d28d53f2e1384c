"""Wall time of a federated job in `nvflare simulator` against a plain in-process FedAvg loop.

    .venv/bin/python benchmarks/bench_federation.py [--job fedmsa_prostate] [--rounds 5] [--clients 3]

Both sides run the same bundle, data (``demo/data`` from ``make demo``), clients, rounds and local
epochs, with the same client code (:class:`fedfms.fl.learner.BundleLearner`): the plain loop calls
it directly, site after site, and averages the returned parameters by sample count in PyTorch.
The simulator adds NVFlare's runtime (job deployment, messaging, serialization, persistence,
recording) and runs the clients in parallel threads. Prints both times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel

from fedfms.bundle import bundle_network
from fedfms.fl.learner import BundleLearner

REPO = Path(__file__).resolve().parents[1]


def job_args(job: str) -> tuple[dict, dict]:
    config = REPO / "jobs" / job / "app" / "config"
    client = json.loads((config / "config_fed_client.json").read_text())["components"][0]["args"]
    persistor = json.loads((config / "config_fed_server.json").read_text())["components"][0]["args"]["model"]["args"]
    return client, persistor


def plain_fedavg(job: str, rounds: int, clients: int, work: Path) -> float:
    """The same rounds with no NVFlare runtime: learners called in turn, weighted mean in PyTorch."""
    client_args, model_args = job_args(job)
    start = time.perf_counter()
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
    return time.perf_counter() - start


def simulator(job: str, rounds: int, clients: int, work: Path) -> float:
    """The shipped job with ``num_rounds`` set, timed end to end through the CLI."""
    job_dir = work / job
    shutil.copytree(REPO / "jobs" / job, job_dir)
    server_config = job_dir / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_config.read_text())
    server["workflows"] = [w for w in server["workflows"] if w["id"] == "fedavg"]  # rounds only, like the plain loop
    server["workflows"][0]["args"]["num_rounds"] = rounds
    server_config.write_text(json.dumps(server))
    nvflare = Path(sys.executable).with_name("nvflare")
    start = time.perf_counter()
    subprocess.run([str(nvflare), "simulator", str(job_dir), "-w", str(work / "ws"), "-n", str(clients), "-t", str(clients)],
                   cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="fedmsa_prostate")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = plain_fedavg(args.job, args.rounds, args.clients, Path(tmp) / "plain")
        flare = simulator(args.job, args.rounds, args.clients, Path(tmp) / "flare")
    print(f"job {args.job}, {args.clients} clients, {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"  plain in-process FedAvg loop   {plain:7.1f} s")
    print(f"  nvflare simulator              {flare:7.1f} s")
    print(f"  ratio simulator / plain        {flare / plain:7.2f}x")


if __name__ == "__main__":
    main()
