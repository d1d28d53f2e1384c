"""The bundles through MONAI's own CLI and checks: train, evaluate, infer, verify."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out

from fedfms.bundle_files import verify_checks
from tests.bundles.conftest import BUNDLES, NAMES, run_bundle, train_losses


def _data_dir(tiny_data, bundle):
    return tiny_data / ("data_stack5" if bundle == "flapsam_prostate" else "data")


# The SAM bundles' CPU profile fine-tunes the packaged LiteMedSAM; FedMSA trains as shipped, the other two
# SAM bundles as the tiny configuration of the same classes, so the module stays within the suite's time.
TINY_SAM = {"fedsam_prostate": {"size": "tiny", "pretrained_checkpoint": "scratch"}, "flapsam_prostate": {"size": "tiny", "pretrained_checkpoint": "scratch"}}


@pytest.fixture(scope="module")
def trained(standalone, tiny_data, tmp_path_factory):
    """Each bundle's cpu_demo training, run once: {bundle: (completed process, output folder)}."""
    runs = {}
    for bundle in NAMES:
        out = tmp_path_factory.mktemp(bundle)
        result = run_bundle(
            standalone, bundle, "cpu_demo.json", cwd=out, dataset_dir=_data_dir(tiny_data, bundle), output_dir=out / "models",
            log_dir=out / "logs", max_epochs=4, batch_size=4, **TINY_SAM.get(bundle, {}),
        )
        runs[bundle] = (result, out)
    return runs


@pytest.mark.parametrize("bundle", NAMES)
@pytest.mark.slow
def test_cpu_demo_training_lowers_the_loss_and_keeps_checkpoints(trained, bundle):
    result, out = trained[bundle]
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    losses = train_losses(log)
    assert len(losses) == 4 * 5  # 4 epochs x 5 iterations (2 sites x 1 training case x 10 slices, batch 4)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert "val_mean_dice" in log
    assert (out / "models" / "model.pt").is_file() and (out / "models" / "model_last.pt").is_file()
    assert list((out / "logs").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("bundle", ["fedsam_prostate", "flapsam_prostate"])
@pytest.mark.slow
def test_evaluation_writes_site_tables(standalone, trained, tiny_data, bundle):
    _, out = trained[bundle]
    result = run_bundle(
        standalone, bundle, "cpu_demo.json", "evaluate.json", cwd=out, dataset_dir=_data_dir(tiny_data, bundle),
        output_dir=out / "models", eval_dir=out / "eval", **TINY_SAM.get(bundle, {}),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    sites = (out / "eval" / "per_site.csv").read_text().splitlines()
    assert sites[0].startswith("site,dice_2d,iou_2d,dice_3d") and {s.split(",")[0] for s in sites[1:]} >= {"RUNMC", "BMC", "average"}
    assert len((out / "eval" / "per_volume.csv").read_text().splitlines()) == 1 + 2  # one test volume per site
    assert json.dumps(summary)  # readable JSON with the same numbers


@pytest.mark.slow
def test_inference_keeps_the_input_geometry(standalone, trained, tiny_data, tmp_path):
    """BMC volumes are LPS-oriented: the prediction must come back in that affine and size."""
    _, out = trained["fedmsa_prostate"]
    result = run_bundle(
        standalone, "fedmsa_prostate", "cpu_demo.json", "inference.json", cwd=tmp_path, output_dir=out / "models",
        input_dir=tiny_data / "raw" / "BMC", prediction_dir=tmp_path / "pred",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for case in ("Case00", "Case01", "Case02"):
        source = nib.load(tiny_data / "raw" / "BMC" / f"{case}.nii.gz")
        prediction = nib.load(tmp_path / "pred" / f"{case}_seg.nii.gz")
        assert nib.aff2axcodes(source.affine) == ("L", "P", "S")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-4)
        assert set(np.unique(prediction.get_fdata())) <= {0.0, 1.0}


@pytest.mark.slow
def test_inference_rejects_a_2d_image(standalone, trained, tmp_path):
    _, out = trained["unet_prostate"]
    flat = tmp_path / "in" / "flat.nii.gz"
    flat.parent.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), flat)
    result = run_bundle(standalone, "unet_prostate", "cpu_demo.json", "inference.json", cwd=tmp_path, output_dir=out / "models", input_dir=flat.parent)
    assert result.returncode != 0 and f"{flat}: is 2D" in result.stderr


def test_local_baseline_uses_one_site(tiny_data, tmp_path):
    bundle = BUNDLES / "unet_prostate"
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / "train.json"), str(bundle / "configs" / "cpu_demo.json")],
        workflow_type="train", bundle_root=str(bundle), logging_file=False,
        dataset_dir=str(tiny_data / "data"), sites="RUNMC", **_outputs(tmp_path),
    )
    workflow.initialize()
    samples = workflow.parser.get_parsed_content("train#dataset#data")
    assert samples and {s["site"] for s in samples} == {"RUNMC"}


