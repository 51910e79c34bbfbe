"""Static checks of the Docker Compose topology (no Docker engine needed).

docker/docker-compose.yml, docker/.env, docker/Dockerfile, docker/prometheus.yml,
docker/grafana/ and config/pgcat.simple.toml describe one system from six places. These tests
read them all and fail as soon as one drifts from the others: a port, a host,
a role, a credential, a path or the image variable.

Each check is a function over the parsed files, so the drift tests at the end
can feed it a deliberately broken copy and make sure it notices.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml  # in the test extra: a missing PyYAML must fail, not skip, these checks

from pypool import compose_env
from pypool.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
ENV_FILE = DOCKER / ".env"
DOCKERFILE = DOCKER / "Dockerfile"
PROMETHEUS_FILE = DOCKER / "prometheus.yml"

PG_SERVICES = ("pg1", "pg2", "pg3")
SERVICES = {*PG_SERVICES, "pypool", "prometheus", "grafana", "pgcat-dashboard"}
PG_PORT_VARS = {"pg1": "PG1_PORT", "pg2": "PG2_PORT", "pg3": "PG3_PORT"}
ROLE_OF_MODE = {"master": "primary", "slave": "replica"}
POSTGRESQL_CONTAINER_PORT = 5432

EXPECTED_ENV = {
    "POSTGRESQL_USERNAME": "postgres",
    "POSTGRESQL_DATABASE": "postgres",
    "POSTGRESQL_PASSWORD": "mysecretpassword",
    "POSTGRESQL_REPLICATION_USER": "repl_user",
    "POSTGRESQL_REPLICATION_PASSWORD": "repl_password",
    "PGCAT_PORT": "6432",
    "PG1_PORT": "5433",
    "PG2_PORT": "5434",
    "PG3_PORT": "5435",
}
IMAGE_VAR = "POSTGRESQL_IMAGE"
LEGACY_IMAGE = re.compile(r"bitnamilegacy/postgresql:15\.\d+\.\d+-debian-12-r\d+")
CREDENTIAL_VARS = (
    "POSTGRESQL_USERNAME",
    "POSTGRESQL_PASSWORD",
    "POSTGRESQL_DATABASE",
    "POSTGRESQL_REPLICATION_USER",
    "POSTGRESQL_REPLICATION_PASSWORD",
)


# --------------------------------------------------------------------- readers

def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; comments and blank lines skipped; quotes not allowed."""
    env: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{lineno}: not KEY=VALUE: {line!r}"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}:{lineno}: bad name {key!r}"
        assert key not in env, f"{path.name}:{lineno}: {key} defined twice"
        assert value == value.strip() and not value.startswith(("'", '"')), \
            f"{path.name}:{lineno}: keep values bare (no quotes or padding): {line!r}"
        env[key] = value
    return env


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def referenced_vars(node) -> set[str]:
    """Every ${VAR} / $VAR the compose file interpolates ($$ is a literal $)."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            found |= referenced_vars(key) | referenced_vars(value)
    elif isinstance(node, list):
        for item in node:
            found |= referenced_vars(item)
    elif isinstance(node, str):
        for match in _VAR.finditer(node):
            name = match.group(1) or match.group(3)
            if name:
                found.add(name)
    return found


def substitute(node, env: dict[str, str]):
    """Compose-style interpolation; an undefined variable or a default (${X:-y}) fails."""
    if isinstance(node, dict):
        return {substitute(k, env): substitute(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(item, env) for item in node]
    if not isinstance(node, str):
        return node

    def repl(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        assert not match.group(2), f"${{{name}{match.group(2)}}}: use plain ${{{name}}}, defined in .env"
        assert name in env, f"compose file uses ${name}, which docker/.env does not define"
        return env[name]

    return _VAR.sub(repl, node)


def environment_of(service: dict) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: "" if v is None else str(v) for k, v in raw.items()}


def published_ports(service: dict) -> set[tuple[int, int]]:
    """{(host_port, container_port)} from short or long port syntax."""
    out: set[tuple[int, int]] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.add((int(entry["published"]), int(entry["target"])))
            continue
        text = str(entry).split("/")[0]
        parts = text.rsplit(":", 2)
        assert len(parts) >= 2, f"port {entry!r} is not published on a fixed host port"
        out.add((int(parts[-2]), int(parts[-1])))
    return out


def volume_mounts(service: dict) -> list[tuple[str, str, bool]]:
    """[(source, target, read_only)] from short or long volume syntax."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out.append((entry["source"], entry["target"], bool(entry.get("read_only"))))
            continue
        parts = entry.split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        out.append((parts[0], parts[1], "ro" in mode.split(",")))
    return out


