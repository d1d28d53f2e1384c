"""`fedfms job`: a configured copy of a shipped job (paper profile, data, rounds, resume)."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from segment_anything import sam_model_registry

from fedfms.bundle import bundle_network
from fedfms.bundle_files import cpu_demo_profile
from fedfms.cli import main
from fedfms.errors import DataError
from fedfms.fl.job_config import JobOptions, bundle_args, configure_job
from fedfms.models import count_parameters, read_state_dict, trainable_names
from fedfms.models.litemedsam import packaged_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _configs(job: Path) -> tuple[dict, dict]:
    return tuple(json.loads((job / "app/config" / name).read_text()) for name in ("config_fed_client.json", "config_fed_server.json"))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "sam.pth"
    path.write_bytes(b"weights")
    return path


def _data(tmp_path: Path, *partitions: str) -> Path:
    """A prepared-data folder holding one site datalist in each of ``partitions``; ``*/loso`` leaves HK out."""
    for partition in partitions:
        folder = tmp_path / "data" / partition
        folder.mkdir(parents=True)
        (folder / "RUNMC.json").write_text("{}")
        if partition.endswith("loso"):
            (folder / "unseen.json").write_text("{}")
            (folder / "partition.json").write_text(json.dumps({"options": {"method": "loso", "unseen_site": "HK"}}))
    return tmp_path / "data"


def test_paper_profile_changes_every_place_the_bundle_is_named(tmp_path, checkpoint):
    _data(tmp_path, "partitions/loso")
    out = configure_job(REPO / "jobs/fedmsa_prostate_loso", tmp_path / "paper", JobOptions(profile="paper", pretrained_checkpoint=str(checkpoint), dataset_dir=str(tmp_path / "data")))
    client, server = _configs(out)
    places = bundle_args(client) + bundle_args(server)
    assert len(places) == 2  # learner, persistor network: the server needs no site's data
    assert all(args["config_files"] == ["train.json"] for args in places)
    assert all(str(checkpoint) in json.dumps(args) for args in places)
    assert all(args["dataset_dir"] == str(tmp_path / "data") for args in places if "dataset_dir" in args)
    assert server["workflows"][0]["args"]["num_rounds"] == 100 and bundle_args(client)[0]["local_epochs"] == 1
    assert all(w["args"]["task_timeout"] == 6 * 3600 for w in server["workflows"])  # sized to ViT-B at 1024
    assert json.loads((out / "meta.json").read_text())["name"] == "paper"
    assert [w["args"]["evaluate_only_sites"] for w in server["workflows"]] == [["HK"], ["HK"]]  # from the partition
    assert (out / "app/custom/README.md").is_file()
    assert bundle_args(_configs(REPO / "jobs/fedmsa_prostate_loso")[0])[0]["config_files"] == ["train.json", "cpu_demo.json"]  # source untouched


def test_paper_profile_server_builds_vit_b_from_the_official_checkpoint(tmp_path):
    official = sam_model_registry["vit_b"]()  # ViT-B at 1024, official key layout, random weights
    checkpoint = tmp_path / "sam_vit_b.pth"
    torch.save(official.state_dict(), checkpoint)
    out = configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "paper", JobOptions(profile="paper", pretrained_checkpoint=str(checkpoint)))
    persistor = next(c for c in _configs(out)[1]["components"] if c["id"] == "persistor")
    network = bundle_network(**persistor["args"]["model"]["args"])
    key = "image_encoder.patch_embed.proj.weight"
    assert network.state_dict()[key].shape == (768, 3, 16, 16)  # ViT-B, not the demo's tiny encoder
    assert torch.equal(network.state_dict()[key], official.state_dict()[key])  # loaded, not re-initialised


def _saved_global_model(job: str, folder: Path) -> Path:
    """The job's own initial network saved as a global model after 2 rounds, with the job's server config beside it, as a run leaves them."""
    server = json.loads((REPO / "jobs" / job / "app/config/config_fed_server.json").read_text())
    network = bundle_network(**next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"])
    (folder / "config").mkdir(parents=True)
    (folder / "config/config_fed_server.json").write_text(json.dumps(server))
    torch.save({"model": network.state_dict(), "meta_props": {"completed_rounds": 2}}, folder / "FL_global_model.pt")
    return folder / "FL_global_model.pt"


def test_resuming_a_run_of_another_job_is_refused_before_any_work(tmp_path):
    unet = _saved_global_model("fedunet_prostate", tmp_path / "unet_run")
    with pytest.raises(DataError, match="holds a global model of another network .*keys missing, e.g. .*keys this job.s network does not have"):
        configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "a", JobOptions(resume_from=str(unet.parent)))
    fminit = json.loads((REPO / "jobs/fminit_prostate/app/config/config_fed_server.json").read_text())
    (unet.parent / "config/config_fed_server.json").write_text(json.dumps(fminit))
    with pytest.raises(DataError, match="is a run of another job: its server workflows were .*FMInstructedInit"):
        configure_job(REPO / "jobs/fedunet_prostate", tmp_path / "b", JobOptions(resume_from=str(unet.parent)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_options_override_rounds_and_resume(tmp_path):
    model = _saved_global_model("flapsam_prostate", tmp_path / "earlier")
    options = JobOptions(num_rounds=3, local_epochs=4, resume_from=str(model.parent), task_timeout=90, min_clients=3)
    out = configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "more", options)
    client, server = _configs(out)
    assert server["workflows"][0]["args"]["num_rounds"] == 3 and bundle_args(client)[0]["local_epochs"] == 4
    for component in ("persistor", "contributions", "model_selector"):  # weights, records and best model all continue
        assert next(c for c in server["components"] if c["id"] == component)["args"]["resume_from"] == str(model.parent)
    assert [w["args"]["task_timeout"] for w in server["workflows"]] == [90, 90]
    assert server["workflows"][0]["args"]["min_clients"] == 3 == json.loads((out / "meta.json").read_text())["min_clients"]
    assert bundle_args(client)[0]["config_files"] == ["train.json", "cpu_demo.json"]  # the profile is kept


def test_a_checkpoint_alone_keeps_the_profile(tmp_path, checkpoint):
    out = configure_job(REPO / "jobs/fedsam_prostate", tmp_path / "ckpt", JobOptions(pretrained_checkpoint=str(checkpoint)))
    places = bundle_args(_configs(out)[0]) + bundle_args(_configs(out)[1])
    assert all(args["config_files"] == ["train.json", "cpu_demo.json"] and str(checkpoint) in json.dumps(args) for args in places)


def test_bad_requests_are_clear_errors_and_write_nothing(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="paper profile of bundles/fedsam_prostate needs --pretrained-checkpoint"):
        configure_job(REPO / "jobs/fedsam_prostate", tmp_path / "a", JobOptions(profile="paper"))
    configure_job(REPO / "jobs/fedunet_prostate", tmp_path / "unet", JobOptions(profile="paper"))  # U-Nets train from scratch
    with pytest.raises(DataError, match="pretrained checkpoint not found"):
        JobOptions(profile="paper", pretrained_checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(DataError, match="already exists"):
        configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "unet", JobOptions())
    with pytest.raises(DataError, match="not an NVFlare job folder"):
        configure_job(tmp_path, tmp_path / "b", JobOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam.pth", "unet"]


def test_job_command(tmp_path, checkpoint, capsys):
    assert main(["job", "jobs/fedsam_prostate", "--out", str(tmp_path / "j"), "--profile", "paper", "--pretrained-checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"fedfms simulate {tmp_path / 'j'}" in out and f"nvflare job submit -j {tmp_path / 'j'}" in out
    assert main(["job", "jobs/fedsam_prostate", "--out", str(tmp_path / "k"), "--profile", "paper"]) == 2
    assert "needs --pretrained-checkpoint" in capsys.readouterr().err


def _workflow_args(server: dict, workflow_id: str) -> dict:
    return next(w["args"] for w in server["workflows"] if w["id"] == workflow_id)


def test_fminit_job_gets_its_mode_partition_and_paper_epochs(tmp_path):
    _data(tmp_path, "partitions/quantity")
    out = configure_job(
        REPO / "jobs/fminit_prostate", tmp_path / "pretrain",
        JobOptions(init_mode="pretrain", datalist_dir="partitions/quantity", num_rounds=4, dataset_dir=str(tmp_path / "data"), prestage_epochs=7),
    )
    client, server = _configs(out)
    prestage, fedavg = _workflow_args(server, "fminit"), _workflow_args(server, "fedavg")
    assert prestage["mode"] == "pretrain" and fedavg["num_rounds"] == 4 and "num_rounds" not in prestage  # rounds go to FedAvg, not the pre-stage
    assert prestage["epochs"] == 7
    learner = bundle_args(client)[0]
    assert learner["datalist_dir"] == prestage["datalist_dir"] == "partitions/quantity"
    assert learner["dataset_dir"] == prestage["dataset_dir"] == str(tmp_path / "data")
    paper = configure_job(REPO / "jobs/fminit_prostate", tmp_path / "paper", JobOptions(profile="paper"))
    client, server = _configs(paper)
    assert bundle_args(client)[0]["local_epochs"] == 5 and _workflow_args(server, "fedavg")["num_rounds"] == 100  # the paper: 100 rounds x 5 epochs
    assert all(args["config_files"] == ["train.json"] for args in bundle_args(client) + bundle_args(server))


def test_init_mode_needs_a_job_with_the_prestage(tmp_path):
    with pytest.raises(ValueError, match="--init-mode needs a job with the FMInstructedInit workflow"):
        configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "x", JobOptions(init_mode="fm"))
    with pytest.raises(ValueError, match="--prestage-epochs needs a job with the FMInstructedInit workflow"):
        configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "x", JobOptions(prestage_epochs=3))
    with pytest.raises(ValueError, match="unknown init mode"):
        JobOptions(init_mode="warm")
    with pytest.raises(ValueError, match="prestage_epochs must be >= 1"):
        JobOptions(prestage_epochs=0)
    assert not (tmp_path / "x").exists()


def test_unusable_data_and_resume_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(DataError, match="no prepared data folder here"):
        JobOptions(dataset_dir=str(tmp_path / "nothing"))
    data = _data(tmp_path, "partitions/natural")
    with pytest.raises(DataError, match=f"{data / 'datalists'}: holds no partition \\(no <site>.json datalists\\)"):
        configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "x", JobOptions(dataset_dir=str(data)))
    assert not (tmp_path / "x").exists()
    garbage = tmp_path / "garbage" / "FL_global_model.pt"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=f"{garbage}: cannot be read as a saved global model"):
        JobOptions(resume_from=str(garbage.parent))
    torch.save({"weights": {}}, garbage)
    with pytest.raises(DataError, match="no 'model' state dict"):
        JobOptions(resume_from=str(garbage))
    with pytest.raises(DataError, match="no global model to resume from"):
        JobOptions(resume_from=str(tmp_path))
    assert not list(tmp_path.glob("*/app"))


def test_privacy_options_configure_nvflare_filters_and_the_server_checks(tmp_path):
    out = configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "private", JobOptions(exclude_vars="^head\\.", percentile_privacy=20, norm_statistics="local"))
    client, server = _configs(out)
    filters = client["task_result_filters"][0]
    assert filters["tasks"] == ["train"] and len(client["task_result_filters"]) == 1  # NVFlare takes one chain per task
    assert [f["path"].rsplit(".", 1)[1] for f in filters["filters"]] == ["ExcludeVars", "PercentilePrivacy", "WireBytes"]  # measured as it leaves
    assert filters["filters"][1]["args"] == {"percentile": 20, "gamma": 0.01, "data_kinds": ["WEIGHT_DIFF"]}
    learner = bundle_args(client)[0]
    assert learner["send_weight_diff"] is True and learner["norm_statistics"] == "local"
    assert next(c for c in server["components"] if c["id"] == "update_validator")["args"]["excluded_vars"] == "^head\\."
    assert next(c for c in server["components"] if c["id"] == "persistor")["args"]["norm_statistics"] == "local"
    lora = configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "lora", JobOptions(percentile_privacy=10))  # changes become weights at the server
    assert bundle_args(_configs(lora)[0])[0]["send_weight_diff"] is True


def _train_chain(config: dict, kind: str) -> list[str]:
    chain = next(c for c in config.get(kind, []) if "train" in c["tasks"])
    return [f["path"].rsplit(".", 1)[1] + "".join(f":{v}" for v in f["args"].values() if isinstance(v, (str, bool))) for f in chain["filters"]]


def test_compression_wraps_the_wire_both_ways_and_sends_changes(tmp_path):
    out = configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "nf4", JobOptions(compress="nf4", exclude_vars="^x"))
    client, server = _configs(out)
    # Site: measure what arrived, then decompress; privacy, then compress, then measure what leaves.
    assert _train_chain(client, "task_data_filters") == ["WireBytes:down", "DecompressWeights"]
    assert _train_chain(client, "task_result_filters") == ["ExcludeVars:^x", "CompressWeights:nf4", "WireBytes:up"]
    # Server: compress what it sends; decompress (marking bad payloads for the validator) before checks and aggregation.
    assert _train_chain(server, "task_data_filters") == ["CompressWeights:nf4"]
    assert _train_chain(server, "task_result_filters") == ["DecompressWeights:True"]
    assert bundle_args(client)[0]["send_weight_diff"] is True
    assert json.loads((out / "meta.json").read_text())["fedfms_job_options"] == {"compress": "nf4", "exclude_vars": "^x"}
    weights = configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "fp16", JobOptions(compress="fp16", compress_full_weights=True))
    assert "send_weight_diff" not in bundle_args(_configs(weights)[0])[0]


@pytest.mark.parametrize("options, message", [
    ({"compress": "int8"}, "unknown --compress mode 'int8'; choose from fp16, bf16, blockwise8, nf4, fp4"),
    ({"compress_full_weights": True}, "--compress-full-weights applies to a compressed exchange; add --compress MODE"),
    ({"compress": "nf4", "compress_full_weights": True, "percentile_privacy": 10}, "percentile privacy shares only weight changes; --compress-full-weights"),
])
def test_compression_options_that_cannot_apply_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "job", JobOptions(**options))
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("job", sorted(p.parent.name for p in (REPO / "jobs").glob("*/meta.json")))
def test_every_shipped_job_checks_updates_and_bounds_its_tasks(job):
    client, server = _configs(REPO / "jobs" / job)
    meta = json.loads((REPO / "jobs" / job / "meta.json").read_text())
    fedavg = next(w["args"] for w in server["workflows"] if w["path"].endswith("ResumableFedAvg"))
    assert fedavg["min_clients"] == meta["min_clients"] and fedavg["task_timeout"] > 0
    assert all(w["args"]["task_timeout"] > 0 for w in server["workflows"] if "task_timeout" in w["args"] or w["path"].endswith("FinalEvaluation"))
    ids = {c["id"]: c["path"] for c in server["components"]}
    assert ids["update_validator"] == "fedfms.fl.checks.updates.UpdateValidator" and ids["contributions"] == "fedfms.fl.widgets.recorder.ContributionRecorder"
    assert ids["run_presence"] == "fedfms.fl.checks.liveness.RunPresence"  # answers the sites' checks that the run goes on
    waits = [w["args"]["wait_time_after_min_received"] for w in server["workflows"] if w["path"].endswith(("ResumableFedAvg", "FinalEvaluation"))]
    assert waits == [60, 60]  # a silent site costs a minute per round, not the task timeout
    assert client["executors"][0]["executor"]["path"] == "fedfms.fl.executors.reporting.ReportingLearnerExecutor"
    wire = "fedfms.fl.filters.wire.WireBytes"  # the payload measured as it arrives and as it leaves
    assert client["task_data_filters"] == [{"tasks": ["train"], "filters": [{"path": wire, "args": {"direction": "down"}}]}]
    assert client["task_result_filters"] == [{"tasks": ["train"], "filters": [{"path": wire, "args": {"direction": "up"}}]}]


def _dotted_paths(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["path"]] if isinstance(node.get("path"), str) else []
        return own + [p for value in node.values() for p in _dotted_paths(value)]
    return [p for value in node for p in _dotted_paths(value)] if isinstance(node, list) else []


@pytest.mark.parametrize("job", sorted(p.parent.name for p in (REPO / "jobs").glob("*/meta.json")))
def test_every_class_a_shipped_job_names_exists(job):
    for config in _configs(REPO / "jobs" / job):
        for path in _dotted_paths(config):
            module, _, name = path.rpartition(".")
            assert callable(getattr(importlib.import_module(module), name)), path


def test_robustness_options_set_the_bounds_clipping_and_aggregation(tmp_path):
    options = JobOptions(wait_after_min_received=15, max_abs_value=100.0, max_change_norm=5.0, max_change_ratio=4.0, clip_norm=2.0, aggregation="median")
    _, server = _configs(configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "robust", options))
    fedavg = server["workflows"][0]["args"]
    assert fedavg["aggregator"] == {"path": "fedfms.fl.aggregators.robust.RobustAggregator", "args": {"combine": "median"}} and fedavg["clip_change_norm"] == 2.0
    assert [w["args"]["wait_time_after_min_received"] for w in server["workflows"]] == [15, 15]
    validator = next(c for c in server["components"] if c["id"] == "update_validator")["args"]
    assert (validator["max_abs_value"], validator["max_change_norm"], validator["max_change_ratio"]) == (100.0, 5.0, 4.0)
    _, lora = _configs(configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "lora", JobOptions(aggregation="trimmed_mean", trim_fraction=0.3)))
    aggregator = lora["workflows"][0]["args"]["aggregator"]  # the rule applies to the LoRA products
    assert aggregator["path"].endswith("LoRASVDAggregator") and aggregator["args"] == {"combine": "trimmed_mean", "trim_fraction": 0.3}
    _, paper = _configs(configure_job(REPO / "jobs/fedunet_prostate", tmp_path / "paper", JobOptions(profile="paper")))
    assert [w["args"]["wait_time_after_min_received"] for w in paper["workflows"]] == [3600, 3600]
    for bad, message in (({"aggregation": "mode"}, "unknown aggregation"), ({"clip_norm": 0}, "clip_norm must be positive"),
                         ({"max_change_ratio": 0.5}, "at least 1"), ({"wait_after_min_received": -1}, ">= 0")):
        with pytest.raises(ValueError, match=message):
            JobOptions(**bad)


def test_evaluate_only_site_given_when_the_data_is_elsewhere(tmp_path):
    out = configure_job(REPO / "jobs/fedmsa_prostate_loso", tmp_path / "loso", JobOptions(evaluate_only=["BMC"]))
    assert [w["args"]["evaluate_only_sites"] for w in _configs(out)[1]["workflows"]] == [["BMC"], ["BMC"]]


def test_leave_one_site_out_job_refuses_a_partition_without_an_unseen_site(tmp_path):
    _data(tmp_path, "partitions/natural")
    options = JobOptions(dataset_dir=str(tmp_path / "data"), datalist_dir="partitions/natural")
    with pytest.raises(DataError, match=r"partitions/natural: not a leave-one-site-out partition \(no unseen.json\)"):
        configure_job(REPO / "jobs/fedmsa_prostate_loso", tmp_path / "loso", options)
    assert not (tmp_path / "loso").exists()


def test_evaluate_only_makes_any_job_leave_that_site_out_of_training(tmp_path):
    out = configure_job(REPO / "jobs/fedunet_prostate", tmp_path / "plain", JobOptions(evaluate_only=["HK"]))
    workflows = {w["id"]: w["args"] for w in _configs(out)[1]["workflows"]}
    assert workflows["fedavg"]["evaluate_only_sites"] == workflows["final_eval"]["evaluate_only_sites"] == ["HK"]


def test_seed_reaches_every_network_and_the_learners_round_seeds(tmp_path):
    out = configure_job(REPO / "jobs/fminit_prostate", tmp_path / "seeded", JobOptions(seed=3))
    client, server = _configs(out)
    learner, prestage = bundle_args(client)[0], _workflow_args(server, "fminit")
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    assert learner["seed"] == prestage["seed"] == persistor["seed"] == learner["overrides"]["seed"] == prestage["overrides"]["seed"] == 3


def test_job_command_says_how_to_simulate_and_submit_the_copy(tmp_path, capsys):
    assert main(["job", str(REPO / "jobs/fedmsa_prostate_loso"), "--out", str(tmp_path / "loso"), "--evaluate-only", "HK"]) == 0
    printed = capsys.readouterr().out
    assert f"fedfms simulate {tmp_path / 'loso'} -w WORKSPACE -c SITE,SITE,..." in printed
    assert f"nvflare job submit -j {tmp_path / 'loso'}" in printed


SAM_JOBS = ("fedsam_prostate", "fedmsa_prostate", "flapsam_prostate")  # the leave-one-site-out job builds fedmsa's


def _persistor_network(job: Path) -> torch.nn.Module:
    """The global model's network as the server's persistor builds it from the job copy."""
    _, server = _configs(job)
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    return bundle_network(**persistor["args"]["model"]["args"])


def _trainable_count_printed(capsys, *args: str) -> int:
    assert main(["params", *args]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("trainable parameters"))
    return int(line.split()[2].replace(",", ""))


@pytest.mark.parametrize("job", SAM_JOBS)
def test_sam_jobs_fine_tune_the_packaged_litemedsam_in_their_cpu_profile(job, tmp_path):
    """Every weight of the foundation model comes from the packaged checkpoint; -PT starts elsewhere."""
    bundle = bundle_args(_configs(REPO / "jobs" / job)[0])[0]["bundle_root"]
    assert cpu_demo_profile(REPO / bundle)["size"] == "lite" and cpu_demo_profile(REPO / bundle)["pretrained_checkpoint"] == "litemedsam"
    packaged = read_state_dict(packaged_checkpoint())
    network = _persistor_network(configure_job(REPO / "jobs" / job, tmp_path / "pretrained", JobOptions()))
    state = network.state_dict()
    base = [k for k in state if k.startswith(("image_encoder.", "prompt_encoder.")) and ".lora_" not in k and "_Adapter." not in k]
    assert base and set(base) <= set(packaged)  # no base key missing from the checkpoint ...
    assert all(torch.equal(state[k], packaged[k]) for k in base)  # ... and every one of them loaded
    scratch = _persistor_network(configure_job(REPO / "jobs" / job, tmp_path / "scratch", JobOptions(pretrained=False)))
    assert not any(torch.equal(scratch.state_dict()[k], packaged[k]) for k in base if packaged[k].numel() > 1 and packaged[k].std() > 0)


@pytest.mark.parametrize("strategy", ["pdec", "dec", "attn", "lora", "lora_dec", "full", "flap"])
def test_strategy_gives_the_job_the_trainable_set_and_counts_of_fedfms_params(strategy, tmp_path, capsys):
    out = configure_job(REPO / "jobs/flapsam_prostate", tmp_path / strategy, JobOptions(strategy=strategy))
    client, server = _configs(out)
    assert bundle_args(client)[0]["overrides"] == {"strategy": strategy}
    profile = cpu_demo_profile(REPO / "bundles/flapsam_prostate")
    network = _persistor_network(out)
    printed = _trainable_count_printed(capsys, "--model", "flapsam", "--strategy", strategy, "--size", profile["size"], "--image-size", str(profile["image_size"]))
    assert count_parameters(network).trainable == printed
    assert [n for n, p in network.named_parameters() if p.requires_grad] == trainable_names(network, strategy)
    fedavg = next(w["args"] for w in server["workflows"] if w["id"] == "fedavg")
    assert ("aggregator" in fedavg) == (strategy in ("flap", "lora", "lora_dec"))  # LoRA-SVD only where there is LoRA
    assert json.loads((out / "meta.json").read_text())["fedfms_job_options"] == {"strategy": strategy}


def test_size_image_size_and_no_pretrained_reach_learner_and_persistor(tmp_path):
    out = configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "pt", JobOptions(size="tiny", image_size=32, pretrained=False))
    client, server = _configs(out)
    expected = {"size": "tiny", "image_size": 32, "pretrained_checkpoint": "scratch"}
    assert bundle_args(client)[0]["overrides"] == expected
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    assert {k: persistor[k] for k in expected} == expected
    assert json.loads((out / "meta.json").read_text())["fedfms_job_options"] == {"size": "tiny", "image_size": 32, "pretrained": False}


def test_network_options_are_checked_before_the_job_is_written(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="unknown strategy 'lorax'"):
        JobOptions(strategy="lorax")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        JobOptions(size="huge")
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        JobOptions(image_size=100)
    with pytest.raises(ValueError, match="contradict"):
        JobOptions(pretrained=False, pretrained_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match="--strategy apply to SAM jobs; bundles/unet_prostate is not a SAM bundle"):
        configure_job(REPO / "jobs/fedunet_prostate", tmp_path / "x", JobOptions(strategy="pdec"))
    assert not (tmp_path / "x").exists()


def test_paper_profile_minus_pt_needs_no_checkpoint(tmp_path):
    out = configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / "paper_pt", JobOptions(profile="paper", pretrained=False))
    client, _ = _configs(out)
    learner = bundle_args(client)[0]
    assert learner["config_files"] == ["train.json"] and learner["overrides"] == {"pretrained_checkpoint": "scratch"}


def test_override_sets_any_bundle_key_for_every_network_and_learner(tmp_path, capsys):
    out = tmp_path / "overridden"
    assert main(["job", str(REPO / "jobs/fedunet_prostate"), "--out", str(out), "--override", "learning_rate=0.0002", "--override", "train#samples_per_epoch=16"]) == 0
    client, server = _configs(out)
    expected = {"learning_rate": 0.0002, "train#samples_per_epoch": 16}
    assert bundle_args(client)[0]["overrides"] == expected
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    assert {k: persistor[k] for k in expected} == expected
    with pytest.raises(SystemExit):
        main(["job", str(REPO / "jobs/fedunet_prostate"), "--out", str(tmp_path / "bad"), "--override", "learning_rate"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_lora_and_svd_ranks_reach_every_network_and_the_aggregator(tmp_path):
    """FLAP-SAM's two ranks (Table 2): r of every LoRA layer at the sites and the server, and the SVD's on the server."""
    out = configure_job(REPO / "jobs/flapsam_prostate", tmp_path / "r8", JobOptions(lora_rank=8, svd_rank=4, size="tiny", pretrained=False))
    client, server = _configs(out)
    assert bundle_args(client)[0]["overrides"]["network_def#lora_rank"] == 8
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]["model"]["args"]
    assert persistor["network_def#lora_rank"] == 8
    fedavg = next(w["args"] for w in server["workflows"] if w["path"].endswith("ResumableFedAvg"))
    assert fedavg["aggregator"]["args"]["rank"] == 4
    network = bundle_network(**persistor)
    lora = {k: tuple(v.shape) for k, v in network.state_dict().items() if "lora_a" in k.lower() or "lora_b" in k.lower()}
    assert lora and all(8 in shape for shape in lora.values())  # every LoRA factor has r = 8 on one side
    assert json.loads((out / "meta.json").read_text())["fedfms_job_options"]["lora_rank"] == 8


@pytest.mark.parametrize("job, options, error", [
    ("fedmsa_prostate", {"lora_rank": 8}, "--lora-rank applies to the LoRA strategies"),
    ("fedmsa_prostate", {"svd_rank": 4}, "--svd-rank applies to a job with LoRA-SVD aggregation"),
    ("flapsam_prostate", {"strategy": "dec", "svd_rank": 4}, "--svd-rank applies to a job with LoRA-SVD aggregation"),
    ("flapsam_prostate", {"lora_rank": 4, "svd_rank": 8}, "svd_rank 8 exceeds lora_rank 4"),
    ("flapsam_prostate", {"lora_rank": 0}, "lora_rank must be >= 1"),
])
def test_rank_options_are_refused_where_they_cannot_apply(job, options, error, tmp_path):
    with pytest.raises(ValueError, match=error):
        configure_job(REPO / "jobs" / job, tmp_path / "x", JobOptions(**options))
    assert not (tmp_path / "x").exists()


def test_rank_flags_of_the_job_command(tmp_path):
    assert main(["job", "flapsam_prostate", "--out", str(tmp_path / "r16"), "--lora-rank", "16", "--svd-rank", "8"]) == 0
    assert json.loads((tmp_path / "r16/meta.json").read_text())["fedfms_job_options"] == {"lora_rank": 16, "svd_rank": 8}


def _fedavg_workflow(server: dict) -> dict:
    return next(w for w in server["workflows"] if w["id"] == "fedavg")


def test_algorithms_set_the_server_workflow_and_what_the_sites_add(tmp_path):
    def job(name: str, **options) -> tuple[dict, dict, dict]:
        client, server = _configs(configure_job(REPO / "jobs/fedmsa_prostate", tmp_path / name, JobOptions(**options)))
        return bundle_args(client)[0], _fedavg_workflow(server), json.loads((tmp_path / name / "meta.json").read_text())["fedfms_job_options"]

    learner, workflow, recorded = job("prox", algorithm="fedprox", fedprox_mu=0.5, patience=3)
    assert workflow["path"].endswith("ResumableFedAvg") and workflow["args"]["fedprox_mu"] == 0.5 and workflow["args"]["patience"] == 3
    assert recorded == {"algorithm": "fedprox", "fedprox_mu": 0.5, "patience": 3}
    learner, workflow, _ = job("opt", algorithm="fedopt", server_optimizer="yogi", server_lr=0.03, server_momentum=0.5)
    assert workflow["path"] == "fedfms.fl.workflows.fedopt.ResumableFedOpt" and learner["send_weight_diff"] is True
    assert workflow["args"]["optimizer"] == "fedfms.fl.workflows.fedopt.Yogi"
    assert workflow["args"]["optimizer_args"] == {"lr": 0.03, "betas": [0.5, 0.99], "eps": 1e-3}
    _, workflow, _ = job("avgm", algorithm="fedopt")  # default: FedAvgM
    assert (workflow["args"]["optimizer"], workflow["args"]["optimizer_args"]) == ("torch.optim.SGD", {"lr": 1.0, "momentum": 0.9})
    learner, workflow, _ = job("scaffold", algorithm="scaffold")
    assert workflow["path"] == "fedfms.fl.workflows.scaffold.ResumableScaffold" and "send_weight_diff" not in learner
    learner, workflow, _ = job("ditto", algorithm="ditto")
    assert learner["ditto_lambda"] == 0.1 and workflow["path"].endswith("ResumableFedAvg")
    # FLAP-SAM's LoRA-SVD aggregation serves the algorithms that keep its weighted mean of products.
    for algorithm in ("fedprox", "ditto"):
        configure_job(REPO / "jobs/flapsam_prostate", tmp_path / f"flap_{algorithm}", JobOptions(algorithm=algorithm))


@pytest.mark.parametrize("job, options, message", [
    ("fedmsa_prostate", {"algorithm": "fedsgd"}, "unknown --algorithm 'fedsgd'; choose from fedavg, fedprox, fedopt, scaffold, ditto"),
    ("fedmsa_prostate", {"algorithm": "fedprox", "fedprox_mu": -0.1}, "--fedprox-mu must be a finite number >= 0, got -0.1"),
    ("fedmsa_prostate", {"fedprox_mu": 0.1}, "--fedprox-mu applies to --algorithm fedprox; this job's algorithm is fedavg"),
    ("fedmsa_prostate", {"algorithm": "fedopt", "server_optimizer": "rmsprop"}, "unknown --server-optimizer 'rmsprop'; choose from sgd, adam, yogi"),
    ("fedmsa_prostate", {"algorithm": "fedopt", "server_lr": 0}, "--server-lr must be positive, got 0"),
    ("fedmsa_prostate", {"algorithm": "fedopt", "server_momentum": 1.0}, "--server-momentum must be in [0, 1), got 1.0"),
    ("fedmsa_prostate", {"algorithm": "fedprox", "server_lr": 0.1}, "--server-lr applies to --algorithm fedopt; this job's algorithm is fedprox"),
    ("fedmsa_prostate", {"algorithm": "ditto", "ditto_lambda": float("nan")}, "--ditto-lambda must be a finite number >= 0, got nan"),
    ("fedmsa_prostate", {"patience": 0}, "--patience must be >= 1 round, got 0"),
    ("flapsam_prostate", {"algorithm": "scaffold"}, "--algorithm scaffold cannot serve this job's LoRA strategy: its LoRA-SVD aggregation"),
    ("flapsam_prostate", {"algorithm": "fedopt"}, "--algorithm fedopt cannot serve this job's LoRA strategy"),
    ("fedmsa_prostate", {"algorithm": "scaffold", "percentile_privacy": 10}, "--algorithm scaffold sends control changes beside the weights"),
    ("fedmsa_prostate", {"algorithm": "scaffold", "aggregation": "median"}, "--aggregation median would average the weights another way"),
])
def test_algorithm_settings_that_cannot_apply_are_refused_naming_the_option(job, options, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        configure_job(REPO / "jobs" / job, tmp_path / "job", JobOptions(**options))
    assert not (tmp_path / "job").exists()


def test_algorithm_flags_of_the_job_command(tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["job", "fedmsa_prostate", "--out", str(out), "--algorithm", "fedopt", "--server-optimizer", "adam", "--server-lr", "0.01",
                 "--server-momentum", "0.8", "--patience", "2"]) == 0
    workflow = _fedavg_workflow(_configs(out)[1])
    assert workflow["args"]["optimizer"] == "torch.optim.Adam" and workflow["args"]["patience"] == 2
    assert main(["job", "fedmsa_prostate", "--out", str(tmp_path / "bad"), "--algorithm", "fedprox", "--fedprox-mu", "-1"]) == 2
    assert "--fedprox-mu must be a finite number >= 0" in capsys.readouterr().err
