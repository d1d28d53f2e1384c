"""Experiment files: the shipped ones load, and every mistake is an error naming the file and the key."""

from __future__ import annotations

import json

import pytest

from fedfms.experiment.config import ConfigError, find_config, load_config, shipped_configs
from tests.experiment.conftest import write_config

BASE = """
data: {data}
settings: [local, centralized, federated]
rounds: 2
epochs: 1
methods:
{methods}
"""


def config_text(methods: str = "  - {bundle: fedmsa_prostate}", data: str = "demo/data", **top) -> str:
    extra = "".join(f"{k}: {v}\n" for k, v in top.items())
    return extra + BASE.format(data=data, methods=methods)


def prepared_folder(tmp_path) -> str:
    """A data folder of its own: job options check that it exists, and CI has no demo data."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    return str(folder)


def test_shipped_configs_load():
    assert shipped_configs() == ["algorithms", "amp", "compression", "cpu", "flapsam", "fminit", "paper"]
    cpu = load_config("cpu")
    assert cpu.profile == "cpu_demo" and cpu.config_files == ("train.json", "cpu_demo.json") and cpu.device == "cpu"
    names = [m.name for m in cpu.methods]
    assert names == ["fedsam", "fedmsa", "fedsam_pt", "fedmsa_pt", "fedunet", "fednnunet", "flapsam_lora_dec", "flapsam"]
    assert [m.pretrained for m in cpu.methods[:4]] == [True, True, False, False]
    flapsam = load_config("flapsam")
    assert sorted(m.strategy for m in flapsam.methods) == sorted(["full", "attn", "dec", "pdec", "lora", "lora_dec", "flap"])
    assert all(m.model == "flapsam" and m.data.endswith("demo/data_stack5") for m in (*flapsam.methods, *cpu.methods[6:]))
    assert all(m.settings == ("local", "centralized", "federated") for m in flapsam.methods)
    fminit = load_config("fminit")
    assert fminit.rounds == 10 and {m.init_mode for m in fminit.methods} == {"random", "pretrain", "fm"}
    assert {m.partition for m in fminit.methods} == {"partitions/age", "partitions/quantity"}
    assert all(m.job.endswith("jobs/fminit_prostate") and m.settings == ("federated",) for m in fminit.methods)


def test_paper_config_requires_the_pretrained_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"paper\.yaml: pretrained_checkpoint: required by the paper profile for fedsam"):
        load_config("paper")
    checkpoint = tmp_path / "sam_vit_b.pth"
    paper = load_config("paper", {"pretrained_checkpoint": str(checkpoint)})
    assert paper.profile == "paper" and paper.config_files == ("train.json",) and paper.device == "cuda"
    assert paper.rounds == 100 and paper.epochs == 1 and paper.train_epochs == 100
    assert {m.pretrained_checkpoint for m in paper.methods if m.model in ("sam", "flapsam") and m.pretrained} == {str(checkpoint)}
    assert all(m.pretrained_checkpoint is None for m in paper.methods if not m.pretrained or m.model not in ("sam", "flapsam"))


def test_methods_inherit_the_experiment_values_and_get_default_names(tmp_path):
    methods = """  - {bundle: fedmsa_prostate, pretrained: false}
  - {bundle: flapsam_prostate, strategy: dec, data: other/data_stack5}
  - {bundle: flapsam_prostate}
  - {bundle: unet_prostate, settings: [federated]}"""
    config = load_config(write_config(tmp_path, config_text(methods, size="tiny", sites="[A, B]")))
    fedmsa, dec, flap, unet = config.methods
    assert [m.name for m in config.methods] == ["fedmsa_pt", "flapsam_dec", "flapsam", "unet"]
    assert config.name == "exp" and config.train_epochs == 2  # rounds x epochs
    assert fedmsa.size == "tiny" and not fedmsa.pretrained and fedmsa.strategy == "msa" and fedmsa.sites == ("A", "B")
    assert dec.strategy == "dec" and dec.data.endswith("other/data_stack5") and flap.strategy == "flap"
    assert unet.size is None and unet.pretrained and unet.settings == ("federated",) and unet.job.endswith("jobs/fedunet_prostate")
    assert fedmsa.data.startswith("/") and fedmsa.job.endswith("jobs/fedmsa_prostate")


def test_compression_is_a_method_dimension_of_its_federated_cells(tmp_path):
    from fedfms.experiment.cell import job_options
    from fedfms.experiment.cells import make_cell

    methods = """  - {bundle: flapsam_prostate, strategy: flap}
  - {bundle: flapsam_prostate, strategy: flap, compress: nf4}"""
    config = load_config(write_config(tmp_path, config_text(methods, data=prepared_folder(tmp_path))))
    plain, nf4 = config.methods
    assert (plain.name, plain.compress, nf4.name, nf4.compress) == ("flapsam", None, "flapsam_nf4", "nf4")
    assert make_cell(config, nf4, "local")["compress"] is None  # only a federated exchange is compressed
    cell = make_cell(config, nf4, "federated")
    assert cell["compress"] == "nf4" and job_options(cell, ["A", "B"], None).compress == "nf4"


def test_the_federated_algorithm_is_a_method_dimension_of_its_federated_cells(tmp_path):
    from fedfms.experiment.cell import job_options
    from fedfms.experiment.cells import make_cell

    methods = """  - {bundle: fedmsa_prostate}
  - {bundle: fedmsa_prostate, algorithm: fedopt, algorithm_options: {server_optimizer: adam, server_lr: 0.01}}
  - {bundle: flapsam_prostate, strategy: flap, algorithm: ditto}"""
    config = load_config(write_config(tmp_path, config_text(methods, data=prepared_folder(tmp_path))))
    plain, fedadam, ditto = config.methods
    assert (plain.name, fedadam.name, ditto.name) == ("fedmsa", "fedmsa_fedopt", "flapsam_ditto")
    assert make_cell(config, fedadam, "local")["algorithm"] is None  # only a federation has an algorithm
    options = job_options(make_cell(config, fedadam, "federated"), ["A", "B"], None)
    assert (options.algorithm, options.server_optimizer, options.server_lr) == ("fedopt", "adam", 0.01)
    assert job_options(make_cell(config, plain, "federated"), ["A", "B"], None).algorithm is None
    with pytest.raises(ConfigError, match=r"methods\[0\]\.algorithm_options: --fedprox-mu must be a finite number >= 0"):
        load_config(write_config(tmp_path, config_text("  - {bundle: fedmsa_prostate, algorithm: fedprox, algorithm_options: {fedprox_mu: -1}}")))
    with pytest.raises(ConfigError, match="algorithm: unknown value 'fedsgd'"):
        load_config(write_config(tmp_path, config_text("  - {bundle: fedmsa_prostate, algorithm: fedsgd}")))


def test_overrides_of_a_method_add_to_the_experiment_ones(tmp_path):
    methods = """  - {bundle: fedmsa_prostate, overrides: {learning_rate: 0.001}}
  - {bundle: unet_prostate, overrides: {train#samples_per_epoch: 4}}"""
    text = config_text(methods) + "overrides: {train#samples_per_epoch: 16, batch_size: 2}\n"
    fedmsa, unet = load_config(write_config(tmp_path, text)).methods
    assert dict(fedmsa.overrides) == {"train#samples_per_epoch": 16, "batch_size": 2, "learning_rate": 0.001}
    assert dict(unet.overrides) == {"train#samples_per_epoch": 4, "batch_size": 2}
    with pytest.raises(ConfigError, match="overrides: must be a mapping of bundle keys"):
        load_config(write_config(tmp_path, config_text() + "overrides: [1]\n"))


def test_a_missing_data_folder_is_not_a_config_error(tmp_path):
    config = load_config(write_config(tmp_path, config_text(data=str(tmp_path / "nowhere"))))
    assert config.methods[0].data == str(tmp_path / "nowhere")  # its cells fail, with the path in their reason


def test_json_files_and_command_line_overrides(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"data": "demo/data", "settings": ["federated"], "rounds": 3, "epochs": 2, "methods": [{"bundle": "unet_prostate"}]}))
    config = load_config(path, {"rounds": 5, "epochs": None})
    assert config.rounds == 5 and config.epochs == 2 and config.train_epochs == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (config_text("  - {bundle: fedmsa_prostate, stratgy: msa}"), r"methods\[0\]\.stratgy: unknown key; known keys: name, bundle, job, strategy"),
        (config_text(roundz=3), r"roundz: unknown key"),
        (BASE.format(data="demo/data", methods="  - {bundle: unet_prostate}").replace("rounds: 2\n", ""), r"rounds: required key missing"),
        (config_text(seed="zero"), r"seed: must be a whole number >= 0, got 'zero'"),
        (config_text("  - {bundle: fedmsa_prostate, strategy: adapters}"), r"methods\[0\]\.strategy: unknown value 'adapters'; choose from full, msa"),
        (config_text("  - {bundle: fedmsa_prostate, settings: [federal]}"), r"methods\[0\]\.settings: unknown setting\(s\) federal; choose from local, centralized, federated, loso"),
        (config_text("  - {bundle: unet_prostate, size: tiny}"), r"methods\[0\]\.size: applies to SAM methods \(sam, flapsam\); unet_prostate is a unet"),
        (config_text("  - {bundle: no_such_bundle}"), r"methods\[0\]\.bundle: no fedfms bundle \(configs/method.json\) at .*bundles/no_such_bundle"),
        (config_text("  - {bundle: fedmsa_prostate}\n  - {bundle: fedmsa_prostate}"), r"methods\[1\]\.name: 'fedmsa' is also the name of methods\[0\]"),
        (config_text("  - {bundle: fedmsa_prostate, init_mode: fm}"), r"methods\[0\]\.init_mode: needs a job with the FMInstructedInit pre-stage"),
        (config_text("  - {bundle: fedmsa_prostate, name: Fed-MSA}"), r"methods\[0\]\.name: must be lower-case letters"),
        (config_text("  - {bundle: fedmsa_prostate, image_size: 60}"), r"methods\[0\]\.image_size: must be a multiple of 16, got 60"),
        (config_text("  - {bundle: flapsam_prostate, compress: int3}"), r"methods\[0\]\.compress: unknown value 'int3'; choose from fp16, bf16, blockwise8, nf4, fp4"),
        (config_text("  []"), r"methods: must be a non-empty list"),
        ("- just\n- a list\n", r"must hold a mapping of keys"),
        ("data: [unclosed\n", r"is not valid YAML"),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert error.value.path == str(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"no experiment file here, and not a shipped experiment \(algorithms, amp, compression, cpu, flapsam, fminit, paper\)") as error:
        load_config(tmp_path / "missing.yaml")
    assert error.value.path == str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not a shipped experiment"):
        find_config("cpux")