def is_bind_source(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not pending:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            instr, _, args = full.partition(" ")
            out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_FILE)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose(raw_compose, env) -> dict:
    return substitute(raw_compose, env)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prometheus() -> dict:
    with PROMETHEUS_FILE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)


def config_mount(compose: dict) -> tuple[Path, str, bool]:
    """(host path of the config, its path in the container, read-only) for pypool."""
    mounts = [m for m in volume_mounts(compose["services"]["pypool"]) if m[0].endswith(".toml")]
    assert len(mounts) == 1, f"pypool must mount exactly one .toml config, found {mounts}"
    source, target, read_only = mounts[0]
    assert is_bind_source(source), f"config mount {source!r} must be a path relative to docker/"
    return (DOCKER / source).resolve(), target, read_only


@pytest.fixture(scope="module")
def config(compose, tmp_path_factory):
    """The config pypool runs in Compose: the mounted file with the credentials of its environment."""
    path, _, _ = config_mount(compose)
    assert path.is_file(), f"pypool mounts {path}, which does not exist"
    rendered = tmp_path_factory.mktemp("compose") / "pgcat.toml"
    service_env = environment_of(compose["services"]["pypool"])
    rendered.write_text(dump_config(compose_env.with_credentials(compose_env.read_toml(str(path)), service_env,
                                                                 str(path))))
    return load_config(rendered)


# -------------------------------------------------------------------- checks

def check_env(env: dict[str, str], env_text: str) -> None:
    assert set(env) == set(EXPECTED_ENV) | {IMAGE_VAR}, \
        f"docker/.env must define exactly {sorted(set(EXPECTED_ENV) | {IMAGE_VAR})}, has {sorted(env)}"
    for name, value in EXPECTED_ENV.items():
        assert env[name] == value, f"{name}={env[name]!r}, the project's default is {value!r}"
    assert LEGACY_IMAGE.fullmatch(env[IMAGE_VAR]), \
        f"{IMAGE_VAR}={env[IMAGE_VAR]!r}: pin a versioned bitnamilegacy/postgresql 15.x debian-12 tag"
    commented = [line for line in env_text.splitlines() if line.lstrip().startswith("#")]
    assert any("bitnamisecure/postgresql:latest" in line for line in commented), \
        "docker/.env should mention the maintained alternative bitnamisecure/postgresql:latest in a comment"


def check_services(compose: dict) -> None:
    assert set(compose["services"]) == SERVICES


def check_images(raw_compose: dict, compose: dict, env: dict[str, str]) -> None:
    services = raw_compose["services"]
    for name in PG_SERVICES:
        assert services[name]["image"] == f"${{{IMAGE_VAR}}}", \
            f"{name} must take its image from ${{{IMAGE_VAR}}}, has {services[name]['image']!r}"
        assert compose["services"][name]["image"] == env[IMAGE_VAR]
    for name in ("pypool", "prometheus"):
        assert IMAGE_VAR not in str(services[name].get("image", "")), f"{name} is not a PostgreSQL server"
    image = compose["services"]["prometheus"]["image"]
    repo, _, tag = image.rpartition(":")
    assert repo in ("prom/prometheus", "docker.io/prom/prometheus"), image
    assert re.fullmatch(r"v\d+\.\d+\.\d+", tag), f"pin prometheus to a release tag, not {tag!r}"


def check_replication(compose: dict, env: dict[str, str]) -> None:
    services = compose["services"]
    master = environment_of(services["pg1"])
    assert master.get("POSTGRESQL_REPLICATION_MODE") == "master"
    assert "POSTGRESQL_MASTER_HOST" not in master
    for name in ("pg2", "pg3"):
        slave = environment_of(services[name])
        assert slave.get("POSTGRESQL_REPLICATION_MODE") == "slave", name
        assert slave.get("POSTGRESQL_MASTER_HOST") == "pg1", name
        assert slave.get("POSTGRESQL_MASTER_PORT_NUMBER") == str(POSTGRESQL_CONTAINER_PORT), name
    for name in PG_SERVICES:
        service_env = environment_of(services[name])
        for var in CREDENTIAL_VARS:
            assert service_env.get(var) == env[var], f"{name}: {var} must be the .env value"


