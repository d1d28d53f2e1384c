import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from fedfms.cli import main
from fedfms.data.partition import PROXY, UNSEEN, PartitionOptions, allocate, load_prepared_cases, partition, unseen_site
from fedfms.data.prepare import PrepareOptions, prepare
from fedfms.data.synthetic import synthesize_prostate

SPLITS = ("training", "validation", "testing")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Three synthetic sites with eight cases each, prepared at a tiny size."""
    root = tmp_path_factory.mktemp("partition")
    synthesize_prostate(root / "raw", sites=3, cases_per_site=8, seed=2, shape=(24, 24, 10))
    prepare(root / "raw", root / "data", PrepareOptions(image_size=8, label_size=8), log=lambda _: None)
    return root / "data"


def _owners_of_cases(out: Path) -> dict[tuple[str, str], set[str]]:
    """Which datalist files hold each case, read back from the written files."""
    held: dict[tuple[str, str], set[str]] = {}
    for path in out.glob("*.json"):
        if path.name == "partition.json":
            continue
        for split in SPLITS:
            for entry in json.loads(path.read_text())[split]:
                held.setdefault((entry["site"], entry["case"]), set()).add(path.stem)
    return held


def _assert_disjoint_and_complete(prepared: Path, out: Path) -> dict[tuple[str, str], str]:
    held = _owners_of_cases(out)
    all_cases = {c.key for c in load_prepared_cases(prepared)}
    assert set(held) == all_cases
    assert all(len(owners) == 1 for owners in held.values())
    return {key: next(iter(owners)) for key, owners in held.items()}


def test_natural_sites_with_proxy(prepared, tmp_path):
    result = partition(prepared, tmp_path, PartitionOptions(method="natural", proxy_fraction=0.2))
    owners = _assert_disjoint_and_complete(prepared, tmp_path)
    assert sorted(set(owners.values())) == sorted(["BMC", "I2CVB", "RUNMC", PROXY])
    assert all(owner in (site, PROXY) for (site, _), owner in owners.items())
    proxy = json.loads((tmp_path / f"{PROXY}.json").read_text())
    assert proxy["validation"] == [] and proxy["testing"] == [] and proxy["training"]
    assert result.counts[PROXY]["cases"]["training"] == 3  # 20% of 5 training cases per site, one each
    entries = load_decathlon_datalist(tmp_path / "RUNMC.json", data_list_key="training")
    assert all(Path(e["image"]).is_file() and Path(e["label"]).is_file() for e in entries)


def test_leave_one_site_out(prepared, tmp_path):
    partition(prepared, tmp_path, PartitionOptions(method="loso", unseen_site="BMC"))
    owners = _assert_disjoint_and_complete(prepared, tmp_path)
    assert {owner for (site, _), owner in owners.items() if site == "BMC"} == {UNSEEN}
    unseen = json.loads((tmp_path / f"{UNSEEN}.json").read_text())
    assert unseen["training"] == [] and unseen["validation"] == [] and len({e["case"] for e in unseen["testing"]}) == 8
    assert not (tmp_path / "BMC.json").exists()
    assert json.loads((tmp_path / "partition.json").read_text())["clients"] == ["I2CVB", "RUNMC"]
    assert unseen_site(tmp_path) == "BMC"


def test_a_partition_without_an_unseen_site_has_none(prepared, tmp_path):
    partition(prepared, tmp_path, PartitionOptions(method="natural"))
    assert unseen_site(tmp_path) is None


def test_quantity_skew_gives_unequal_clients(prepared, tmp_path):
    result = partition(prepared, tmp_path, PartitionOptions(method="quantity", num_clients=3, alpha=0.5, seed=1))
    _assert_disjoint_and_complete(prepared, tmp_path)
    training = [result.counts[f"site-{i}"]["cases"]["training"] for i in (1, 2, 3)]
    assert min(training) >= 1 and max(training) > min(training)


def test_attribute_skew_orders_clients(prepared, tmp_path):
    partition(prepared, tmp_path, PartitionOptions(method="attribute", num_clients=3, proxy_fraction=0))
    owners = _assert_disjoint_and_complete(prepared, tmp_path)
    volume = {c.key: c.attributes["gland_volume_ml"] for c in load_prepared_cases(prepared)}
    split = {c.key: c.split for c in load_prepared_cases(prepared)}
    for s in SPLITS:
        ranges = [[volume[k] for k, o in owners.items() if o == f"site-{i}" and split[k] == s] for i in (1, 2, 3)]
        assert max(ranges[0]) <= min(ranges[1]) and max(ranges[1]) <= min(ranges[2])


def test_attribute_from_csv(prepared, tmp_path):
    table = tmp_path / "clinical.csv"
    cases = load_prepared_cases(prepared)
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["site", "case", "age"])
        writer.writerows([c.site, c.case, 50 + i] for i, c in enumerate(cases))
    out = tmp_path / "out"
    partition(prepared, out, PartitionOptions(method="attribute", attribute="age", attributes_csv=str(table), num_clients=2))
    _assert_disjoint_and_complete(prepared, out)
    with pytest.raises(ValueError, match="attribute 'weight' is missing"):
        partition(prepared, out, PartitionOptions(method="attribute", attribute="weight", num_clients=2))


def _site_purity(prepared, out) -> float:
    owners = _assert_disjoint_and_complete(prepared, out)
    clients = [o for o in set(owners.values()) if o.startswith("site-")]
    purity = [max(Counter(s for (s, _), o in owners.items() if o == c).values()) / sum(1 for o in owners.values() if o == c) for c in clients]
    return sum(purity) / len(purity)


def test_dirichlet_skew_follows_alpha(prepared, tmp_path):
    skewed = [_site_purity(prepared, _run(prepared, tmp_path / f"a{seed}", 0.05, seed)) for seed in range(5)]
    mixed = [_site_purity(prepared, _run(prepared, tmp_path / f"b{seed}", 100.0, seed)) for seed in range(5)]
    assert sum(skewed) / 5 > sum(mixed) / 5 + 0.2


def _run(prepared, out, alpha, seed):
    result = partition(prepared, out, PartitionOptions(method="dirichlet", num_clients=3, alpha=alpha, seed=seed))
    assert all(result.counts[f"site-{i}"]["cases"]["training"] >= 1 for i in (1, 2, 3))
    return out


def test_same_seed_same_partition_and_stale_files_removed(prepared, tmp_path):
    first = partition(prepared, tmp_path, PartitionOptions(method="quantity", num_clients=4, seed=7))
    assert partition(prepared, tmp_path, PartitionOptions(method="quantity", num_clients=4, seed=7)).owners == first.owners
    partition(prepared, tmp_path, PartitionOptions(method="quantity", num_clients=2, seed=7))
    assert not (tmp_path / "site-4.json").exists()
    _assert_disjoint_and_complete(prepared, tmp_path)


def test_allocate():
    assert allocate(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert allocate(7, [0.98, 0.01, 0.01], minimum=1) == [5, 1, 1]
    assert sum(allocate(13, [0.1, 0.6, 0.3])) == 13


def test_bad_arguments(prepared, tmp_path):
    with pytest.raises(ValueError, match="needs the unseen site"):
        PartitionOptions(method="loso")
    with pytest.raises(ValueError, match="unseen site 'XX' is not among"):
        partition(prepared, tmp_path, PartitionOptions(method="loso", unseen_site="XX"))
    with pytest.raises(ValueError, match="unknown partition method"):
        PartitionOptions(method="random")


def test_cli_prints_summary_table(prepared, tmp_path, capsys):
    assert main(["partition", "--data", str(prepared), "--method", "natural", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cases train/val/test" in out and "RUNMC" in out and PROXY in out
    assert main(["partition", "--data", str(tmp_path / "nothing")]) == 2
    assert "no prepared datalists found" in capsys.readouterr().err


def _ages_in_tables(raw: Path) -> dict[tuple[str, str], int]:
    ages = {}
    for table in raw.glob("*/clinical.csv"):
        with open(table, newline="") as f:
            ages.update({(table.parent.name, row["case"]): int(row["age"]) for row in csv.DictReader(f)})
    return ages


def test_age_skew_from_the_clinical_tables(prepared, tmp_path):
    """Synthetic ages travel clinical.csv -> prepare.json -> partition; client 1 gets the youngest patients."""
    cases = load_prepared_cases(prepared)
    age = {c.key: c.attributes["age"] for c in cases}
    assert age == _ages_in_tables(prepared.parent / "raw")
    result = partition(prepared, tmp_path, PartitionOptions(method="attribute", attribute="age", num_clients=3))
    owners = _assert_disjoint_and_complete(prepared, tmp_path)
    split = {c.key: c.split for c in cases}
    for s in SPLITS:
        ranges = [sorted(age[k] for k, o in owners.items() if o == f"site-{i}" and split[k] == s) for i in (1, 2, 3)]
        assert all(ranges), f"a client without {s} cases"
        # Contiguous age bands; equal ages may fall on both sides of a cut, never younger after older.
        assert ranges[0][-1] <= ranges[1][0] and ranges[1][-1] <= ranges[2][0]
        assert ranges[0][0] < ranges[2][-1]
    assert all(result.counts[f"site-{i}"]["cases"]["training"] >= 1 for i in (1, 2, 3))


def test_age_skew_from_the_command_line(prepared, tmp_path, capsys):
    argv = ["partition", "--data", str(prepared), "--method", "attribute", "--attribute", "age", "--clients", "3"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "site-3" in capsys.readouterr().out
    summary = json.loads((tmp_path / "partition.json").read_text())
    assert summary["options"]["attribute"] == "age" and summary["clients"] == ["site-1", "site-2", "site-3"]


def test_pooled_clients_take_the_hospitals_names(prepared, tmp_path, capsys):
    """`--client-names` names an age-skewed partition's clients as deployed sites are named; the same cases go to each."""
    argv = ["partition", "--data", str(prepared), "--method", "attribute", "--attribute", "age"]
    assert main([*argv, "--out", str(tmp_path / "numbered")]) == 0
    assert main([*argv, "--client-names", "RUNMC", "BMC", "HK", "--out", str(tmp_path / "named")]) == 0
    summary = json.loads((tmp_path / "named" / "partition.json").read_text())
    assert summary["clients"] == ["RUNMC", "BMC", "HK"] and summary["options"]["num_clients"] == 3
    for number, name in zip(("site-1", "site-2", "site-3"), ("RUNMC", "BMC", "HK")):
        numbered, named = (json.loads((tmp_path / kind / f"{client}.json").read_text()) for kind, client in (("numbered", number), ("named", name)))
        assert named.pop("name") == name and numbered.pop("name") == number and named == numbered
    assert (tmp_path / "named" / f"{PROXY}.json").is_file()


@pytest.mark.parametrize("names, method, error", [
    (("RUNMC", "RUNMC"), "quantity", "must be distinct"),
    (("RUNMC", PROXY), "quantity", "reserved"),
    (("RUNMC", "BMC"), "natural", "sites' own"),
])
def test_bad_client_names_are_refused(names, method, error):
    with pytest.raises(ValueError, match=error):
        PartitionOptions(method=method, client_names=names)