def _outputs(tmp_path) -> dict[str, str]:
    """Where a workflow built on the repository's bundles writes (its TensorBoard writers start at initialize)."""
    return {"output_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "eval"), "eval_dir": str(tmp_path / "eval")}


@pytest.mark.parametrize("bundle", NAMES)
@pytest.mark.parametrize("workflow,extra", [("train", ()), ("infer", ("evaluate.json",)), ("infer", ("inference.json",))])
def test_monai_properties_are_complete(tiny_data, tmp_path, bundle, workflow, extra):
    """check_properties instantiates the required components, so it runs on the CPU profile and tiny data."""
    configs = BUNDLES / bundle / "configs"
    files = [str(configs / (extra[0] if extra else "train.json")), str(configs / "cpu_demo.json")]  # each complete config alone
    wf = ConfigWorkflow(
        config_file=files, meta_file=str(configs / "metadata.json"), workflow_type=workflow, bundle_root=str(BUNDLES / bundle),
        logging_file=False, dataset_dir=str(_data_dir(tiny_data, bundle)), input_dir=str(tiny_data / "raw" / "RUNMC"), **_outputs(tmp_path),
    )
    wf.initialize()
    assert wf.check_properties() == []


PAPER_SIZE_SAM = ("fedsam_prostate", "fedmsa_prostate")  # ViT-B at 1024 px: seconds per forward pass on a CPU


def _checks():
    for bundle in NAMES:
        for profile, configs, overrides in verify_checks(BUNDLES / bundle):
            slow = bundle in PAPER_SIZE_SAM and profile != "cpu_demo"
            yield pytest.param(bundle, configs, overrides, id=f"{bundle}-{profile.split('/')[0]}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("bundle,configs,overrides", list(_checks()))
def test_declared_shapes_pass_monais_verify_net_in_out(bundle, configs, overrides):
    """The check each bundle's docs give, with MONAI's defaults (n = 1); it raises on a shape the network refuses."""
    root = BUNDLES / bundle
    verify_net_in_out("network_def", meta_file=str(root / "configs/metadata.json"), config_file=[str(root / c) for c in configs],
                      bundle_root=str(root), device="cpu", **overrides)


@pytest.mark.parametrize("bundle", [b for b in NAMES if b not in ("fedsam_prostate", "fedmsa_prostate", "flapsam_prostate")])
@pytest.mark.parametrize("profile", [["train.json"], ["train.json", "cpu_demo.json"]])
@pytest.mark.parametrize("n", [1, 2])
def test_declared_shapes_also_train(bundle, profile, n):
    """`k*n` shapes hold in training mode too (batch norm and deep supervision need more than one value per channel)."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / name) for name in profile])
    parser.read_meta(str(BUNDLES / bundle / "configs/metadata.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    shape = parser["_meta_#network_data_format#inputs#image#spatial_shape"]
    size = [int(s.split("*")[0]) * n for s in shape]
    network = parser.get_parsed_content("network_def").train()
    output = network(torch.rand(2, 1, *size))
    assert (output[0] if isinstance(output, (list, tuple)) else output).shape[-2:] == tuple(size)


@pytest.mark.slow
def test_documented_verify_command_runs_in_a_shell(standalone):
    """The README's cpu_demo check for a SAM bundle, pasted into bash in the bundle folder (the shape override included)."""
    readme = (standalone / "flapsam_prostate" / "docs" / "README.md").read_text()
    block = readme.split("# cpu_demo\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` is this environment's
    result = subprocess.run(["bash", "-c", block], cwd=standalone / "flapsam_prostate", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "verified with no error" in result.stdout + result.stderr, result.stderr[-2000:]


def test_pooling_a_partition_leaves_out_the_proxy_and_unseen_site(tmp_path):
    from fedfms.bundle import load_datalist
    from fedfms.io import save_json

    folder = tmp_path / "partitions" / "loso"
    entry = {"image": "x.npy", "label": "y.npy", "site": "A", "case": "c", "slice": 0}
    for name, site in (("A", "A"), ("B", "B"), ("server_proxy", "P"), ("unseen", "U")):
        save_json(folder / f"{name}.json", {"training": [{**entry, "site": site}], "validation": [], "testing": []})
    save_json(folder / "partition.json", {"files": []})
    for name in ("x.npy", "y.npy"):
        (folder / name).touch()  # listed files must exist
    pooled = load_datalist(tmp_path, "training", None, "partitions/loso")
    assert sorted(e["site"] for e in pooled) == ["A", "B"]
    assert [e["site"] for e in load_datalist(tmp_path, "training", "server_proxy", "partitions/loso")] == ["P"]


def test_samples_per_epoch_draws_that_many_training_samples_each_epoch(tiny_data, tmp_path):
    """``train#samples_per_epoch``: a random subset of the training split per epoch (all of it by default)."""
    from fedfms.bundle import bundle_workflow

    def loader(**overrides):
        wf = bundle_workflow(BUNDLES / "unet_prostate", ["train.json", "cpu_demo.json"], "train", dataset_dir=str(tiny_data / "data"), batch_size=2, **_outputs(tmp_path), **overrides)
        return wf.trainer.data_loader

    full, subset = loader(), loader(**{"train#samples_per_epoch": 3})
    assert len(full.dataset) == len(subset.dataset) == 20 and len(full) == 10
    assert len(subset) == 2 and len(list(subset.sampler)) == 3
    assert len(set(subset.sampler)) == 3  # without replacement