def check_env_references(raw_compose: dict, env: dict[str, str]) -> None:
    used = referenced_vars(raw_compose)
    missing = used - set(env)
    assert not missing, f"compose file uses variables docker/.env does not define: {sorted(missing)}"
    unused = set(env) - used
    assert not unused, f"docker/.env defines variables the compose file never uses: {sorted(unused)}"


def check_ports(compose: dict, env: dict[str, str], config) -> None:
    services = compose["services"]
    for name, var in PG_PORT_VARS.items():
        assert published_ports(services[name]) == {(int(env[var]), POSTGRESQL_CONTAINER_PORT)}, \
            f"{name} must publish ${{{var}}}:{POSTGRESQL_CONTAINER_PORT}"
    pypool_ports = published_ports(services["pypool"])
    assert (int(env["PGCAT_PORT"]), config.general.port) in pypool_ports, \
        f"pypool must publish ${{PGCAT_PORT}}:{config.general.port} (general.port of its config)"
    metrics = config.general.prometheus_exporter_port
    assert (metrics, metrics) in pypool_ports, f"pypool must publish its metrics port {metrics}"
    host_ports = [host for svc in services.values() for host, _ in published_ports(svc)]
    assert len(host_ports) == len(set(host_ports)), f"two services publish the same host port: {host_ports}"


def check_config_servers(compose: dict, config) -> None:
    services = compose["services"]
    expected = set()
    for name in PG_SERVICES:
        mode = environment_of(services[name])["POSTGRESQL_REPLICATION_MODE"]
        container_ports = {target for _, target in published_ports(services[name])}
        assert container_ports == {POSTGRESQL_CONTAINER_PORT}
        expected.add((name, POSTGRESQL_CONTAINER_PORT, ROLE_OF_MODE[mode]))
    assert config.pools, "the config defines no pool"
    for pool in config.pools.values():
        assert pool.shards, f"pool {pool.name} has no shards"
        for shard in pool.shards:
            got = {(s.host, s.port, s.role) for s in shard.servers}
            assert len(got) == len(shard.servers)
            assert got == expected, f"pool {pool.name}: servers {sorted(got)}, compose runs {sorted(expected)}"


POOLER_CREDENTIAL_VARS = ("POSTGRESQL_USERNAME", "POSTGRESQL_PASSWORD", "POSTGRESQL_DATABASE")


def check_credentials_in_one_place(raw_compose: dict) -> None:
    """pypool takes the credentials from .env, through its environment, as the servers do."""
    environment = environment_of(raw_compose["services"]["pypool"])
    for var in POOLER_CREDENTIAL_VARS:
        assert environment.get(var) == f"${{{var}}}", f"pypool's {var} must be ${{{var}}} from docker/.env"


def check_config_credentials(config, env: dict[str, str]) -> None:
    database = env["POSTGRESQL_DATABASE"]
    assert database in config.pools, f"no pool named {database!r} (the database clients connect to)"
    for pool in config.pools.values():
        for shard in pool.shards:
            assert shard.database == database, f"pool {pool.name} points at database {shard.database!r}"
        users = list(pool.users.values())
        assert users, f"pool {pool.name} has no users"
        for user in users:
            server_user = user.server_username or user.username
            server_password = user.server_password or user.password
            assert server_user == env["POSTGRESQL_USERNAME"], f"pool {pool.name}: user {server_user!r}"
            assert server_password == env["POSTGRESQL_PASSWORD"], \
                f"pool {pool.name}: user {server_user!r} has a password other than POSTGRESQL_PASSWORD"


def check_prometheus(compose: dict, config, prometheus: dict, dockerfile) -> None:
    port = config.general.prometheus_exporter_port
    assert config.general.enable_prometheus_exporter, "the Compose config must enable the exporter"
    targets = [
        target
        for job in prometheus.get("scrape_configs") or []
        for static in job.get("static_configs") or []
        for target in static.get("targets") or []
    ]
    assert f"pypool:{port}" in targets, f"Prometheus scrapes {targets}, pypool exports on {port}"
    exposed = {p.split("/")[0] for instr, args in dockerfile if instr == "EXPOSE" for p in args.split()}
    assert str(port) in exposed, f"the Dockerfile must EXPOSE {port}"
    assert str(config.general.port) in exposed, f"the Dockerfile must EXPOSE {config.general.port}"
    mounts = volume_mounts(compose["services"]["prometheus"])
    sources = {((DOCKER / s).resolve(), t) for s, t, _ in mounts if is_bind_source(s)}
    assert (PROMETHEUS_FILE.resolve(), "/etc/prometheus/prometheus.yml") in sources, \
        "the prometheus service must mount docker/prometheus.yml at /etc/prometheus/prometheus.yml"


