"""Reads the deployment files under deploy/: the systemd unit with its
sysusers and environment files, the Kubernetes manifests and the container
recipe, as the tests of deploy/ (unit and kernel) need them."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD_DIR / "tcpstate.service"
SYSUSERS = SYSTEMD_DIR / "tcpstate.sysusers"
# The dedicated user the unit and the image's --run-as become once attached.
RUN_AS_USER = "tcpstate"
ENVIRONMENT_FILE = SYSTEMD_DIR / "tcpstate.default"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = KUBERNETES_DIR / "kustomization.yaml"
CONTAINER_DIR = ROOT / "deploy" / "container"
CONTAINERFILE = CONTAINER_DIR / "Containerfile"
ENTRYPOINT = CONTAINER_DIR / "entrypoint.sh"


def unit_entries(*paths: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of systemd unit files read in order, as
    systemd reads a unit and then its drop-ins."""
    entries = []
    for path in paths:
        section = ""
        for line in path.read_text().replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(entries: list[tuple[str, str, str]], key: str) -> list[str]:
    """Every value of `key`; an empty assignment resets the list, as for
    ExecStart= in a drop-in."""
    values: list[str] = []
    for _, name, value in entries:
        if name == key:
            values = values + [value] if value else []
    return values


def capabilities(entries: list[tuple[str, str, str]]) -> set[str]:
    """CapabilityBoundingSet lines are merged (OR) across a unit and its drop-ins."""
    return {cap for value in unit_values(entries, "CapabilityBoundingSet") for cap in value.split()}


def environment(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    found = {}
    for value in unit_values(entries, "Environment"):
        for word in shlex.split(value):
            key, _, assigned = word.partition("=")
            found[key] = assigned
    return found


def exec_start(entries: list[tuple[str, str, str]], variables: dict[str, str]) -> list[str]:
    """The command line systemd would run: a `$NAME` word becomes the
    variable's whitespace-separated words (none when unset)."""
    (command,) = unit_values(entries, "ExecStart")
    argv: list[str] = []
    for word in shlex.split(command):
        if word.startswith("$") and not word.startswith("${"):
            argv.extend(variables.get(word[1:], "").split())
        else:
            argv.append(word)
    return argv


def environment_file_examples(name: str = "TCPSTATE_ARGS") -> list[str]:
    """Every value given to `name` in the environment file, commented-out
    examples included."""
    values = []
    for line in ENVIRONMENT_FILE.read_text().splitlines():
        line = line.lstrip("#").strip()
        if line.startswith(f"{name}="):
            words = shlex.split(line.partition("=")[2])
            values.append(" ".join(words))
    return values


def run_as_words(argv: list[str]) -> list[str]:
    return [word for word in argv if word.startswith("--run-as")]


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES_DIR.glob("*.yaml") if path != KUSTOMIZATION)


def manifests() -> list[dict]:
    return [
        document
        for path in manifest_files()
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def manifest(kind: str) -> dict:
    (found,) = [document for document in manifests() if document["kind"] == kind]
    return found


def daemonset_container() -> dict:
    (container,) = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


def daemonset_capabilities() -> set[str]:
    added = daemonset_container()["securityContext"]["capabilities"]["add"]
    return {f"CAP_{name}" for name in added}


def containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions
