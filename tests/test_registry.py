"""The champion alias when evaluates race on one tracking server (flows.registry._settle_champion), and
when there is no race to settle (flows.registry.registry_shared)."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow.exceptions import MlflowException

from flows import registry


class FakeRegistry:
    """The few MlflowClient calls the champion logic makes, on in-memory versions."""

    def __init__(self, accs: dict[int, float], champion: int | None):
        self.versions = {v: SimpleNamespace(version=str(v), tags={"test_acc": str(a)}) for v, a in accs.items()}
        self.champion = champion

    def get_model_version_by_alias(self, name, alias):
        if self.champion is None:
            raise MlflowException("no alias")
        return self.versions[self.champion]

    def search_model_versions(self, filter_string):
        return list(self.versions.values())

    def set_registered_model_alias(self, name, alias, version):
        self.champion = int(version)


def test_the_worse_evaluate_moving_the_alias_last_is_corrected():
    """Both read "no champion"; v1 (0.9) set the alias, then v2 (0.2) did: v2's own check gives it back."""
    reg = FakeRegistry({1: 0.9, 2: 0.2}, champion=2)
    registry._settle_champion(reg, "m", since=None, checks=1, wait_s=0)
    assert reg.champion == 1


def test_a_better_newer_champion_and_older_versions_are_left_alone():
    reg = FakeRegistry({1: 0.95, 2: 0.5, 3: 0.7, 4: 0.8}, champion=4)  # 1: a champion a user moved away from
    registry._settle_champion(reg, "m", since="2", checks=1, wait_s=0)
    assert reg.champion == 4
    reg = FakeRegistry({1: 0.5, 2: 0.8, 3: 0.8}, champion=3)  # a tie never moves the alias
    registry._settle_champion(reg, "m", since="1", checks=1, wait_s=0)
    assert reg.champion == 3


def test_only_a_registry_others_can_write_is_settled(tmp_path):
    """A SQLite store inside the project is written under the project lock: nothing to settle. A
    tracking server or a SQLite file elsewhere may have another project's evaluate racing this one."""
    project = tmp_path / "project"
    (project / "mlruns").mkdir(parents=True)
    assert not registry.registry_shared(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}", root=project)
    assert registry.registry_shared(f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}", root=project)
    assert registry.registry_shared(f"sqlite:///{project / '..' / 'mlflow.db'}", root=project)
    assert registry.registry_shared("http://127.0.0.1:5000", root=project)
    assert registry.registry_shared("postgresql://db/mlflow", root=project)