def check_config_mount(compose: dict, dockerfile) -> None:
    path, target, read_only = config_mount(compose)
    assert path == (ROOT / "config" / "pgcat.simple.toml").resolve(), f"pypool mounts {path}"
    assert path.is_file()
    assert read_only, "mount the config read-only"
    cmds = [exec_form(args) for instr, args in dockerfile if instr == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    assert cmds[-1] == [target], f"Dockerfile CMD {cmds[-1]} must be the mount target {target}"
    # Compose renders the mounted config with the .env credentials, then runs the pooler on the result.
    service = compose["services"]["pypool"]
    assert "command" not in service, "the entrypoint names the config; a command would be ignored"
    entrypoint = service.get("entrypoint")
    assert isinstance(entrypoint, list) and entrypoint[:2] == ["sh", "-c"], f"entrypoint {entrypoint}"
    match = re.fullmatch(r"pypool config init --from (\S+) -o (\S+) && exec pypool (\S+)", entrypoint[2])
    assert match, f"entrypoint {entrypoint[2]!r}: expected `pypool config init --from CONFIG -o OUT && exec " \
                  f"pypool OUT`"
    assert match.group(1) == target, f"the entrypoint renders {match.group(1)}, the config is mounted at {target}"
    assert match.group(2) == match.group(3), f"renders {match.group(2)} but runs pypool on {match.group(3)}"
    assert PurePosixPath(target).is_absolute()


def check_depends_on(compose: dict) -> None:
    services = compose["services"]
    depends = services["pypool"].get("depends_on")
    assert isinstance(depends, dict), "pypool's depends_on needs the long form with conditions"
    for name in PG_SERVICES:
        assert name in depends, f"pypool must depend on {name}"
        assert depends[name].get("condition") == "service_healthy", f"pypool must wait for {name} to be healthy"
    for name in PG_SERVICES:
        test = services[name].get("healthcheck", {}).get("test")
        assert test and "pg_isready" in " ".join(test if isinstance(test, list) else [test]), \
            f"{name} needs a pg_isready healthcheck"
    assert services["pypool"].get("healthcheck", {}).get("test"), "pypool needs a healthcheck"
    # Whatever a service waits for to be healthy must have a health check to become so.
    for name, service in services.items():
        for needed, how in (service.get("depends_on") or {}).items():
            if isinstance(how, dict) and how.get("condition") == "service_healthy":
                assert services[needed].get("healthcheck", {}).get("test"), \
                    f"{name} waits for {needed} to be healthy, but {needed} has no healthcheck"
    prometheus_waits = (services["prometheus"].get("depends_on") or {}).get("pypool") or {}
    assert prometheus_waits.get("condition") == "service_healthy", "Prometheus must wait for a healthy pypool"


def check_stop_grace_period(compose: dict, config) -> None:
    """SIGTERM makes pypool drain for up to shutdown_timeout: Compose must not SIGKILL it sooner."""
    grace = compose["services"]["pypool"].get("stop_grace_period", "10s")  # Compose's default
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(grace))
    assert match and any(match.groups()), f"cannot read stop_grace_period {grace!r}"
    seconds = int(match.group(1) or 0) * 60 + int(match.group(2) or 0)
    assert seconds * 1000 > config.general.shutdown_timeout, \
        f"stop_grace_period {grace} is not longer than shutdown_timeout {config.general.shutdown_timeout} ms"


def check_readme_image_note(readme: str, env: dict[str, str]) -> None:
    """The README says where Bitnami's images went and which one the Compose file pins."""
    for needed in ("bitnamilegacy/", "bitnamisecure/postgresql:latest", IMAGE_VAR, env[IMAGE_VAR]):
        assert needed in readme, f"README.md must mention {needed}"


