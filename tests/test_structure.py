"""The layout keeps its promises: light configs, conversion without Grain, small modules and functions."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("orbax", "grain", "tensorboard", "tensorflow")

# Data tables are long by nature; everything else stays readable in one sitting.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
DATA_TABLES = {"resnet_jax/imagenet_classes.py"}


def run_python(script: str) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter (so only what it imports is loaded), asserting it succeeds."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def library_modules() -> list[pathlib.Path]:
    return sorted(p for p in (REPO / "resnet_jax").rglob("*.py"))


@pytest.mark.parametrize(
    "config_file", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name
)
def test_importing_a_config_loads_no_checkpoint_data_or_tensorboard_stack(config_file):
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("recipe", {str(config_file)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.get_config()
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(",".join(heavy))
"""
    result = run_python(script)
    assert result.stdout.strip() == "", f"{config_file.name} imports {result.stdout.strip()}"


def test_no_library_module_or_function_is_too_long_to_read_in_one_sitting():
    too_long = []
    for path in library_modules():
        relative = path.relative_to(REPO).as_posix()
        source = path.read_text()
        if relative not in DATA_TABLES and len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{relative}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{relative}:{node.lineno} {node.name}(): {length} lines")
    assert not too_long, "split these: " + "; ".join(too_long)


def test_no_module_imports_a_private_name_from_another_module():
    offenders = []
    for path in library_modules():
        package = ".".join(path.relative_to(REPO).parent.parts)

        def own_private_module(module: str, name: str, path=path, package=package) -> bool:
            # A package's private module (a C extension such as data/_jpeg_region.c) serves its siblings.
            return module == package and any(
                (path.parent / f"{name}{suffix}").exists() for suffix in (".py", ".c")
            )

        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resnet_jax"):
                offenders += [
                    f"{path.relative_to(REPO)}: {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and not own_private_module(node.module, alias.name)
                ]
    assert not offenders, offenders


def test_the_gpu_benchmarks_modules_need_only_jax_flax_and_optax():
    # benchmarks/gpu.py runs the real train step on GPU machines whose image has jax, flax, optax and orbax
    # but no grain, ml_collections, tensorflow-datasets or simplejpeg: the step's modules must not need them.
    missing = ("grain", "ml_collections", "tensorflow_datasets", "simplejpeg")
    script = f"""
import sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {missing!r}:
            raise ImportError(f"{{name}} is not installed here")
sys.meta_path.insert(0, Missing())
from resnet_jax.models import create_model
from resnet_jax.parallel import DataParallel
from resnet_jax.steps import train_step
from resnet_jax.train_state import create_train_state, init_variables
"""
    run_python(script)
