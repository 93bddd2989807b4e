"""deploy/: the production stack's Compose file, Kubernetes manifests, Dockerfiles and scripts.

No Docker engine or cluster runs here, so the files are checked by validators from the dev
extra, none of which fetches anything:

- the Compose Specification's JSON Schema, as vendored in check-jsonschema
  (`--builtin-schema vendor.compose-spec`), on the file as written and as Compose would
  interpolate it with `.env.example`'s values;
- Kubernetes' OpenAPI schemas, strict (unknown fields rejected), as bundled in
  kubernetes-validate, for the oldest and newest Kubernetes versions it carries;
- yamllint (deploy/.yamllint.yaml), hadolint for both Dockerfiles, shellcheck for the shell
  scripts and for every `sh -c` / health-check command in the Compose file and the manifests;

and then the properties users rely on: health checks and the waits on them, ports on 127.0.0.1
only, named volumes, credentials only as ${VAR} references or Secret references, placeholders
only in `.env.example`, and every environment variable ATLAS reads for the stack set on the
worker, pointing at the servers the stack runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
SECRET_NAME = "atlas-secrets"
SCRIPTS = [
    DEPLOY / "postgres" / "init-databases.sh",
    DEPLOY / "minio" / "create-bucket.sh",
    DEPLOY / "mlflow" / "start.sh",
]
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "mlflow" / "Dockerfile"]
ONE_SHOT = {"minio-bucket"}
"""Compose services that run to completion: others wait for them with
`service_completed_successfully`."""
SETTINGS = {"MLFLOW_BUCKET"}
"""`.env.example` keys that are settings, not credentials."""
OPTIONAL = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
"""Credentials that may stay empty."""
MIN_LENGTH = {
    "MLFLOW_AUTH_ADMIN_PASSWORD": 12,  # MLflow refuses a shorter admin password
    "NEO4J_PASSWORD": 8,  # Neo4j's minimum
    "MINIO_ROOT_USER": 3,
    "MINIO_ROOT_PASSWORD": 8,  # MinIO's minimums
    "MLFLOW_S3_SECRET_KEY": 8,
}
SECRET_ENV_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|_KEY|_KEY_ID|_AUTH)$")
PLACEHOLDER = re.compile(r"change-me-[a-z0-9-]+")
COMPOSE_REF = r"\$\{[A-Z0-9_]+(?::?[-?][^}]*)?\}"
K8S_REF = r"\$\([A-Z0-9_]+\)"
SECRET_REMNANTS = {"", "neo4j/"}
"""What may be left of a secret-named variable's value once its references are taken out (the
Neo4j user's name in NEO4J_AUTH=neo4j/PASSWORD)."""

# The environment variables ATLAS reads to reach the stack. Each must be read somewhere in
# atlas/ (checked below, so this list cannot name one ATLAS does not read), and each must be
# set on the worker in both the Compose file and the manifests.
STACK_ENV = {
    "ATLAS_STATE_URL",  # runs_postgres.py: records, checkpoints, the run lock
    "ATLAS_STATE_DIR",  # runs.py: each run's own files
    "MLFLOW_TRACKING_URI",  # tracing/mlflow.py
    "MLFLOW_TRACKING_USERNAME",  # tracing/mlflow.py: basic auth
    "MLFLOW_TRACKING_PASSWORD",
    "ATLAS_TRACKING_PROBE_S",  # tracing/mlflow.py: how long the server check may take
    "NEO4J_USERNAME",  # memory/graph.py
    "NEO4J_PASSWORD",
    "ATLAS_CACHE_URL",  # models/cache.py: the model-response cache on Redis
}
STACK_ENV_PATTERN = re.compile(
    r"[\"'](ATLAS_STATE_URL|ATLAS_STATE_DIR|ATLAS_TRACKING_PROBE_S|ATLAS_CACHE_URL|"
    r"MLFLOW_TRACKING_[A-Z_]+|"
    r"NEO4J_[A-Z_]+)[\"']"
)
"""Finds the stack's variables ATLAS reads, so one added to atlas/ later is caught here."""
ALTERNATIVES = {"MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS"}
"""Read by ATLAS but not used by this stack: bearer-token auth instead of basic auth, and TLS
verification for a server with a self-signed certificate."""
CACHE_ENV = "ATLAS_CACHE_URL"
"""The Redis model-response cache's URL."""