def check_dockerfile(dockerfile, pyproject: dict) -> None:
    froms = [args for instr, args in dockerfile if instr == "FROM"]
    assert froms == ["python:3.11-slim"], f"FROM {froms}"
    runs = [args for instr, args in dockerfile if instr == "RUN"]
    installs = [r for r in runs if re.search(r"\bpip\s+install\b", r)]
    assert any(re.search(r"\bpip\s+install\s+(--?[\w-]+\s+)*\.(\s|$|&|;|\))", r) for r in installs), \
        f"install the package from its copied source with `pip install .`: {installs}"
    assert not any(re.search(r"\.\[(?!speedups\])|-e\s|--editable", r) for r in installs), \
        f"install without extras (but the optional speedups) and not editable: {installs}"
    for r in installs:  # no sqlglotc wheel for the platform must not fail the build
        if ".[speedups]" in r:
            assert re.search(r"\.\[speedups\]'?\s*\|\|\s*pip\s+install\s+\.", r), f"no fallback: {r}"
    copied = [args.split() for instr, args in dockerfile if instr in ("COPY", "ADD")]
    sources = {s for parts in copied for s in parts[:-1] if not s.startswith("--")}
    for needed in ("pyproject.toml", "pypool"):
        assert any(s.rstrip("/") == needed for s in sources), f"the Dockerfile must COPY {needed}"
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in sources, f"pyproject names readme {readme!r}: COPY it or `pip install .` fails"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the build context (the repo root)"
    users = [args for instr, args in dockerfile if instr == "USER"]
    assert users, "the image must switch to a non-root USER"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0"), f"USER {users[-1]} is root"
    last_user = max(i for i, (instr, _) in enumerate(dockerfile) if instr == "USER")
    assert all(instr != "USER" for instr, _ in dockerfile[last_user + 1:])
    entry = [exec_form(args) for instr, args in dockerfile if instr == "ENTRYPOINT"]
    assert entry and entry[-1] == ["pypool"], f"ENTRYPOINT {entry}"
    assert pyproject["project"]["scripts"].get("pypool") == "pypool.cli:main"


# --------------------------------------------------------------------- tests

def test_env_file(env):
    check_env(env, ENV_FILE.read_text(encoding="utf-8"))


def test_env_matches_config_init_defaults(env):
    """`pypool config init` and the Compose .env describe the same defaults."""
    from pypool.config import default_config_dict

    defaults = default_config_dict({})
    (database, pool), = defaults["pools"].items()
    user = pool["users"]["0"]
    ports = [server[1] for server in pool["shards"]["0"]["servers"]]
    assert database == env["POSTGRESQL_DATABASE"]
    assert (user["username"], user["password"]) == (env["POSTGRESQL_USERNAME"], env["POSTGRESQL_PASSWORD"])
    assert defaults["general"]["port"] == int(env["PGCAT_PORT"])
    assert ports == [int(env["PG1_PORT"]), int(env["PG2_PORT"]), int(env["PG3_PORT"])]


def test_service_names(compose):
    check_services(compose)


def test_images_come_from_the_image_variable(raw_compose, compose, env):
    check_images(raw_compose, compose, env)


def test_master_and_slaves(compose, env):
    check_replication(compose, env)


def test_every_variable_is_defined_and_used(raw_compose, env):
    check_env_references(raw_compose, env)


def test_published_ports(compose, env, config):
    check_ports(compose, env, config)


def test_config_servers_are_the_compose_services(compose, config):
    check_config_servers(compose, config)


def test_config_credentials_match_env(config, env, raw_compose):
    check_credentials_in_one_place(raw_compose)
    check_config_credentials(config, env)


def test_prometheus_scrapes_the_exported_port(compose, config, prometheus, dockerfile):
    check_prometheus(compose, config, prometheus, dockerfile)


def test_config_mount_is_the_dockerfile_cmd(compose, dockerfile):
    check_config_mount(compose, dockerfile)


def test_pypool_waits_for_healthy_servers(compose):
    check_depends_on(compose)


def test_dockerfile(dockerfile, pyproject):
    check_dockerfile(dockerfile, pyproject)


def test_compose_lets_pypool_drain(compose, config):
    check_stop_grace_period(compose, config)
    broken = copy.deepcopy(compose)
    broken["services"]["pypool"]["stop_grace_period"] = "30s"
    with pytest.raises(AssertionError, match="shutdown_timeout"):
        check_stop_grace_period(broken, config)
    del broken["services"]["pypool"]["stop_grace_period"]
    with pytest.raises(AssertionError):
        check_stop_grace_period(broken, config)


def test_readme_explains_the_bitnami_images(env):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    check_readme_image_note(readme, env)
    with pytest.raises(AssertionError):
        check_readme_image_note(readme.replace("bitnamisecure", "bitnami"), env)


