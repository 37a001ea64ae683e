"""The deployment files (deploy/) are valid and say what the CLI really does.

- the systemd unit passes
  `systemd-analyze verify` with nothing at all on stderr (it exits 0 on a
  misspelled key, printing only a warning);
- the core Kubernetes objects pass `kubernetes-validate --strict` for the
  oldest Kubernetes the manifests support and the newest the package knows;
  the Prometheus Operator objects pass the operator's API schema, from the
  npm package pinned in deploy/kubernetes/validate;
- every flag, port, path, image tag and capability in them is the one the
  CLI (tracer.cli.build_parser, tracer.serve) and the other files use.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tracer import __version__
from tracer.cli import build_parser
from tracer.errors import (EXIT_HEADERS, EXIT_KERNEL_VERSION, EXIT_PRIVILEGES, EXIT_TRACEPOINT,
                           EXIT_USAGE)
from tracer.prereq import DEFAULT_TRACEFS
from tracer.program import DEFAULT_SOCKET_TABLE_SIZE
from tracer.serve_maps import map_bytes
from tracer.http_server import DEFAULT_PORT, HEALTH_PATH, parse_listen_address

from .deploy_files import (
    CONTAINERFILE,
    ENTRYPOINT,
    KUBERNETES_DIR,
    KUSTOMIZATION,
    ROOT,
    RUN_AS_USER,
    SYSUSERS,
    UNIT,
    capabilities,
    containerfile_instructions,
    daemonset_capabilities,
    daemonset_container,
    environment,
    environment_file_examples,
    exec_start,
    manifest,
    manifest_files,
    manifests,
    run_as_words,
    unit_entries,
    unit_values,
)

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))
INSTALLED_TCPSTATE = "/opt/tcpstate/bin/tcpstate"
OPERATOR_GROUP = "monitoring.coreos.com"
# appArmorProfile (securityContext) exists from Kubernetes 1.30 on.
OLDEST_KUBERNETES = "1.30"
VALIDATOR_DIR = KUBERNETES_DIR / "validate"


def _needed(tool: str, reason: str) -> None:
    message = f"{tool} is missing: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None and os.geteuid() == 0:
        # Debian's systemd package brings it; it needs no running systemd.
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                       capture_output=True, check=False, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("systemd-analyze")
    if path is None:
        _needed("systemd-analyze", "install Debian's systemd package")
    return path


def _verify(systemd_analyze: str, tmp_path: Path, drop_ins: list[Path]):
    """systemd-analyze verify on a copy of the unit whose ExecStart points at
    this checkout's tcpstate (verify insists the binary exists), with the
    drop-ins in tcpstate.service.d/ beside it, where verify reads them."""
    text = UNIT.read_text()
    assert text.count(INSTALLED_TCPSTATE) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_TCPSTATE, TCPSTATE))
    drop_in_dir = tmp_path / f"{UNIT.name}.d"
    drop_in_dir.mkdir()
    for drop_in in drop_ins:
        shutil.copy(drop_in, drop_in_dir / drop_in.name)
    return subprocess.run([systemd_analyze, "verify", str(unit)],
                          capture_output=True, text=True, timeout=120)


def test_unit_verifies_without_a_word(systemd_analyze, tmp_path):
    result = _verify(systemd_analyze, tmp_path, [])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_does_report_a_misspelled_key(systemd_analyze, tmp_path):
    """The check above can fail: a typo costs only a warning, but a warning
    on stderr."""
    typo = tmp_path / "typo.conf"
    typo.write_text("[Service]\nProtectSytem=strict\n")
    (tmp_path / "unit").mkdir()
    result = _verify(systemd_analyze, tmp_path / "unit", [typo])
    assert result.returncode == 0  # the exit code says nothing
    assert "ProtectSytem" in result.stderr


def _serve_flags() -> set[str]:
    """The option strings `tcpstate serve --help` lists."""
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    return set(re.findall(r"--[a-z][\w.-]*[\w]", help_text.getvalue()))


def parse_serve(argv: list[str]):
    """argparse takes an unambiguous prefix of a flag: require the full one.
    --run-as looks its user up while parsing: the dedicated user becomes one
    every host has."""
    assert argv[0] == "serve"
    for word in argv[1:]:
        if word.startswith("--"):
            assert word.partition("=")[0] in _serve_flags(), word
    dedicated = f"--run-as={RUN_AS_USER}"
    argv = ["--run-as=nobody" if word == dedicated else word for word in argv]
    return build_parser().parse_args(argv)


def _unit_argv(extra_args: str, drop_ins: tuple[Path, ...] = ()) -> list[str]:
    entries = unit_entries(UNIT, *drop_ins)
    return exec_start(entries, {**environment(entries), "TCPSTATE_ARGS": extra_args})


@pytest.mark.parametrize("extra_args", environment_file_examples())
def test_unit_command_line_is_real_flags(extra_args):
    argv = _unit_argv(extra_args)
    assert argv[0] == INSTALLED_TCPSTATE
    args = parse_serve(argv[1:])
    assert not args.dry_run
    assert parse_listen_address(args.listen_address)[1] == DEFAULT_PORT


def test_unit_gives_up_only_on_errors_that_retrying_cannot_heal():
    (codes,) = unit_values(unit_entries(UNIT), "RestartPreventExitStatus")
    assert {int(code) for code in codes.split()} == {
        EXIT_USAGE, EXIT_PRIVILEGES, EXIT_HEADERS, EXIT_TRACEPOINT, EXIT_KERNEL_VERSION}
    assert unit_values(unit_entries(UNIT), "Restart") == ["on-failure"]


def test_unit_reload_sends_sighup_which_serve_takes_as_reread_the_web_config():
    (reload,) = unit_values(unit_entries(UNIT), "ExecReload")
    assert reload.split() == ["/bin/kill", "-HUP", "$MAINPID"]
    import tracer.serve

    assert signal.SIGHUP in tracer.serve._CONTROL_SIGNALS


def test_environment_file_sets_the_variable_the_unit_reads():
    assert environment_file_examples()[-1] == ""  # the shipped default: no flags
    assert len(environment_file_examples()) > 1
    (command,) = unit_values(unit_entries(UNIT), "ExecStart")
    assert "$TCPSTATE_ARGS" in command.split()
    assert unit_values(unit_entries(UNIT), "EnvironmentFile") == ["-/etc/default/tcpstate"]


def test_unit_runs_as_the_dedicated_user_by_default():
    argv = _unit_argv("")
    assert run_as_words(argv) == [f"--run-as={RUN_AS_USER}"]
    assert parse_serve(argv[1:]).run_as is not None
    assert f"u {RUN_AS_USER} " in SYSUSERS.read_text()
    # the environment file may turn it off (systemd: EnvironmentFile= wins)
    entries = unit_entries(UNIT)
    assert [key for _, key, _ in entries].index("Environment") < [
        key for _, key, _ in entries].index("EnvironmentFile")
    assert environment_file_examples("TCPSTATE_RUN_AS") == [""]
    kept_root = exec_start(entries, {**environment(entries), "TCPSTATE_RUN_AS": ""})
    assert run_as_words(kept_root) == []


def test_unit_bounding_set_holds_what_the_drop_needs_and_no_ptrace():
    unit = capabilities(unit_entries(UNIT))
    assert {"CAP_SETPCAP", "CAP_SETGID", "CAP_SETUID"} <= unit
    assert "CAP_SYS_PTRACE" not in unit  # /proc/PID/net needs no ptrace access
    assert unit_values(unit_entries(UNIT), "AmbientCapabilities") == []


def test_daemonset_grants_the_unit_capabilities_but_sys_admin():
    """One measured list (tests/kernel/test_least_privilege.py proves it);
    CAP_SYS_ADMIN reaches `ip netns` namespaces, and the pod sees no host
    /run/netns."""
    assert daemonset_capabilities() == capabilities(unit_entries(UNIT)) - {"CAP_SYS_ADMIN"}
    assert daemonset_container()["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"] for mount in daemonset_container()["volumeMounts"]}
    assert not any(path.startswith(("/run", "/var/run")) for path in mounts)


def test_daemonset_and_image_run_as_the_image_user_without_unconfined_apparmor():
    assert run_as_words(daemonset_container()["args"]) == [f"--run-as={RUN_AS_USER}"]
    cmd = json.loads(dict(containerfile_instructions())["CMD"])
    assert run_as_words(cmd) == [f"--run-as={RUN_AS_USER}"]
    (run,) = [arguments for keyword, arguments in containerfile_instructions()
              if keyword == "RUN"]
    assert re.search(rf"useradd --system .*\b{RUN_AS_USER}\b", run)
    security = daemonset_container()["securityContext"]
    assert security["appArmorProfile"] == {"type": "RuntimeDefault"}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_readme_runs_as_a_dedicated_user_not_nobody():
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"--run-as[ =]+nobody", readme)
    assert f"--run-as={RUN_AS_USER}" in readme or f"--run-as {RUN_AS_USER}" in readme


# ---- Kubernetes --------------------------------------------------------------------


def _core_objects() -> list[dict]:
    return [m for m in manifests() if not m["apiVersion"].startswith(OPERATOR_GROUP)]


def _operator_objects() -> list[dict]:
    return [m for m in manifests() if m["apiVersion"].startswith(OPERATOR_GROUP)]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_core_objects_validate_strictly(version):
    objects = _core_objects()
    assert {o["kind"] for o in objects} == {
        "Namespace", "ServiceAccount", "DaemonSet", "Service"}
    for document in objects:
        kubernetes_validate.validate(document, version, strict=True)


def test_strict_validation_rejects_an_unknown_field():
    daemonset = manifest("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostPid"):
        kubernetes_validate.validate(daemonset, OLDEST_KUBERNETES, strict=True)


@pytest.fixture(scope="session")
def operator_validator() -> list[str]:
    """node with the npm package pinned in deploy/kubernetes/validate
    (`make setup-test` installs it; installed here if it is not)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _needed("node/npm", "the Prometheus Operator schema comes from npm")
    if not (VALIDATOR_DIR / "node_modules" / "@kubernetes-models" / "prometheus-operator").is_dir():
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(VALIDATOR_DIR)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    return [node, str(VALIDATOR_DIR / "validate.mjs")]


