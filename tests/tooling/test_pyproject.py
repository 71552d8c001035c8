"""pyproject.toml is valid for the Comfy Registry (registry.comfy.org / ComfyUI-Manager), offline.

Rule sources (read 2026-08; cited per check below):
  [DOCS]    https://docs.comfy.org/registry/specifications  (repo Comfy-Org/docs, registry/specifications.mdx)
  [CLI]     Comfy-Org/comfy-cli, comfy_cli/registry/config_parser.py (extract_node_configuration,
            validate_version, validate_and_extract_*_classifiers) and
            comfy_cli/command/custom_nodes/command.py (validate_node_for_publishing: what
            `comfy node validate` / `comfy node publish` check locally)
  [BACKEND] Comfy-Org/registry-backend, mapper/node.go (IsValidNodeID, ValidateNode) and
            mapper/publisher.go (IsValidPublisherID): what the Registry rejects on publish
  [SEMVER]  https://semver.org/#is-there-a-suggested-regular-expression-regex-to-check-a-semver-string

Each check is a small validator returning a list of problems; the validators are run on the
repo's real pyproject.toml and, in `test_validators_reject_bad_examples`, on known-bad values, so
every rule is shown to be able to fail. Stdlib only (tomllib, re, struct).
"""
from __future__ import annotations

import re
import struct
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
REQUIREMENTS = REPO / "requirements.txt"


def load() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def data() -> dict:
    return load()


@pytest.fixture(scope="module")
def project(data) -> dict:
    assert isinstance(data.get("project"), dict), "[project] table missing"
    return data["project"]


@pytest.fixture(scope="module")
def comfy(data) -> dict:
    tool = data.get("tool")
    assert isinstance(tool, dict) and isinstance(tool.get("comfy"), dict), "[tool.comfy] table missing"
    return tool["comfy"]


# ------------------------------------------------------------------------------------------------
# Validators
# ------------------------------------------------------------------------------------------------

# [DOCS] name: < 100 characters; only alphanumerics, hyphens, underscores, periods; no consecutive
# special characters; cannot start with a number or a special character; compared
# case-insensitively. [BACKEND] IsValidNodeID: 1..100 chars, ^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$
# (so also no trailing special character), and the registry stores ids lowercased (normalizeNodeID).
# This pack keeps the id lowercase so pyproject's name is exactly the id the registry shows.
NODE_ID_RE = re.compile(r"[a-z][a-z0-9]*(?:[._-][a-z0-9]+)*")


def check_name(name) -> list[str]:
    if not isinstance(name, str) or not name:
        return ["project.name must be a non-empty string"]
    problems = []
    if len(name) >= 100:
        problems.append(f"project.name is {len(name)} chars; must be < 100 [DOCS]")
    if not NODE_ID_RE.fullmatch(name):
        problems.append(
            f"project.name {name!r}: lowercase letters/digits separated by single '-', '_' or '.', "
            "starting with a letter and not ending with a separator [DOCS][BACKEND]")
    return problems


# [DOCS] version: semantic versioning X.Y.Z. [CLI] validate_node_for_publishing exits 1 on an
# empty version; [BACKEND] checks it with a semver parser. Official regex from [SEMVER].
SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?")


def check_version(version) -> list[str]:
    if not isinstance(version, str) or not version.strip():
        return ["project.version must be a non-empty string (static; [CLI] exits 1 on empty)"]
    if version != version.strip() or not SEMVER_RE.fullmatch(version):
        return [f"project.version {version!r} is not semver X.Y.Z [DOCS][SEMVER]"]
    return []


def check_description(desc) -> list[str]:
    # [DOCS] description recommended; [BACKEND] ValidateNode: "description is too long" past 1000.
    if not isinstance(desc, str) or not desc.strip():
        return ["project.description should be a non-empty string [DOCS]"]
    if len(desc) > 1000:
        return [f"project.description is {len(desc)} chars; registry max is 1000 [BACKEND]"]
    return []


def check_license(lic, root: Path = REPO) -> list[str]:
    # [DOCS] license = { file = "LICENSE" } or { text = "MIT License" }; a bare string is marked
    # incorrect there. [CLI] warns on a table with neither key.
    if not isinstance(lic, dict) or not ({"file", "text"} & set(lic)):
        return [f'license must be {{ file = "..." }} or {{ text = "..." }}, got {lic!r} [DOCS][CLI]']
    if "file" in lic:
        f = lic["file"]
        if not isinstance(f, str) or not (root / f).is_file():
            return [f"license file {f!r} does not exist in the repo"]
    elif not isinstance(lic["text"], str) or not lic["text"].strip():
        return ["license text is empty"]
    return []


