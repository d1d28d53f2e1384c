"""UnseenSiteEvaluator: which site is unseen, and a clear error for partitions that have none."""

import pytest

from fedfms.data.partition import PartitionOptions, partition
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.errors import DataError
from fedfms.fl.unseen import UnseenSiteEvaluator


@pytest.fixture(scope="module")
def prepared(synthetic_raw, tmp_path_factory):
    data = tmp_path_factory.mktemp("unseen") / "data"
    prepare(synthetic_raw, data, PrepareOptions(image_size=32, label_size=32), log=lambda _: None)
    partition(data, data / "partitions" / "natural", PartitionOptions(method="natural", proxy_fraction=0))
    partition(data, data / "partitions" / "loso", PartitionOptions(method="loso", unseen_site="BMC", proxy_fraction=0))
    return data


def _evaluator(data, datalist_dir):
    return UnseenSiteEvaluator("bundles/fedmsa_prostate", ["train.json", "cpu_demo.json"], str(data), datalist_dir)


def test_names_the_site_left_out(prepared):
    assert _evaluator(prepared, "partitions/loso").site_name() == "BMC"


def test_a_partition_without_an_unseen_site_is_a_clear_error(prepared, tmp_path):
    with pytest.raises(DataError, match=r"partitions/natural: no unseen.json: not a leave-one-site-out partition"):
        _evaluator(prepared, "partitions/natural").evaluate(tmp_path / "model.pt", tmp_path / "eval")