# --- helpers -------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A validator's executable from the venv (the dev extra), else from PATH."""
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    which = shutil.which(name)
    if which is None:
        pytest.fail(f"{name} is not installed: scripts/install installs the dev extra")
    return which


def run(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f".env.example:{number}: {line!r}"
        assert key not in values, f".env.example sets {key} twice"
        values[key] = value
    return values


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` as Compose interpolates it: $$, ${VAR}, ${VAR:-default}, ${VAR:?message}. A
    variable that is not set and has no default is an error here (Compose would warn and use
    an empty string)."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return "" if value is None else arg
        if op == ":?" and not value:
            raise AssertionError(f"${{{name}}} is required and empty in .env.example")
        if value is None:
            raise AssertionError(f"${{{name}}} is not set in .env.example and has no default")
        return value

    return _VAR.sub(sub, text)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def manifests(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resources_applied() -> list[dict[str, Any]]:
    """Everything `kubectl apply -k deploy/k8s` applies."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in manifests(K8S / name)]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any] | None:
    if resource["kind"] in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        return resource["spec"]["template"]["spec"]
    return None


def containers(resource: dict[str, Any], *, init: bool = True) -> Iterator[dict[str, Any]]:
    spec = pod_spec(resource)
    if spec is None:
        return
    yield from spec.get("containers", [])
    if init:
        yield from spec.get("initContainers", [])


def all_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for resource in resources_applied():
        for container in containers(resource):
            yield resource, container


def k8s_worker() -> dict[str, Any]:
    jobs = [
        r
        for r in resources_applied()
        if r["kind"] == "Job" and r["metadata"]["name"] == "atlas-smoke-test"
    ]
    assert len(jobs) == 1
    (worker,) = [c for c in containers(jobs[0], init=False) if c["name"] == "atlas"]
    return worker


def k8s_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)


def userinfo_passwords(text: str) -> list[str]:
    """The password part of every scheme://user:password@host in `text`."""
    return re.findall(r"[a-z][a-z0-9+.-]*://[^:/@\s]*:([^@\s]*)@", text)


# --- the validators ------------------------------------------------------------------------


def test_yaml_files_pass_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert COMPOSE_FILE in files and len(files) > 10
    problems = [
        f"{path.relative_to(ROOT)}:{problem.line}:{problem.column}: {problem.message}"
        for path in files
        for problem in linter.run(path.read_text(), config, str(path))
    ]
    assert not problems, "\n".join(problems)


def compose_schema() -> dict[str, Any]:
    """The Compose Specification's schema, as check-jsonschema vendors it."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text())


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_interpolated_with_env_example_matches_the_schema() -> None:
    """What `docker compose config` would check: the file after interpolation, with every
    required variable set from .env.example."""
    import jsonschema

    resolved = interpolated(compose(), env_example())
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(resolved)]
    assert not errors, "\n".join(errors)


KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
"""The oldest and newest versions kubernetes-validate bundles schemas for."""


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    docs = manifests(path)
    assert docs
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{path.name} {doc['kind']}/{doc['metadata']['name']} ({version}): "
                    f"{where}: {exc.message}"
                )


def test_dockerfiles_pass_hadolint() -> None:
    result = run(tool("hadolint"), "--no-color", *map(str, DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    result = run(tool("shellcheck"), "--shell=sh", *map(str, SCRIPTS))
    assert result.returncode == 0, result.stdout + result.stderr


def inline_scripts() -> Iterator[tuple[str, str, str]]:
    """(where, shell, script) for every shell command written inline in the Compose file (as
    Compose hands it to the container) and in the manifests."""
    resolved = interpolated(compose(), env_example())
    for name, service in resolved["services"].items():
        for field in ("command", "entrypoint"):
            yield from _shell_of(f"compose {name}.{field}", service.get(field))
        test = service.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[0] == "CMD-SHELL":
            yield f"compose {name}.healthcheck", "sh", test[1]
        elif isinstance(test, list):
            yield from _shell_of(f"compose {name}.healthcheck", test[1:])
    for resource, container in all_containers():
        where = f"{resource['kind']}/{resource['metadata']['name']} {container['name']}"
        yield from _shell_of(f"{where} command", [*container.get("command", [])])
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            yield from _shell_of(f"{where} {probe}", command)


def _shell_of(where: str, command: Any) -> Iterator[tuple[str, str, str]]:
    if isinstance(command, list) and len(command) >= 3 and command[1] == "-c":
        shell = Path(command[0]).name
        if shell in {"sh", "bash"}:
            yield where, shell, command[2]
        elif shell in {"python", "python3"}:
            yield where, "python", command[2]


def test_inline_shell_commands_pass_shellcheck() -> None:
    found = list(inline_scripts())
    assert len(found) >= 8
    problems = []
    for where, shell, script in found:
        if shell == "python":
            compile(script, where, "exec")
            continue
        result = run(tool("shellcheck"), f"--shell={shell}", "-", stdin=script)
        if result.returncode != 0:
            problems.append(f"{where}:\n{result.stdout}{result.stderr}")
    assert not problems, "\n".join(problems)


# --- the Compose file ----------------------------------------------------------------------


def test_every_compose_service_has_a_health_check() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name


def test_dependencies_wait_for_health_or_completion() -> None:
    all_services = services()
    waits = 0
    for name, service in all_services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must give conditions"
        for target, how in depends.items():
            assert target in all_services, f"{name} depends on unknown {target}"
            want = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
            assert how.get("condition") == want, f"{name} -> {target}: {how}"
            waits += 1
    assert waits >= 9
    assert all_services["mlflow"]["depends_on"]["minio-bucket"]["condition"] == (
        "service_completed_successfully"
    )
    for name in ONE_SHOT:
        assert all_services[name].get("restart") == "no"


def test_host_ports_are_bound_to_loopback_only() -> None:
    resolved = interpolated(compose(), env_example())
    published = 0
    for name, service in resolved["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
            published += 1
        assert "network_mode" not in service, name
    assert published >= 6


def test_data_lives_in_named_volumes() -> None:
    data = compose()
    declared = set(data["volumes"])
    mounts = [
        ("postgres", "/var/lib/postgresql/data"),
        ("minio", "/data"),
        ("chroma", "/data"),
        ("neo4j", "/data"),
        ("redis", "/data"),
        ("atlas", "/var/lib/atlas"),  # ATLAS_STATE_DIR
        ("atlas", "/work/outputs"),  # the tasks' outputs
    ]
    for name, path in mounts:
        volumes = [v.split(":") for v in data["services"][name]["volumes"]]
        named = [source for source, target, *_ in volumes if target == path]
        assert named and named[0] in declared, f"{name}: {path} is not a named volume"
    # the worker reads its tasks and writes only to its volumes
    assert "./tasks:/work/tasks:ro" in data["services"]["atlas"]["volumes"]
    used = {v.split(":")[0] for s in data["services"].values() for v in s.get("volumes", [])}
    assert declared <= used, f"declared but unused: {declared - used}"


def test_compose_holds_no_literal_secret() -> None:
    placeholders = {v for v in env_example().values() if PLACEHOLDER.fullmatch(v)}
    text = COMPOSE_FILE.read_text()
    for placeholder in placeholders:
        assert placeholder not in text
    for name, service in services().items():
        for key, value in environment(service).items():
            for password in userinfo_passwords(value):
                assert re.fullmatch(COMPOSE_REF, password), f"{name}.{key}: a literal password"
            if SECRET_ENV_NAME.search(key):
                remnant = re.sub(COMPOSE_REF, "", value)
                assert remnant in SECRET_REMNANTS, f"{name}.{key}: {value!r} is not a ${{VAR}}"
                for default in re.findall(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", value):
                    assert default == "", f"{name}.{key} has a default value"
    for value in strings(compose()):
        for password in userinfo_passwords(value):
            assert re.fullmatch(COMPOSE_REF, password), value


def test_every_variable_compose_reads_is_in_env_example_and_back() -> None:
    example = env_example()
    text = "\n".join(strings(compose())).replace("$$", "")
    referenced = {m.group("name") for m in _VAR.finditer(text) if m.group("name")}
    defaults = {m.group(1) for m in re.finditer(r"\$\{([A-Z0-9_]+):?-", text)}
    assert referenced - defaults <= set(example), referenced - defaults - set(example)
    unused = set(example) - referenced
    assert not unused, f".env.example keys docker-compose.yml does not use: {unused}"


# --- .env.example, the Secret, .gitignore ---------------------------------------------------


def test_env_example_has_placeholders_only() -> None:
    example = env_example()
    assert len(example) >= 12
    for key, value in example.items():
        if key in SETTINGS:
            assert not PLACEHOLDER.fullmatch(value) and re.fullmatch(r"[a-z0-9-]+", value)
        elif key in OPTIONAL:
            assert value == "", f"{key}: leave it empty in the example"
        else:
            assert PLACEHOLDER.fullmatch(value), f"{key}={value!r} is not a change-me placeholder"
        assert len(value) >= MIN_LENGTH.get(key, 0), f"{key}: the server wants longer"


def test_secret_example_has_the_env_example_keys_and_placeholders_only() -> None:
    (secret,) = manifests(SECRET_EXAMPLE)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    assert "data" not in secret
    values = secret["stringData"]
    assert set(values) == set(env_example()) - SETTINGS
    for key, value in values.items():
        assert value == "" if key in OPTIONAL else PLACEHOLDER.fullmatch(value), key
        assert value == env_example()[key], f"{key} differs from .env.example"


def test_env_file_is_git_ignored() -> None:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/.env" in lines
    assert not any(line.strip() in {"*.example", ".env*", "deploy/.env*"} for line in lines)


# --- the manifests -------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in manifest_files() if p != SECRET_EXAMPLE), (
        "every manifest but secret.example.yaml belongs in kustomization.yaml"
    )
    assert kustomization["namespace"] == "atlas"
    applied = resources_applied()
    assert not [r for r in applied if r["kind"] == "Secret"], "Secrets are created by hand"
    kinds = {r["kind"] for r in applied}
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "Job"} <= kinds
    images = {c["image"].partition(":")[0] for _, c in all_containers()}
    for entry in kustomization["images"]:
        assert entry["name"] in images


def test_manifests_hold_no_literal_secret() -> None:
    placeholders = {v for v in env_example().values() if PLACEHOLDER.fullmatch(v)}
    (secret,) = manifests(SECRET_EXAMPLE)
    keys = set(secret["stringData"])
    for path in manifest_files():
        if path == SECRET_EXAMPLE:
            continue
        text = path.read_text()
        assert not [p for p in placeholders if p in text], path.name
        for value in strings(manifests(path)):
            for password in userinfo_passwords(value):
                assert re.fullmatch(K8S_REF, password), f"{path.name}: {value}"
    for resource, container in all_containers():
        where = f"{resource['metadata']['name']}/{container['name']}"
        env = container.get("env", [])
        from_secret: set[str] = set()
        for index, entry in enumerate(env):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET_NAME and ref["key"] in keys, f"{where}: {ref}"
                from_secret.add(entry["name"])
                continue
            value = entry.get("value", "")
            # $(VAR) is expanded only from variables defined earlier in the same list
            earlier = {e["name"] for e in env[:index]}
            for name in re.findall(r"\$\(([A-Z0-9_]+)\)", value):
                assert name in earlier, f"{where}: {entry['name']} uses $({name}) before it is set"
            if SECRET_ENV_NAME.search(entry["name"]):
                assert re.sub(K8S_REF, "", value) in SECRET_REMNANTS, f"{where}: {entry['name']}"
                used = set(re.findall(r"\$\(([A-Z0-9_]+)\)", value))
                assert used and used <= from_secret, f"{where}: {entry['name']}"
        assert "envFrom" not in container, where


def test_every_workload_has_probes_and_resources() -> None:
    long_running = 0
    for resource, container in all_containers():
        where = f"{resource['kind']}/{resource['metadata']['name']} {container['name']}"
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), where
        names = {p["name"] for p in container.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            for kind in ("httpGet", "tcpSocket"):
                port = container.get(probe, {}).get(kind, {}).get("port")
                if isinstance(port, str):
                    assert port in names, f"{where}: {probe} port {port} is not declared"
    for resource in resources_applied():
        if resource["kind"] in {"Deployment", "StatefulSet"}:
            for container in containers(resource, init=False):
                assert "readinessProbe" in container and "livenessProbe" in container, (
                    f"{resource['metadata']['name']}/{container['name']}"
                )
                long_running += 1
    assert long_running == 6
    assert "livenessProbe" in k8s_worker()


def test_services_select_pods_and_named_ports() -> None:
    applied = resources_applied()
    pods = [
        (r["spec"]["template"]["metadata"]["labels"], list(containers(r, init=False)))
        for r in applied
        if r["kind"] in {"Deployment", "StatefulSet"}
    ]
    for service in (r for r in applied if r["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matched = [cs for labels, cs in pods if selector.items() <= labels.items()]
        assert len(matched) == 1, service["metadata"]["name"]
        names = {p["name"] for c in matched[0] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, f"{service['metadata']['name']}: {port}"
    claims = {r["metadata"]["name"] for r in applied if r["kind"] == "PersistentVolumeClaim"}
    for resource in applied:
        spec = pod_spec(resource)
        for volume in (spec or {}).get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or claim in claims, claim
        if resource["kind"] == "StatefulSet":
            assert resource["spec"]["volumeClaimTemplates"], resource["metadata"]["name"]


def configmap_data(name: str) -> dict[str, str]:
    (found,) = [
        r["data"]
        for r in resources_applied()
        if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name
    ]
    return found


@pytest.mark.parametrize(
    ("configmap", "key", "source"),
    [
        ("postgres-init", "10-atlas-databases.sh", "postgres/init-databases.sh"),
        ("minio-bucket", "create-bucket.sh", "minio/create-bucket.sh"),
        ("atlas-tasks", "example.yaml", "tasks/example.yaml"),
    ],
)
def test_configmaps_are_exact_copies_of_the_compose_files(
    configmap: str, key: str, source: str
) -> None:
    """kustomize cannot read files above deploy/k8s, so these are copies: keep them equal."""
    assert configmap_data(configmap)[key] == (DEPLOY / source).read_text(), (
        f"copy deploy/{source} into the ConfigMap {configmap} (key {key}) in deploy/k8s"
    )


def test_images_are_pinned_and_the_same_in_both() -> None:
    compose_images = {s["image"] for s in services().values()}
    k8s_images = {c["image"] for _, c in all_containers()}
    for image in compose_images | k8s_images:
        name, sep, tag = image.rpartition(":")
        assert sep and name and tag and tag != "latest", image
    assert compose_images == k8s_images


# --- the worker ----------------------------------------------------------------------------


def atlas_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "atlas").rglob("*.py")))


def test_the_stack_variables_are_the_ones_atlas_reads() -> None:
    read = set(STACK_ENV_PATTERN.findall(atlas_source()))
    assert read >= STACK_ENV, f"ATLAS does not read {STACK_ENV - read}"
    assert read - ALTERNATIVES <= STACK_ENV, (
        f"ATLAS now also reads {read - ALTERNATIVES - STACK_ENV}"
    )


def test_worker_sets_every_variable_atlas_reads_for_the_stack() -> None:
    compose_env = environment(services()["atlas"])
    k8s_names = set(k8s_env(k8s_worker()))
    for name in STACK_ENV:
        assert name in compose_env, f"docker-compose.yml: the worker does not set {name}"
        assert name in k8s_names, f"atlas-worker.yaml: the worker does not set {name}"


def test_worker_points_at_the_stack() -> None:
    example = env_example()
    all_services = services()
    worker: dict[str, str] = interpolated(environment(all_services["atlas"]), example)
    k8s = {name: str(entry.get("value", "")) for name, entry in k8s_env(k8s_worker()).items()}
    init_sql = (DEPLOY / "postgres" / "init-databases.sh").read_text()

    for env in (worker, k8s):
        state = urlsplit(env["ATLAS_STATE_URL"])
        assert state.scheme == "postgresql" and (state.hostname, state.port) == ("postgres", 5432)
        assert state.username == "atlas" and f"CREATE DATABASE {state.path[1:]} OWNER atlas" in (
            init_sql
        )
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["NEO4J_USERNAME"] == "neo4j"
        cache = urlsplit(env[CACHE_ENV])
        assert cache.scheme == "redis" and (cache.hostname, cache.port) == ("redis", 6379)
        assert float(env["ATLAS_TRACKING_PROBE_S"]) > 0
        assert env["ATLAS_STATE_DIR"] == "/var/lib/atlas"

    # the same credentials on both ends (compose: the same .env keys)
    raw = environment(all_services["atlas"])
    mlflow = environment(all_services["mlflow"])
    assert raw["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert raw["MLFLOW_TRACKING_PASSWORD"] == mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    neo4j = environment(all_services["neo4j"])
    assert neo4j["NEO4J_AUTH"] == f"neo4j/{raw['NEO4J_PASSWORD']}"
    assert f":{environment(all_services['redis'])['REDIS_PASSWORD']}@" in raw[CACHE_ENV]
    assert (
        f":{environment(all_services['postgres'])['ATLAS_DB_PASSWORD']}@" in raw["ATLAS_STATE_URL"]
    )
    # the server's container port and the state directory's volume
    assert "127.0.0.1:${MLFLOW_HOST_PORT:-5000}:5000" in all_services["mlflow"]["ports"]
    assert "atlas-state:/var/lib/atlas" in all_services["atlas"]["volumes"]

    refs = {
        name: entry["valueFrom"]["secretKeyRef"]["key"]
        for name, entry in k8s_env(k8s_worker()).items()
        if "valueFrom" in entry
    }
    assert refs["MLFLOW_TRACKING_USERNAME"] == "MLFLOW_AUTH_ADMIN_USERNAME"
    assert refs["MLFLOW_TRACKING_PASSWORD"] == "MLFLOW_AUTH_ADMIN_PASSWORD"
    assert refs["NEO4J_PASSWORD"] == "NEO4J_PASSWORD"


def test_example_task_uses_the_stack_memory_servers() -> None:
    from atlas.spec import load_task

    spec = load_task(DEPLOY / "tasks" / "example.yaml")
    vector, graph = urlsplit(spec.memory.vector_url), urlsplit(spec.memory.graph_uri)
    assert (vector.hostname, vector.port) == ("chroma", 8000)
    assert (graph.scheme, graph.hostname, graph.port) == ("bolt", "neo4j", 7687)
    ports = {
        r["metadata"]["name"]: {p["port"] for p in r["spec"]["ports"]}
        for r in resources_applied()
        if r["kind"] == "Service"
    }
    assert 8000 in ports["chroma"] and 7687 in ports["neo4j"]
    assert "chroma" in services() and "neo4j" in services()


def test_worker_dockerfile_builds_atlas_as_users_run_it() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    torch = text.index("download.pytorch.org/whl/cpu")
    project = text.index('pip install --no-cache-dir "./[neo4j]"')
    assert torch < project, "the CPU torch wheel must be installed before the project"
    assert "export_onnx()" in text, "the embedder's ONNX file is exported at build time"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    assert users[-1].split(":")[0].isdigit(), "a numeric user, for runAsNonRoot"
    assert re.search(r'^ENTRYPOINT \["python", "-m", "atlas"\]$', text, re.M)
    # the build context is the repository root: only what the Dockerfile copies goes in
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for name in source.split():
            assert f"!{name}" in ignore or f"!{name}/" in ignore, name


def test_mlflow_image_matches_what_atlas_is_tested_with() -> None:
    from packaging.requirements import Requirement

    text = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    version = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", text, re.M)
    assert version
    pyproject = (ROOT / "pyproject.toml").read_text()
    (wanted,) = [Requirement(r) for r in re.findall(r'"(mlflow\[auth\][^"]*)"', pyproject)]
    assert wanted.specifier.contains(version.group(1))
    for package in ('"mlflow[auth]==', '"boto3==', '"psycopg[binary]=='):
        assert package in text
    assert "--app-name basic-auth" in (DEPLOY / "mlflow" / "start.sh").read_text()
    assert services()["mlflow"]["image"].endswith(f":{version.group(1)}")


def test_chroma_server_matches_the_client_atlas_installs() -> None:
    client = importlib.metadata.version("chromadb")
    image = services()["chroma"]["image"]
    assert image.partition(":")[2].split(".")[:2] == client.split(".")[:2], (image, client)