GITHUB_REPO_RE = re.compile(r"https://github\.com/([A-Za-z0-9-]+)/([A-Za-z0-9._-]+?)(?:\.git)?/?")


def check_urls(urls) -> list[str]:
    # [DOCS] "repository (required)": [project.urls] Repository; other urls recommended.
    if not isinstance(urls, dict):
        return ["[project.urls] table missing [DOCS]"]
    problems = []
    repo = urls.get("Repository")
    if not isinstance(repo, str) or not GITHUB_REPO_RE.fullmatch(repo):
        problems.append(f"project.urls.Repository must be https://github.com/OWNER/REPO, got {repo!r} [DOCS]")
    for key, value in urls.items():
        if not isinstance(value, str) or urlparse(value).scheme != "https" or not urlparse(value).netloc:
            problems.append(f"project.urls.{key} is not an https URL: {value!r}")
    return problems


# PEP 440 version specifiers (requires-python): comma-separated clauses.
PEP440_CLAUSE_RE = re.compile(
    r"\s*(~=|===|==|!=|<=|>=|<|>)\s*\d+(?:\.\d+)*(?:\.\*)?(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?\s*")


def check_pep440_specifier(spec, field: str) -> list[str]:
    if not isinstance(spec, str) or not spec.strip():
        return [f"{field} must be a non-empty version specifier"]
    if not all(PEP440_CLAUSE_RE.fullmatch(part) for part in spec.split(",")):
        return [f"{field} {spec!r} is not a PEP 440 version specifier"]
    return []


# [CLI] validate_version (used for requires-comfyui and comfyui-frontend-package): each
# comma-separated part is [operator]major.minor.patch[-suffix], operator one of
# == >= <= != ~= > < <> =; a non-matching value is DROPPED (warning, field not sent to the registry).
# [DOCS] lists the operators < > <= >= ~= <> != and ranges. Here a version is required in every part.
COMFY_VERSION_PART_RE = re.compile(r"(?:(==|>=|<=|!=|~=|<>|>|<|=)\s*)?\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?")


def check_comfy_version_spec(spec, field: str) -> list[str]:
    if not isinstance(spec, str) or not spec.strip():
        return [f"{field} must be a non-empty version spec"]
    parts = [p.strip() for p in spec.split(",")]
    if not all(COMFY_VERSION_PART_RE.fullmatch(p) for p in parts):
        return [f"{field} {spec!r}: each part must be [op]X.Y.Z[-suffix] or comfy-cli drops it [CLI][DOCS]"]
    return []


# [CLI] validate_and_extract_os_classifiers / validate_and_extract_accelerator_classifiers: one bad
# classifier makes comfy-cli drop all OS (resp. accelerator) information.
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}


def check_classifiers(classifiers) -> list[str]:
    if not isinstance(classifiers, list) or not all(isinstance(c, str) for c in classifiers):
        return ["project.classifiers must be a list of strings"]
    problems = []
    for c in classifiers:
        if c.startswith("Operating System :: "):
            if not c[len("Operating System :: "):].startswith(OS_PREFIXES):
                problems.append(f"OS classifier {c!r} not accepted by the registry [CLI]")
        elif c.startswith("Environment ::"):
            if c[len("Environment :: "):] not in ACCELERATORS:
                problems.append(f"Environment classifier {c!r} not one of the registry's accelerators [CLI]")
    return problems


# PEP 508 distribution name at the start of a requirement; PEP 503 normalisation.
REQ_NAME_RE = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[^\]]*\])?\s*(.*)")
# ComfyUI owns torch (README: "The pack never installs or pins torch"); a node pack that lists it
# can make ComfyUI-Manager reinstall torch with the wrong build.
FORBIDDEN_DEPS = {"torch", "torchvision", "torchaudio"}


