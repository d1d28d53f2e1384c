"""Small prepared data for the deployment tests: the synthetic sites RUNMC, BMC and I2CVB at 64 px."""

from pathlib import Path

import pytest

from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate


@pytest.fixture(scope="session")
def deploy_data(tmp_path_factory) -> Path:
    """A prepared data folder with the natural partition: one datalist per site (``RUNMC.json``, ``BMC.json``, ...)."""
    root = tmp_path_factory.mktemp("deploy_data")
    synthesize_prostate(root / "raw", sites=3, cases_per_site=3, seed=5, shape=(32, 32, 8))
    prepare(root / "raw", root / "data", PrepareOptions(image_size=64, label_size=64), log=lambda _: None)
    partition(root / "data", root / "data" / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    return root / "data"
