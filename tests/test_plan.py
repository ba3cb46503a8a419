"""The workflow's plan: computed from the config, cached by config and source, no torch on a hit."""

import json
import subprocess
import sys

import pytest

from klbench import plan as plan_module
from klbench.config import load_config
from klbench.errors import ConfigError
from klbench.plan import compute_plan, workflow_plan


@pytest.fixture
def smoke_config(repo):
    return load_config([repo / "config" / "config.yaml", repo / "config" / "smoke.yaml"])


def test_the_cached_plan_is_the_computed_plan_and_is_read_without_importing_torch(smoke_config, tmp_path):
    computed = json.loads(json.dumps(compute_plan(smoke_config)))
    assert workflow_plan(smoke_config, tmp_path) == computed
    (cache,) = tmp_path.glob("plan-*.json")
    script = ("import json, sys; from pathlib import Path; from klbench.plan import workflow_plan\n"
              f"plan = workflow_plan(json.loads(Path({str(tmp_path / 'config.json')!r}).read_text()), "
              f"Path({str(tmp_path)!r}))\n"
              "print(json.dumps({'torch': 'torch' in sys.modules, 'runs': len(plan['grid'])}))")
    (tmp_path / "config.json").write_text(json.dumps(smoke_config))
    result = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    assert result == {"torch": False, "runs": len(computed["grid"])}
    assert list(tmp_path.glob("plan-*.json")) == [cache]
    # every job's params are the resolved run configs of its seeds
    first = json.loads(next(iter(computed["specs"].values())))
    assert [run["seed"] for run in first] == computed["blocks"][0]


def test_a_changed_config_or_source_is_planned_anew(smoke_config, tmp_path, monkeypatch):
    workflow_plan(smoke_config, tmp_path)
    changed = {**smoke_config, "seeds": [0, 1, 2]}
    assert len(workflow_plan(changed, tmp_path)["grid"]) == len(workflow_plan(smoke_config, tmp_path)["grid"]) * 3 // 2
    monkeypatch.setattr(plan_module, "source_hash", lambda: "edited")
    workflow_plan(smoke_config, tmp_path)
    assert len(list(tmp_path.glob("plan-*.json"))) == 3


def test_a_bad_config_raises_and_is_not_cached(smoke_config, tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        workflow_plan({**smoke_config, "train": {"steps": -1}}, tmp_path)
    assert not list(tmp_path.glob("plan-*"))