def _validate_operator_objects(validator: list[str], objects: list[dict]):
    return subprocess.run(validator, input=json.dumps(objects), capture_output=True,
                          text=True, timeout=120)


def test_operator_objects_validate_against_the_operator_schema(operator_validator):
    objects = _operator_objects()
    assert [o["kind"] for o in objects] == ["ServiceMonitor"]
    result = _validate_operator_objects(operator_validator, objects)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok ServiceMonitor/tcpstate"]


def test_operator_schema_rejects_a_bad_relabeling(operator_validator):
    (monitor,) = _operator_objects()
    monitor["spec"]["endpoints"][0]["relabelings"][0]["action"] = "copy"
    result = _validate_operator_objects(operator_validator, [monitor])
    assert result.returncode == 1
    assert "relabelings/0/action" in result.stdout


def test_daemonset_command_line_port_and_probes_match_the_cli():
    container = daemonset_container()
    args = parse_serve(container["args"])
    assert not args.dry_run
    assert parse_listen_address(args.listen_address)[1] == DEFAULT_PORT
    (port,) = container["ports"]
    assert port["containerPort"] == port["hostPort"] == DEFAULT_PORT
    probes = {name: container[name]["httpGet"] for name in
              ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {probe["port"] for probe in probes.values()} == {port["name"]}
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == HEALTH_PATH
    assert probes["readinessProbe"]["path"] == args.telemetry_path


def test_daemonset_runs_on_every_node_in_the_host_namespaces():
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["hostPID"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == manifest("ServiceAccount")["metadata"]["name"]
    security = daemonset_container()["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False


def test_daemonset_mounts_what_tcpstate_reads_and_writes():
    """tracefs from the host; with a read-only root file system, writable
    /lib/modules (the entrypoint's header links) and /tmp (bcc's compiler
    output)."""
    pod = manifest("DaemonSet")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in daemonset_container()["volumeMounts"]}
    assert set(mounts) == {DEFAULT_TRACEFS, "/lib/modules", "/tmp"}
    tracefs = volumes[mounts[DEFAULT_TRACEFS]["name"]]
    assert tracefs["hostPath"]["path"] == DEFAULT_TRACEFS and mounts[DEFAULT_TRACEFS]["readOnly"]
    assert daemonset_container()["securityContext"]["readOnlyRootFilesystem"]
    for path in ("/lib/modules", "/tmp"):
        assert "emptyDir" in volumes[mounts[path]["name"]]
    assert "TCPSTATE_MODULES_DIR:-/lib/modules" in ENTRYPOINT.read_text()


LOADER_PEAK_MIB, SERVER_PEAK_MIB, SERVER_RSS_MIB = 180, 56, 41  # the manifest's header


def test_memory_limit_covers_the_loader_the_server_and_the_maps():
    """The DaemonSet's formula: limit >= loader peak + server + maps, on a
    64-CPU node without --service-ports; request >= server + maps here."""
    resources = daemonset_container()["resources"]
    mebibytes = {kind: int(resources[kind]["memory"].removesuffix("Mi"))
                 for kind in ("requests", "limits")}
    maps = map_bytes(64, 1, DEFAULT_SOCKET_TABLE_SIZE) / 2**20
    assert mebibytes["limits"] >= LOADER_PEAK_MIB + SERVER_PEAK_MIB + maps
    assert mebibytes["requests"] >= SERVER_RSS_MIB + map_bytes(2, 1, DEFAULT_SOCKET_TABLE_SIZE) / 2**20
    assert mebibytes["requests"] <= mebibytes["limits"]
    header = (KUBERNETES_DIR / "daemonset.yaml").read_text()
    for figure in (LOADER_PEAK_MIB, SERVER_PEAK_MIB, SERVER_RSS_MIB):
        assert f"{figure} MiB" in header


def test_service_and_monitor_select_the_daemonset_pods():
    pod_labels = manifest("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    selector = manifest("DaemonSet")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service, monitor = manifest("Service"), manifest("ServiceMonitor")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (service_port,) = service["spec"]["ports"]
    (container_port,) = daemonset_container()["ports"]
    assert service_port["port"] == DEFAULT_PORT
    assert service_port["targetPort"] == service_port["name"] == container_port["name"]
    namespaces = {m["metadata"].get("namespace") for m in manifests() if m["kind"] != "Namespace"}
    assert namespaces == {manifest("Namespace")["metadata"]["name"]}
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == list(namespaces)


def test_monitor_sets_instance_to_the_node_name():
    (endpoint,) = manifest("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == manifest("Service")["spec"]["ports"][0]["name"]
    assert endpoint["path"] == parse_serve(daemonset_container()["args"]).telemetry_path
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "instance",
            "action": "replace"} in endpoint["relabelings"]


def test_image_tag_is_the_package_version():
    assert daemonset_container()["image"] == f"tcpstate:{__version__}"
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["images"] == [{"name": "tcpstate", "newTag": __version__}]
    assert f"-t tcpstate:{__version__} ." in CONTAINERFILE.read_text()


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert sorted(kustomization["resources"]) == [path.name for path in manifest_files()]


# ---- the container recipe ------------------------------------------------------------


def test_container_recipe_runs_the_setup_script():
    instructions = containerfile_instructions()
    (run,) = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert "TCPSTATE_IMAGE_BUILD=1 /src/deploy/setup.sh system" in run
    assert '"${TCPSTATE_IMAGE_BUILD:-}"' in (ROOT / "deploy" / "setup.sh").read_text()
    venv = str(Path(INSTALLED_TCPSTATE).parents[1])
    assert f"-m venv --system-site-packages {venv}" in run
    assert f"{venv}/bin/pip install" in run
    copied = [arguments.split()[:-1] for keyword, arguments in instructions if keyword == "COPY"]
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), source
    usage = subprocess.run(["bash", str(ROOT / "deploy" / "setup.sh"), "no-such-mode"],
                           capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "system" in usage.stderr


def test_container_runs_tcpstate_with_real_flags_on_the_default_port():
    instructions = dict(containerfile_instructions())
    assert instructions["EXPOSE"] == str(DEFAULT_PORT)
    assert json.loads(instructions["ENTRYPOINT"]) == ["/usr/local/bin/tcpstate-entrypoint"]
    args = parse_serve(json.loads(instructions["CMD"]))
    assert parse_listen_address(args.listen_address)[1] == DEFAULT_PORT
    assert f"PATH={Path(INSTALLED_TCPSTATE).parent}:" in instructions["ENV"]


def test_entrypoint_links_the_image_headers_for_the_running_kernel(tmp_path):
    env = {**os.environ, "TCPSTATE_MODULES_DIR": str(tmp_path),
           "PATH": f"{Path(TCPSTATE).parent}:{os.environ['PATH']}"}
    first = subprocess.run([str(ENTRYPOINT), "--version"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"tcpstate {__version__}"
    modules = tmp_path / os.uname().release
    assert (modules / "build" / "include" / "generated").is_dir(), first.stderr
    assert (modules / "source" / "include" / "linux" / "kconfig.h").is_file()
    assert "using the image's headers linux-headers-" in first.stderr
    again = subprocess.run([str(ENTRYPOINT), "--version"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert again.returncode == 0 and again.stderr == ""