def req_name(req: str) -> str:
    m = REQ_NAME_RE.fullmatch(req.strip())
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def read_requirements(path: Path) -> list[str]:
    # Same reading as [CLI] initialize_project_config: '#' starts a comment only at line start or
    # after whitespace; pip options (-r, -e, --index-url, ...) are not PEP 508 dependencies.
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", raw).strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def check_dependencies(deps, requirements: list[str]) -> list[str]:
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        return ["project.dependencies must be a static list of strings"]
    problems = []
    for d in deps:
        name = req_name(d)
        if not name:
            problems.append(f"dependency {d!r} is not a PEP 508 requirement")
        elif name in FORBIDDEN_DEPS:
            problems.append(f"dependency {d!r}: torch is ComfyUI's, never the pack's")
        elif name == "comfyui-frontend-package":
            # [DOCS] frontend compatibility pin; [CLI] validates it with validate_version.
            problems += check_comfy_version_spec(d.strip()[len("comfyui-frontend-package"):].strip(),
                                                 "comfyui-frontend-package")
    if len({req_name(d) for d in deps}) != len(deps):
        problems.append(f"duplicate dependencies in {deps!r}")
    norm = lambda reqs: sorted(re.sub(r"\s+", "", r) for r in reqs)  # noqa: E731
    if norm(deps) != norm(requirements):
        problems.append(f"project.dependencies {deps!r} != requirements.txt {requirements!r}")
    return problems


# [BACKEND] IsValidPublisherID: ^[a-z][a-z0-9-]*$ ; [DOCS] PublisherId required.
PUBLISHER_RE = re.compile(r"[a-z][a-z0-9-]*")


def check_publisher(pid) -> list[str]:
    if not isinstance(pid, str) or not PUBLISHER_RE.fullmatch(pid):
        return [f"tool.comfy.PublisherId {pid!r} must match ^[a-z][a-z0-9-]*$ [DOCS][BACKEND]"]
    return []


def check_display_name(name) -> list[str]:
    # [DOCS] optional; required by this project so the Registry/Manager list a readable name.
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        return [f"tool.comfy.DisplayName must be a non-empty string (<= 100 chars), got {name!r}"]
    return []


