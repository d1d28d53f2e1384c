"""NVFlare's privacy filters in a real simulator run: what leaves each site is recorded and checked."""

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind
from nvflare.apis.fl_constant import FLMetaKey

from fedfms.bundle import bundle_network
from tests.fl.conftest import APP, job_copy, simulate

pytestmark = pytest.mark.slow

EXCLUDED = r"^mask_decoder\.iou_prediction_head\."  # the IoU head: trainable under FedMSA, but kept at the sites
PERCENTILE, GAMMA = 50, 0.01


def test_excluded_tensors_never_leave_and_shared_changes_are_sparse_and_clipped(fl_data, tmp_path):
    job = job_copy("fedmsa_prostate", tmp_path, fl_data / "data", 2, exclude_vars=EXCLUDED, percentile_privacy=PERCENTILE, privacy_gamma=GAMMA)
    config = job / "app/config/config_fed_client.json"
    client = json.loads(config.read_text())
    recorder = {"path": "fedfms.fl.drills.OutgoingUpdateRecorder", "args": {"folder": str(tmp_path / "sent")}}
    client["task_result_filters"][0]["filters"].append(recorder)  # after the privacy filters: exactly what leaves
    config.write_text(json.dumps(client))
    log = simulate(job, tmp_path / "ws")

    initial = bundle_network("bundles/fedmsa_prostate", ["train.json", "cpu_demo.json"]).state_dict()
    excluded = {k for k in initial if k.startswith("mask_decoder.iou_prediction_head.")}
    assert excluded
    for sent in sorted((tmp_path / "sent").glob("*.pt")):
        update = torch.load(sent, weights_only=False)
        assert update["kind"] == DataKind.WEIGHT_DIFF and not excluded & set(update["data"])
        values = np.concatenate([np.asarray(v).ravel() for v in update["data"].values()])
        steps = update["meta"][FLMetaKey.NUM_STEPS_CURRENT_ROUND]
        assert np.mean(values == 0) >= PERCENTILE / 100 - 0.01  # the smaller half of the changes is not shared
        assert np.abs(values / steps).max() <= GAMMA + 1e-7  # and no shared change exceeds gamma per sample
    assert len(list((tmp_path / "sent").glob("*.pt"))) == 6
    rows = json.loads((tmp_path / "ws" / APP / "round_metrics.json").read_text())
    assert len(rows) == 6 and all(r["status"] == "accepted" for r in rows)
    saved = torch.load(tmp_path / "ws" / APP / "FL_global_model.pt", weights_only=False)["model"]
    assert all(torch.equal(torch.as_tensor(saved[k]), initial[k]) for k in excluded)  # the server never had them
    assert "PercentilePrivacy" in log or "cutoff" in log
