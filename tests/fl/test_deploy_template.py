"""`fedfms deploy-template`: the shipped project file (verbatim or renamed) and the FLARE API submit script."""

import pytest
import yaml

from fedfms.cli import main
from fedfms.fl.deploy_template import project_text
from fedfms.paths import deploy_file


def test_template_is_written_verbatim_and_never_over_an_existing_file(tmp_path, capsys):
    assert main(["deploy-template", "--out", str(tmp_path)]) == 0
    for name in ("project.yml", "submit_job.py"):
        assert (tmp_path / name).read_bytes() == deploy_file(name).read_bytes()
    assert f"nvflare provision -p {tmp_path / 'project.yml'}" in capsys.readouterr().out
    (tmp_path / "project.yml").write_text("mine")
    assert main(["deploy-template", "--out", str(tmp_path)]) == 2
    assert "project.yml: already exists" in capsys.readouterr().err and (tmp_path / "project.yml").read_text() == "mine"


def test_server_and_hospitals_are_renamed_with_an_org_and_a_lead_each():
    text = project_text(server="fl.example.org", sites=["UCL", "I2CVB"])
    assert text.startswith("# NVIDIA FLARE 2.9 provisioning project for fedfms")  # the guidance survives
    participants = yaml.safe_load(text)["participants"]
    assert [(p["name"], p["type"]) for p in participants] == [
        ("fl.example.org", "server"), ("admin@fedfms.org", "admin"), ("UCL", "client"), ("lead@ucl.example.org", "admin"),
        ("I2CVB", "client"), ("lead@i2cvb.example.org", "admin"),
    ]
    assert {p["org"] for p in participants if p["name"] in ("UCL", "lead@ucl.example.org")} == {"ucl"}


@pytest.mark.parametrize("server, sites, error", [
    ("not a host", None, "--server: 'not a host' is not a valid NVFlare server name"),
    (None, ["RUNMC", "RUNMC"], "names a site twice"),
    (None, ["RUN MC"], "--sites: 'RUN MC' is not a valid NVFlare client name"),
])
def test_bad_names_are_refused_before_anything_is_written(server, sites, error):
    with pytest.raises(ValueError, match=error):
        project_text(server=server, sites=sites)