# [DOCS] Icon / Banner: "File types: SVG, PNG, JPG, or GIF".
IMAGE_EXTS = (".svg", ".png", ".jpg", ".jpeg", ".gif")
RAW_GH_RE = re.compile(r"/([^/]+)/([^/]+)/([^/]+)/(.+)")  # /OWNER/REPO/REF/PATH on raw.githubusercontent.com


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF or JPEG from its header; None for other formats."""
    b = path.read_bytes()
    if b[:8] == b"\x89PNG\r\n\x1a\n" and b[12:16] == b"IHDR":
        return struct.unpack(">II", b[16:24])
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return struct.unpack("<HH", b[6:10])
    if b[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(b):
            if b[i] != 0xFF:
                i += 1
                continue
            marker = b[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", b[i + 5:i + 9])
                return w, h
            i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
    return None


def image_kind(path: Path) -> str:
    b = path.read_bytes()[:512]
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if b[:2] == b"\xff\xd8":
        return ".jpg"
    if b"<svg" in b:
        return ".svg"
    return "?"


def check_image_url(url, field: str, repo_url: str, root: Path = REPO) -> list[str]:
    if not isinstance(url, str) or not url:
        return [f"tool.comfy.{field} must be a non-empty URL"]
    u = urlparse(url)
    if u.scheme != "https" or not u.netloc:
        return [f"tool.comfy.{field} {url!r} must be an https URL"]
    ext = Path(u.path).suffix.lower()
    if ext not in IMAGE_EXTS:
        return [f"tool.comfy.{field} {url!r} must end in one of {IMAGE_EXTS} [DOCS]"]
    gh = GITHUB_REPO_RE.fullmatch(repo_url or "")
    m = RAW_GH_RE.fullmatch(u.path)
    if u.netloc != "raw.githubusercontent.com" or not gh or not m:
        return []  # hosted elsewhere: nothing to check offline
    if (m.group(1).lower(), m.group(2).lower()) != (gh.group(1).lower(), gh.group(2).lower()):
        return []  # another repository's file
    local = root / m.group(4)
    if not local.is_file():
        return [f"tool.comfy.{field} names {m.group(4)!r} (ref {m.group(3)}), which is not in the repo"]
    kind = image_kind(local)
    if kind != (".jpg" if ext == ".jpeg" else ext):
        return [f"{m.group(4)} is {kind} content but its URL ends in {ext}"]
    size = image_size(local)
    if field == "Icon" and size is not None:
        # [DOCS] Icon: "Maximum resolution: 400px x 400px", "Aspect ratio should be square".
        w, h = size
        if w > 400 or h > 400 or w != h:
            return [f"icon {m.group(4)} is {w}x{h}; must be square and at most 400x400 [DOCS]"]
    if field == "Banner" and size is not None:
        # [DOCS] Banner: "Aspect ratio: 21:9".
        w, h = size
        if abs(w / h - 21 / 9) > 0.02:
            return [f"banner {m.group(4)} is {w}x{h}; aspect ratio must be 21:9 [DOCS]"]
    return []


def check_includes(includes, root: Path = REPO) -> list[str]:
    # [DOCS] includes = ['dist']: folders force-included in the published archive.
    # [CLI] passes the list through as-is; a missing folder would silently ship nothing.
    if not isinstance(includes, list) or not all(isinstance(p, str) and p for p in includes):
        return [f"tool.comfy.includes must be a list of folder names, got {includes!r}"]
    problems = []
    for p in includes:
        if Path(p).is_absolute() or ".." in Path(p).parts:
            problems.append(f"includes entry {p!r} must be relative and inside the repo")
        elif not (root / p).is_dir():
            problems.append(f"includes entry {p!r} is not a folder in the repo")
    return problems


# ------------------------------------------------------------------------------------------------
# The repo's pyproject.toml
# ------------------------------------------------------------------------------------------------

def test_parses_with_both_sections(data):
    # [DOCS] two main sections, [project] and [tool.comfy].
    assert isinstance(data.get("project"), dict)
    assert isinstance(data.get("tool", {}).get("comfy"), dict)


def test_name(project):
    assert check_name(project.get("name")) == []


def test_version_is_static_semver(project):
    assert "version" not in project.get("dynamic", []), "version must be static in pyproject.toml"
    assert check_version(project.get("version")) == []


def test_description(project):
    assert check_description(project.get("description")) == []


def test_license(project):
    assert check_license(project.get("license")) == []


def test_urls(project):
    assert check_urls(project.get("urls")) == []


def test_requires_python(project):
    # [DOCS] requires-python recommended; must be a valid specifier for pip to honour it.
    assert check_pep440_specifier(project.get("requires-python"), "requires-python") == []


def test_classifiers(project):
    assert check_classifiers(project.get("classifiers", [])) == []


def test_dependencies_match_requirements_and_no_torch(project):
    assert "dependencies" not in project.get("dynamic", []), "dependencies must be static"
    assert check_dependencies(project.get("dependencies"), read_requirements(REQUIREMENTS)) == []


def test_tool_comfy_required_keys(comfy):
    # PublisherId: required [DOCS]. DisplayName, Icon, requires-comfyui, includes: optional in
    # [DOCS] but this pack ships them, so they must be present and well-formed.
    missing = {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} - set(comfy)
    assert not missing, f"[tool.comfy] lacks {sorted(missing)}"
    assert check_publisher(comfy["PublisherId"]) == []
    assert check_display_name(comfy["DisplayName"]) == []


def test_icon(project, comfy):
    assert check_image_url(comfy.get("Icon"), "Icon", project.get("urls", {}).get("Repository", "")) == []


def test_includes_exist(comfy):
    assert check_includes(comfy.get("includes")) == []


def test_requires_comfyui(comfy):
    spec = comfy.get("requires-comfyui")
    assert check_comfy_version_spec(spec, "requires-comfyui") == []
    # It must also be a valid PEP 440 specifier (ComfyUI-Manager compares it with packaging);
    # comfy-cli's extra operators '<>' and bare '=' are not.
    assert check_pep440_specifier(spec, "requires-comfyui") == []


# ------------------------------------------------------------------------------------------------
# Every validator fails on known-bad input (so the checks above can fail)
# ------------------------------------------------------------------------------------------------

REPO_URL = "https://github.com/arcache/ComfyUI-ARCache"


@pytest.fixture
def fake_repo(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "workflows").mkdir()
    (tmp_path / "LICENSE").write_text("x")

    def png(name, w, h):
        # a minimal PNG header is enough for image_size / image_kind
        ihdr = struct.pack(">II", w, h) + b"\x08\x06\x00\x00\x00"
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4)

    png("docs/icon.png", 400, 400)
    png("docs/big.png", 512, 512)
    png("docs/wide.png", 400, 200)
    png("docs/banner.png", 2100, 900)
    (tmp_path / "docs/fake.png").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    return tmp_path


RAW = "https://raw.githubusercontent.com/arcache/ComfyUI-ARCache/main/"


@pytest.mark.parametrize("check, good, bads", [
    (check_name, "arcache", ["", "123-tool", "-x", "x-", "a--b", "a._b", "ComfyUI-enhancer", "a b",
                             "a@b", "a" * 100, 7]),
    (check_version, "0.1.0", ["", "1.0", "v1.0.0", "01.0.0", "1.0.0.0", " 1.0.0", None, 1]),
    (check_description, "Does things.", ["", "   ", None, "x" * 1001]),
    (lambda lic: check_license(lic), {"file": "LICENSE"},
     ["LICENSE", "MIT", {}, {"file": "NO_SUCH_FILE"}, {"text": ""}, None]),
    (check_urls, {"Repository": REPO_URL},
     [None, {}, {"Repository": "github.com/a/b"}, {"Repository": "https://gitlab.com/a/b"},
      {"Repository": REPO_URL, "Docs": "http://example.com"}]),
    (lambda s: check_pep440_specifier(s, "f"), ">=3.10", ["", "3.10", ">=3.10,", "=>3.10", ">= three"]),
    (lambda s: check_comfy_version_spec(s, "f"), ">=0.3.75",
     ["", ">=0.3", ">=", "latest", ">=0.3.75,", ">=0.3.75;<1.0.0", 3]),
    (check_classifiers, ["Operating System :: OS Independent", "Environment :: GPU :: NVIDIA CUDA"],
     [["Operating System :: Linux"], ["Environment :: GPU :: CUDA"], "Operating System :: OS Independent"]),
    (lambda d: check_dependencies(d, ["einops", "numpy"]), ["einops", "numpy"],
     [["einops"], ["einops", "numpy", "torch"], ["einops", "numpy", "torch>=2"], ["einops", "numpy", "Torch_Vision"],
      ["einops", "einops", "numpy"], ["einops", "numpy", "@@"], "einops numpy",
      ["einops", "numpy", "comfyui-frontend-package<=1.21"]]),
    (check_publisher, "arcache", ["", "ArCache", "1arcache", "ar_cache", "-ar", None]),
    (check_display_name, "ComfyUI-ARCache", ["", "  ", None, "x" * 101]),
])
def test_validators_reject_bad_examples(check, good, bads):
    assert check(good) == [], (good, check(good))
    for bad in bads:
        assert check(bad), f"accepted bad value {bad!r}"


def test_image_url_validator(fake_repo):
    ok = lambda url, field="Icon": check_image_url(url, field, REPO_URL, fake_repo)  # noqa: E731
    assert ok(RAW + "docs/icon.png") == []
    assert ok("https://example.com/some/icon.svg") == []            # elsewhere: only the form is checked
    assert ok(RAW + "docs/banner.png", "Banner") == []
    for bad in ["", None, "docs/icon.png", "http://example.com/icon.png", "https://example.com/icon.webp",
                "https://example.com/icon", RAW + "icon.png", RAW + "docs/big.png", RAW + "docs/wide.png",
                RAW + "docs/fake.png", RAW.replace("ComfyUI-ARCache", "comfyui-arcache") + "docs/missing.png"]:
        assert ok(bad), f"accepted bad Icon {bad!r}"
    assert ok(RAW + "docs/icon.png", "Banner"), "a square banner passed the 21:9 rule"


def test_includes_validator(fake_repo):
    assert check_includes(["workflows"], fake_repo) == []
    for bad in [["dist"], ["/etc"], ["../x"], "workflows", [""], [3], ["LICENSE"]]:
        assert check_includes(bad, fake_repo), f"accepted bad includes {bad!r}"


def test_real_icon_file_is_what_pyproject_names(comfy):
    """The icon the URL names is shipped here as a 400x400 PNG."""
    path = urlparse(comfy["Icon"]).path
    m = RAW_GH_RE.fullmatch(path)
    assert m, f"Icon is not a raw GitHub URL of this repo: {comfy['Icon']!r}"
    assert m.group(3) == "main", "Icon should point at branch main"
    local = REPO / m.group(4)
    assert image_kind(local) == ".png" and image_size(local) == (400, 400)
