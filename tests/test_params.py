"""params.yaml is loaded into typed models that reject typos, wrong types and bad values, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cvpipe.params import ParamsError, Params, apply_overrides, load_params, write_overrides
from tests.conftest import ROOT


def test_repository_params_load_and_are_the_seed_experiment():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.data.dataset == "cifar10"
    assert (p.train.backbone, p.train.weights, p.train.image_size) == ("resnet18", "imagenet", 224)
    assert (p.train.batch_size, p.train.lr, p.train.epochs) == (50, 1e-3, 5)
    assert p.train.hflip and p.train.vflip
    assert p.train.mean == (0.485, 0.456, 0.406) and p.train.std == (0.229, 0.224, 0.225)
    assert (p.detect.model, p.detect.input_size) == ("yolov3", 416)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        ({"train.lr": -0.1}, "train.lr", "greater than 0"),
        ({"train.epochs": -3}, "train.epochs", "greater than or equal to 1"),
        ({"train.batch_size": "fifty"}, "train.batch_size", "integer"),
        ({"data.dataset": "mnist"}, "data.dataset", "cifar10"),
        ({"preprocess.val_fraction": 1.5}, "preprocess.val_fraction", "less than 1"),
        ({"detect.input_size": 400}, "detect.input_size", "multiple of 32"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, overrides, key, words):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, overrides)))
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert re.search(rf"^\s*{re.escape(key)}:.*{words}", str(e.value), re.M), str(e.value)


def test_typo_key_in_file_is_rejected(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["learning_rate"] = 0.01
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"train\.learning_rate: unknown key"):
        load_params(path)


def test_typo_key_in_override_is_rejected():
    with pytest.raises(ParamsError, match=r"train\.learnig_rate: unknown key"):
        load_params(ROOT / "params.yaml", {"train.learnig_rate": 0.1})


def test_url_weights_need_a_sha256():
    with pytest.raises(ParamsError, match="weights_sha256"):
        load_params(ROOT / "params.yaml", {"train.weights": "https://example.org/w.pth"})


def test_write_overrides_keeps_comments_and_refuses_bad_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    write_overrides(path, {"train.epochs": 2, "data.dataset": "digits"})
    text = path.read_text()
    assert "# Every tunable and every path" in text
    p = load_params(path)
    assert (p.train.epochs, p.data.dataset) == (2, "digits")
    before = path.read_text()
    with pytest.raises(ParamsError):
        write_overrides(path, {"train.epochs": 0})
    assert path.read_text() == before


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParamsError, match=r"invalid YAML in .*line 1.*python/object") as err:
        load_params(path)
    assert "\n" not in str(err.value)


def test_dvc_yaml_refers_only_to_existing_params():
    """Every ${key} and every `params:` entry of dvc.yaml exists in params.yaml."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    dvc_text = (ROOT / "dvc.yaml").read_text()
    dvc = yaml.safe_load(dvc_text)

    def exists(dotted: str) -> bool:
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    code = "\n".join(line.split("#", 1)[0] for line in dvc_text.splitlines())
    refs = set(re.findall(r"\$\{([^}]+)\}", code)) - {"item"}
    assert refs, "dvc.yaml should take its paths from params.yaml"
    missing = [r for r in refs if not r.startswith("item.") and not exists(r)]
    assert not missing, f"dvc.yaml uses keys missing from params.yaml: {missing}"

    listed = []
    for stage in dvc["stages"].values():
        body = stage.get("do", stage)
        listed += [k for k in body.get("params", []) if isinstance(k, str)]
    assert listed
    missing = [k for k in listed if not exists(k)]
    assert not missing, f"dvc.yaml params missing from params.yaml: {missing}"
    assert set(dvc["stages"]) >= {"download", "preprocess"}