def test_pypool_builds_from_the_repo_root(raw_compose):
    build = raw_compose["services"]["pypool"]["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()


def test_console_script_resolves(pyproject):
    import importlib

    module, _, func = pyproject["project"]["scripts"]["pypool"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_pyyaml_is_in_the_test_extra(pyproject):
    test_extra = pyproject["project"]["optional-dependencies"]["test"]
    assert any(re.match(r"pyyaml\b", req, re.IGNORECASE) for req in test_extra)


# ------------------------------------------------- the checks notice drift

def _set(path: list, value):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _del(path: list):
    def mutate(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


COMPOSE_DRIFT = {
    "slave points at pg2": _set(["services", "pg3", "environment", "POSTGRESQL_MASTER_HOST"], "pg2"),
    "pg2 becomes a master": _set(["services", "pg2", "environment", "POSTGRESQL_REPLICATION_MODE"], "master"),
    "pg1 port swapped": _set(["services", "pg1", "ports"], ["5434:5432"]),
    "pypool client port": _set(["services", "pypool", "ports"], ["6432:6433", "9930:9930"]),
    "metrics not published": _set(["services", "pypool", "ports"], ["6432:6432"]),
    "depends_on started only": _set(["services", "pypool", "depends_on", "pg2", "condition"], "service_started"),
    "service renamed": lambda d: d["services"].__setitem__("db3", d["services"].pop("pg3")),
    "config mount target": _set(["services", "pypool", "volumes"],
                                ["../config/pgcat.simple.toml:/etc/pgcat/pgcat.toml:ro"]),
    "config mount writable": _set(["services", "pypool", "volumes"],
                                  ["../config/pgcat.simple.toml:/etc/pypool/pgcat.toml"]),
    "other config": _set(["services", "pypool", "volumes"],
                         ["../config/pgcat.local.toml:/etc/pypool/pgcat.toml:ro"]),
    "password differs": _set(["services", "pg2", "environment", "POSTGRESQL_PASSWORD"], "other"),
    "pypool runs the mounted file as is": _set(["services", "pypool", "entrypoint"],
                                               ["pypool", "/etc/pypool/pgcat.toml"]),
    "pypool renders another file": _set(["services", "pypool", "entrypoint", 2],
                                        "pypool config init --from /etc/pgcat.toml -o /tmp/pgcat.toml && "
                                        "exec pypool /tmp/pgcat.toml"),
    "pypool runs what it did not render": _set(["services", "pypool", "entrypoint", 2],
                                               "pypool config init --from /etc/pypool/pgcat.toml -o /tmp/a.toml "
                                               "&& exec pypool /tmp/b.toml"),
    "no healthcheck": _del(["services", "pg3", "healthcheck"]),
    "pypool without healthcheck": _del(["services", "pypool", "healthcheck"]),
    "prometheus starts before pypool is healthy": _set(["services", "prometheus", "depends_on", "pypool",
                                                        "condition"], "service_started"),
}


@pytest.mark.parametrize("name", sorted(COMPOSE_DRIFT))
def test_compose_drift_is_caught(name, compose, env, config, dockerfile):
    broken = copy.deepcopy(compose)
    COMPOSE_DRIFT[name](broken)
    checks = [
        lambda: check_services(broken),
        lambda: check_replication(broken, env),
        lambda: check_ports(broken, env, config),
        lambda: check_config_servers(broken, config),
        lambda: check_config_mount(broken, dockerfile),
        lambda: check_depends_on(broken),
    ]
    failures = 0
    for check in checks:
        try:
            check()
        except (AssertionError, KeyError):
            failures += 1
    assert failures, f"no check noticed: {name}"


def test_credentials_drift_is_caught(raw_compose):
    broken = copy.deepcopy(raw_compose)
    broken["services"]["pypool"]["environment"] = {**broken["services"]["pypool"]["environment"],
                                                   "POSTGRESQL_PASSWORD": "mysecretpassword"}
    with pytest.raises(AssertionError):
        check_credentials_in_one_place(broken)


def test_raw_compose_drift_is_caught(raw_compose, env):
    broken = copy.deepcopy(raw_compose)
    broken["services"]["pg2"]["image"] = "bitnamilegacy/postgresql:15.10.0-debian-12-r2"
    with pytest.raises(AssertionError):
        check_images(broken, substitute(broken, env), env)
    broken = copy.deepcopy(raw_compose)
    broken["services"]["pg1"]["ports"] = ["${PG9_PORT}:5432"]
    with pytest.raises(AssertionError):
        check_env_references(broken, env)


def test_env_drift_is_caught(env):
    text = ENV_FILE.read_text(encoding="utf-8")
    for broken in (
        {**env, "PG2_PORT": "5440"},
        {**env, "EXTRA": "1"},
        {**env, IMAGE_VAR: "bitnami/postgresql:latest"},
        {k: v for k, v in env.items() if k != "POSTGRESQL_REPLICATION_USER"},
    ):
        with pytest.raises(AssertionError):
            check_env(broken, text)


def test_dockerfile_drift_is_caught(pyproject):
    text = DOCKERFILE.read_text(encoding="utf-8")
    for old, new in (
        ("USER pypool", "USER root"),
        ("pip install .)", "pip install .[test])"),
        ("pip install .)", "pip install pypool)"),
        ("'.[speedups]' || pip install .", "'.[speedups]'"),
        ("FROM python:3.11-slim", "FROM python:3.12"),
        ('ENTRYPOINT ["pypool"]', 'ENTRYPOINT ["python", "-m", "pypool"]'),
    ):
        assert old in text, old
        with pytest.raises(AssertionError):
            check_dockerfile(dockerfile_instructions(text.replace(old, new)), pyproject)
    no_user = "\n".join(line for line in text.splitlines() if not line.startswith("USER"))
    with pytest.raises(AssertionError):
        check_dockerfile(dockerfile_instructions(no_user), pyproject)


def test_cmd_drift_is_caught(compose):
    text = DOCKERFILE.read_text(encoding="utf-8").replace(
        'CMD ["/etc/pypool/pgcat.toml"]', 'CMD ["/etc/pgcat/pgcat.toml"]')
    with pytest.raises(AssertionError):
        check_config_mount(compose, dockerfile_instructions(text))


def test_prometheus_drift_is_caught(compose, config, dockerfile):
    with pytest.raises(AssertionError):
        check_prometheus(compose, config, {"scrape_configs": [
            {"job_name": "pypool", "static_configs": [{"targets": ["pypool:9090"]}]}]}, dockerfile)


# --------------------------------------------------------------- Grafana

GRAFANA_DASHBOARD = DOCKER / "grafana" / "dashboards" / "pypool.json"


def exported_sample_names() -> set[str]:
    """Every sample name /metrics can serve, from a snapshot with one primary and one lagging replica."""
    from pypool.metrics import render_families
    from pypool.snapshot import AddressStats, PoolStatsRow, RouterStats, Snapshot

    def address(port: int, role: str) -> AddressStats:
        return AddressStats(pool="p", user="u", host="h", port=port, database="d", role=role, index=0, name="n",
                            pool_mode="transaction", pool_size=1, min_pool_size=0, lag_seconds=0.5)

    snap = Snapshot(addresses=[address(1, "primary"), address(2, "replica")],
                    pools=[PoolStatsRow("p", "u", "transaction")], routers=[RouterStats("p", decisions={"any": 1})])
    return {s.name for family in render_families(snap, {}) for s in family.samples}


def dashboard_metric_names(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return {name for expr in exprs for name in re.findall(r"\b(pypool_[a-z_]+|pgcat_[a-z_]+)\b", expr)}


def test_grafana_dashboard_queries_exported_metrics():
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text(encoding="utf-8"))
    used = dashboard_metric_names(dashboard)
    assert len(used) >= 10, used
    missing = used - exported_sample_names()
    assert not missing, f"the dashboard queries metrics pypool does not export: {sorted(missing)}"
    broken = copy.deepcopy(dashboard)
    broken["panels"][0]["targets"][0]["expr"] = "rate(pypool_transactions[1m])"  # the name without _total
    assert dashboard_metric_names(broken) - exported_sample_names() == {"pypool_transactions"}


# ------------------------------------------------- Grafana in Compose

GRAFANA_PROVISIONING = DOCKER / "grafana" / "provisioning"
# The data source uid PgCat's dashboard (grafana_dashboard.json in its repository) names in every panel.
PGCAT_DATASOURCE_UID = "fdwe81suzec5ce"
# The series PgCat's dashboard queries (names only; the dashboard is fetched, not copied).
PGCAT_DASHBOARD_METRICS = {
    "pgcat_servers_transaction_count", "pgcat_servers_query_count", "pgcat_stats_avg_query_time",
    "pgcat_stats_avg_xact_time", "pgcat_servers_bytes_received", "pgcat_servers_bytes_sent",
    "pgcat_servers_active_count", "pgcat_databases_pool_size", "pgcat_pools_cl_waiting", "pgcat_servers_is_banned",
    "pgcat_servers_is_paused", "pgcat_pools_maxwait", "pgcat_pools_maxwait_us", "pgcat_servers_idle_count",
    "pgcat_servers_login_count", "pgcat_servers_tested_count", "pgcat_pools_cl_idle", "pgcat_pools_cl_active",
    "pgcat_databases_current_connections",
}


def _yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def check_grafana(compose: dict, datasources: dict, providers: dict) -> None:
    services = compose["services"]
    grafana, fetcher = services["grafana"], services["pgcat-dashboard"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), \
        f"pin Grafana to a release: {grafana['image']}"
    mounts = {target: source for source, target, _ in volume_mounts(grafana)}
    assert (DOCKER / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING.resolve()
    # The data source is the Compose file's Prometheus, under the uid PgCat's dashboard names.
    [source] = datasources["datasources"]
    prometheus_port = next(target for _, target in published_ports(services["prometheus"]))
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{prometheus_port}", source
    assert source["uid"] == PGCAT_DATASOURCE_UID and source.get("isDefault") is True
    # Both dashboards are mounted under the folder the provider reads.
    [provider] = providers["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    under = {target: source for target, source in mounts.items() if PurePosixPath(target).is_relative_to(folder)}
    pypool_dir = [t for t, s in under.items() if is_bind_source(s) and (DOCKER / s).resolve() == GRAFANA_DASHBOARD.parent]
    assert pypool_dir, f"pypool's dashboards ({GRAFANA_DASHBOARD.parent}) are not mounted under {folder}"
    volume_targets = {t: s for t, s in under.items() if not is_bind_source(s)}
    assert volume_targets, f"no volume with PgCat's dashboard under {folder}"
    # The fetcher writes PgCat's dashboard, from a pinned commit, into that volume.
    [volume] = volume_targets.values()
    fetch_dir = next(t for s, t, _ in volume_mounts(fetcher) if s == volume)
    script = " ".join(fetcher["entrypoint"])
    match = re.search(r"curl -fsSL -o (\S+) (https://raw\.githubusercontent\.com/postgresml/pgcat/([0-9a-f]{40})/"
                      r"grafana_dashboard\.json)", script)
    assert match, f"pgcat-dashboard must fetch PgCat's dashboard from a pinned commit: {script}"
    assert PurePosixPath(match.group(1)).parent == PurePosixPath(fetch_dir)
    assert "||" in script, "no network must not stop Grafana from starting"
    waits = grafana.get("depends_on") or {}
    assert waits.get("pgcat-dashboard", {}).get("condition") == "service_completed_successfully"
    assert "prometheus" in waits


def test_grafana_provisions_both_dashboards_on_prometheus(compose):
    check_grafana(compose, _yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"),
                  _yaml(GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml"))


def test_pgcat_dashboard_queries_exported_metrics():
    missing = PGCAT_DASHBOARD_METRICS - exported_sample_names()
    assert not missing, f"PgCat's dashboard queries metrics pypool does not export: {sorted(missing)}"


@pytest.mark.parametrize("name", ["datasource uid", "datasource url", "provider path", "unpinned fetch",
                                  "no fallback", "grafana does not wait"])
def test_grafana_drift_is_caught(name, compose):
    datasources = _yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")
    providers = _yaml(GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml")
    broken = copy.deepcopy(compose)
    fetch = broken["services"]["pgcat-dashboard"]["entrypoint"]
    if name == "datasource uid":
        datasources["datasources"][0]["uid"] = "prometheus"
    elif name == "datasource url":
        datasources["datasources"][0]["url"] = "http://localhost:9090"
    elif name == "provider path":
        providers["providers"][0]["options"]["path"] = "/etc/dashboards"
    elif name == "unpinned fetch":
        fetch[2] = re.sub(r"/[0-9a-f]{40}/", "/main/", fetch[2])
    elif name == "no fallback":
        fetch[2] = fetch[2].split("||")[0]
    else:
        del broken["services"]["grafana"]["depends_on"]["pgcat-dashboard"]
    with pytest.raises((AssertionError, KeyError, StopIteration)):
        check_grafana(broken, datasources, providers)
