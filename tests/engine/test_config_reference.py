"""`fusedrl config`: every key with its default and docstring, as YAML that loads back to the defaults."""

import dataclasses

import yaml

from fusedrl.cli import main
from fusedrl.engine.config import Config, load_config, to_dict


def _leaf_keys(d, prefix=""):
    for k, v in d.items():
        yield from _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]


def test_reference_loads_back_to_the_defaults_and_documents_every_key(tmp_path, capsys):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "all.yaml").write_text(text)
    assert to_dict(load_config(tmp_path / "all.yaml")) == to_dict(Config())
    lines = text.splitlines()
    keys = list(_leaf_keys(yaml.safe_load(text)))
    assert len(keys) == len(list(_leaf_keys(dataclasses.asdict(Config())))) > 100
    # Every key line is preceded by its comment.
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#"):
            assert i > 0 and lines[i - 1].lstrip().startswith("# "), f"no docstring above {line.strip()!r}"


def test_help_points_to_the_reference(capsys):
    try:
        main(["--help"])
    except SystemExit:
        pass
    assert "fusedrl config" in capsys.readouterr().out
