"""The seam contract (feather_vllm/kv/seam_table.py, checked by
feather_vllm/kv/seams.py) and the version gate of
`feather_vllm.register()`: outside the supported vLLM range, or when a seam
does not hold, the plugin registers nothing and vLLM runs unchanged.

Checks against source trees use a copy of the installed vLLM's `.py` files
with one edit each (`_Tree`); the gate runs in fresh interpreters (other tests'
engines install the hooks in this process)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from feather_vllm.kv import seams

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(importlib.util.find_spec("vllm").origin).parents[1]  # the directory holding vllm/
RUNNER = "vllm.v1.worker.gpu_model_runner"


def _names(mismatches: list[str]) -> set[str]:
    return {m.split(": ", 1)[0] for m in mismatches}


def _run(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter; it prints one RESULT= json line."""
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")]
    return json.loads(line.removeprefix("RESULT="))


# -- the table against the installed vLLM ------------------------------------

def test_installed_vllm_holds_every_seam():
    from feather_vllm import compat

    compat.apply_all()  # vLLM's LLaVA module imports on this machine
    assert seams.check_installed() == []


def test_installed_source_tree_holds_every_seam():
    assert seams.check_source(SITE) == []


def test_seams_are_unique_and_in_vllm():
    assert len(set(seams.SEAMS)) == len(seams.SEAMS)
    assert all(s.module.split(".")[0] == "vllm" for s in seams.SEAMS)


_Seam = seams.Seam
BROKEN = [
    pytest.param(_Seam("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_block_ids", params=("self", "req")),
                 "leading parameters (self, req) expected, found (self, request_id)", id="leading-parameters"),
    pytest.param(_Seam("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", params=("self", "request"),
                       closed=True), "new required parameter num_new_tokens", id="closed"),
    pytest.param(_Seam("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots",
                       kwargs=("no_such_keyword",)), "no parameter no_such_keyword", id="keyword"),
    pytest.param(_Seam("vllm.v1.core.kv_cache_manager", "KVCacheManager.no_such_method"),
                 "has no attribute no_such_method", id="method"),
    pytest.param(_Seam("vllm.v1.worker.no_such_module", "GPUModelRunner"), "no_such_module", id="module"),
    pytest.param(_Seam("vllm.model_executor.models.llama", "LlamaModel", attrs=("layers", "no_such_attr")),
                 "no attribute no_such_attr", id="attribute-of-a-decorated-class"),
    pytest.param(_Seam("vllm.v1.core.sched.scheduler", "Scheduler._free_request", returns=3),
                 "not a 3-tuple", id="returns"),
    pytest.param(_Seam(RUNNER, "GPUModelRunner.execute_model",
                       calls=(("self._build_attention_metadata", ("no_such_keyword",)),)),
                 "no call to self._build_attention_metadata passes no_such_keyword=", id="calls"),
    pytest.param(_Seam("vllm.model_executor.models.llama", "LlamaAttention.forward", source=("q, k = k, q",)),
                 "source lacks `q, k = k, q`", id="source"),
]


@pytest.mark.parametrize(("seam", "message"), BROKEN)
@pytest.mark.parametrize("check", ["installed", "source"])
def test_both_checks_name_a_seam_that_does_not_hold(check, seam, message):
    from feather_vllm import compat

    compat.apply_all()
    found = seams.check_installed((seam,)) if check == "installed" else seams.check_source(SITE, (seam,))
    assert len(found) == 1 and found[0].startswith(f"{seam.name}: ") and message in found[0], found


# -- the table against edited source trees -----------------------------------

@pytest.fixture(scope="module")
def _tree_copy(tmp_path_factory) -> Path:
    """The installed vLLM's .py files (nothing else)."""
    root = tmp_path_factory.mktemp("vllm-src")

    def non_python(directory, names):
        return [n for n in names if not n.endswith(".py") and not os.path.isdir(os.path.join(directory, n))]

    shutil.copytree(SITE / "vllm", root / "vllm", ignore=non_python)
    return root


class _Tree:
    """A copied source tree whose edited files are restored afterwards."""

    def __init__(self, root: Path) -> None:
        self.root, self.saved = root, {}

    def edit(self, relpath: str, old: str | None, new: str | None) -> None:
        """Replace `old` by `new` in vllm/`relpath` (every occurrence); old=None deletes the file."""
        path = self.root / "vllm" / relpath
        text = path.read_text()
        self.saved.setdefault(path, text)
        if old is None:
            path.unlink()
            return
        assert old in text, f"{old!r} not in {relpath}: update this test's edit"
        path.write_text(text.replace(old, new))

    def restore(self) -> None:
        for path, text in self.saved.items():
            path.write_text(text)


@pytest.fixture
def tree(_tree_copy):
    copy = _Tree(_tree_copy)
    yield copy
    copy.restore()


_KVM = "vllm.v1.core.kv_cache_manager.KVCacheManager"

EDITS = [
    pytest.param("v1/worker/gpu_model_runner.py", None, None,
                 {s.name for s in seams.SEAMS if s.module == RUNNER}, id="v1-runner-deleted"),
    pytest.param("v1/core/kv_cache_manager.py", "def get_computed_blocks(self, request: Request)",
                 "def get_computed_blocks(self, req: Request)",
                 {f"{_KVM}.get_computed_blocks"}, id="leading-parameter-renamed"),
    pytest.param("v1/worker/gpu_model_runner.py", "        slot_mappings: dict[int, torch.Tensor] | None = None,",
                 "        slot_mappings_by_group: dict[int, torch.Tensor] | None = None,",
                 {f"{RUNNER}.GPUModelRunner._build_attention_metadata"}, id="keyword-parameter-renamed"),
    pytest.param("v1/core/kv_cache_manager.py", "def get_block_ids(self, request_id: str)",
                 "def get_block_ids(self, request_id: str, group: int)",
                 {f"{_KVM}.get_block_ids"}, id="new-required-parameter"),
    pytest.param("v1/core/sched/scheduler.py", "return kv_xfer_params, ec_xfer_params",
                 "return kv_xfer_params, ec_xfer_params, None",
                 {"vllm.v1.core.sched.scheduler.Scheduler._free_request"}, id="free-request-returns-3-tuple"),
    pytest.param("v1/core/single_type_kv_cache_manager.py", "self.req_to_blocks", "self.blocks_by_request",
                 {"vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager"}, id="instance-attribute-renamed"),
    pytest.param("v1/core/kv_cache_manager.py", "request.block_hashes, max_cache_hit_length",
                 "request.block_hashes, max_cache_hit_length=max_cache_hit_length",
                 {f"{_KVM}.get_computed_blocks"}, id="capped-call-by-keyword"),
    pytest.param("v1/worker/gpu_model_runner.py", "                    slot_mappings=slot_mappings_by_group,\n",
                 "", {f"{RUNNER}.GPUModelRunner.execute_model"}, id="step-call-without-slot-mappings"),
    # vLLM 0.33's change: an optional parameter our (forwarding) wrapper passes on.
    pytest.param("v1/core/kv_cache_manager.py", "def get_computed_blocks(self, request: Request)",
                 "def get_computed_blocks(self, request: Request, max_cache_hit_length: int | None = None)",
                 set(), id="optional-parameter-added-0.33"),
]


@pytest.mark.parametrize(("relpath", "old", "new", "expected"), EDITS)
def test_check_source_names_the_changed_seam(tree, relpath, old, new, expected):
    tree.edit(relpath, old, new)
    mismatches = seams.check_source(tree.root)
    assert _names(mismatches) == expected, mismatches


def test_check_source_refuses_a_directory_without_vllm(tmp_path):
    assert seams.check_source(tmp_path) == [f"{tmp_path}: no vllm package here"]


# -- versions ------------------------------------------------------------------

@pytest.mark.parametrize(("version", "supported"), [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.4", True), ("0.33.0", True), ("0.33.1.post1", True),
    ("0.33.2+cu129", True), ("0.34.0", False), ("0.31.1", False), ("1.32.0", False), ("0.3.2", False),
    ("0.32.0rc1", False), ("0.33.1.dev12+g0123abc", False), ("dev", False), ("", False),
], ids=lambda v: repr(v) if isinstance(v, str) else None)
def test_supported_version(version, supported):
    assert seams.supported_version(version) is supported


# -- make seams: its verdict per release, without downloads ----------------------

@pytest.mark.parametrize(("versions", "trees", "rc", "lines"), [
    pytest.param(["0.32.0", "0.34.0"], {"0.32.0": "full", "0.34.0": "no-runner"}, 0,
                 ["0.32.0: ok", "0.34.0: refused ("], id="expected"),
    pytest.param(["0.33.0"], {"0.33.0": "no-runner"}, 1, ["0.33.0: FAILED, supported but"],
                 id="supported-release-fails"),
    pytest.param(["0.34.0"], {"0.34.0": "full"}, 1, ["0.34.0: FAILED, every seam holds"],
                 id="unsupported-release-passes"),
])
def test_make_seams_verdicts(tree, monkeypatch, capsys, versions, trees, rc, lines):
    tree.edit("v1/worker/gpu_model_runner.py", None, None)
    no_runner = tree.root

    def fetch(version, cache):
        return SITE if trees[version] == "full" else no_runner

    monkeypatch.setattr(seams, "fetch_source", fetch)
    assert seams.main(versions) == rc
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(lines) and all(o.startswith(line) for o, line in zip(out, lines)), out


# -- the gate in register() ----------------------------------------------------

_CAPTURE = """
import json, logging, sys
warnings = []
class _Capture(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger("feather_vllm").addHandler(_Capture())
"""

_REGISTER = _CAPTURE + """
import vllm
{patch}
import feather_vllm
feather_vllm.register()
from vllm import ModelRegistry
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from feather_vllm.kv import seams
print("RESULT=" + json.dumps({{
    "warnings": warnings,
    "registered": feather_vllm.ARCHITECTURE in ModelRegistry.get_supported_archs(),
    "patched": [bool(getattr(c, "_feather_patched", False)) for c in (KVCacheManager, GPUModelRunner)],
    "wrapped": hasattr(Scheduler.schedule, "__wrapped__"),
    "model_imported": "feather_vllm.model" in sys.modules,
    "check_after": seams.check_installed(),
}}))
"""


def test_register_refuses_an_unsupported_version():
    result = _run(_REGISTER.format(patch='vllm.__version__ = "0.34.0"'), env={"VLLM_PLUGINS": ""})
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "0.34.0" in result["warnings"][0] and "0.32.x, 0.33.x" in result["warnings"][0]
    assert not result["registered"] and result["patched"] == [False, False] and not result["wrapped"]
    assert not result["model_imported"]


def test_register_installs_on_a_supported_version():
    """The gate passes on the installed vLLM; the plugin's own wrappers
    leave every seam readable (signatures follow __wrapped__)."""
    result = _run(_REGISTER.format(patch=""), env={"VLLM_PLUGINS": ""})
    assert result["warnings"] == []
    assert result["registered"] and result["patched"] == [True, True] and result["wrapped"]
    assert result["check_after"] == []


_FORWARDING = """
import importlib, inspect, json
import feather_vllm
feather_vllm.register()
from feather_vllm.kv import seams, specs

def forwards(func):
    kinds = {p.kind for p in inspect.signature(func, follow_wrapped=False).parameters.values()}
    return {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds

closed = []
for seam in seams.SEAMS:
    owner, _, name = seam.attr.rpartition(".")
    if not owner:
        continue
    cls = getattr(importlib.import_module(seam.module), owner, None)
    func = inspect.getattr_static(cls, name, None)
    if isinstance(func, (classmethod, staticmethod)):
        func = func.__func__
    if hasattr(func, "__wrapped__") and not forwards(func):  # one of the plugin's wrappers
        closed.append(f"{seam.name} wrapper{inspect.signature(func, follow_wrapped=False)}")
base = specs.FullAttentionManager
for name, func in vars(specs.StagedFullAttentionManager).items():
    if inspect.isfunction(func) and hasattr(base, name) and not forwards(func):
        closed.append(f"StagedFullAttentionManager.{name}{inspect.signature(func)}")
print("RESULT=" + json.dumps(closed))
"""


def test_the_plugins_wrappers_forward_what_vllm_adds():
    """The contract checks leading parameters only: a wrapper (or an
    override vLLM calls) must pass on any parameter a later release adds."""
    assert _run(_FORWARDING, env={"VLLM_PLUGINS": ""}) == []


_FAKE_VLLM = {
    # vLLM 0.34-like: no V1 model runner.
    "0.34": {"vllm/__init__.py": '__version__ = "0.34.0"\nclass ModelRegistry:\n    pass\n',
             "vllm/v1/__init__.py": "", "vllm/v1/worker/__init__.py": ""},
    # A supported version number, but the seams are not there.
    "0.32-without-seams": {"vllm/__init__.py": '__version__ = "0.32.0"\n', "vllm/v1/__init__.py": ""},
    # vllm itself misbehaves: the gate's own failure must not escape.
    "broken": {"vllm/__init__.py": 'def __getattr__(name):\n    raise RuntimeError("broken vllm")\n'},
}

_FAKE = _CAPTURE + """
sys.path.insert(0, {root!r})
import feather_vllm
feather_vllm.register()
import vllm
assert vllm.__file__.startswith({root!r}), vllm.__file__
print("RESULT=" + json.dumps({{"warnings": warnings,
                              "hooks": [m for m in sys.modules
                                        if m in ("feather_vllm.kv.runner_v1", "feather_vllm.kv.scheduler_hook")]}}))
"""


@pytest.mark.parametrize(("fake", "named"), [
    ("0.34", "0.34.0"), ("0.32-without-seams", "vllm.v1.worker.gpu_model_runner.GPUModelRunner"),
    ("broken", "RuntimeError: broken vllm"),
])
def test_register_never_raises_beside_a_foreign_vllm(tmp_path, fake, named):
    for rel, text in _FAKE_VLLM[fake].items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    result = _run(_FAKE.format(root=str(tmp_path)), env={"VLLM_PLUGINS": ""})
    assert len(result["warnings"]) == 1 and named in result["warnings"][0], result["warnings"]
    assert result["hooks"] == []


_STOCK = _CAPTURE + """
import vllm
vllm.__version__ = "0.34.0"  # before the engine loads the plugins
from pathlib import Path
from vllm import ModelRegistry, SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
import feather_vllm
from tests.helpers import chat, make_llm, sample_images, shutdown

llm = make_llm(Path({checkpoint!r}), stock=True)
model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
outs = llm.chat([chat(sample_images()[1], "Where is the red square?")],
                SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
result = {{"warnings": warnings, "arch": type(model).__name__,
           "tokens": len(outs[0].outputs[0].token_ids),
           "registered": feather_vllm.ARCHITECTURE in ModelRegistry.get_supported_archs(),
           "patched": bool(getattr(KVCacheManager, "_feather_patched", False))}}
shutdown(llm)
print("RESULT=" + json.dumps(result))
"""


def test_stock_llava_runs_when_the_gate_refuses(tiny_checkpoint):
    """vLLM loads the plugin itself (only it: it also applies the CPU shim
    that vLLM's LLaVA needs here); refused, stock LLaVA loads and generates."""
    result = _run(_STOCK.format(checkpoint=str(tiny_checkpoint)),
                  env={"VLLM_PLUGINS": "feather", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, timeout=240)
    assert result["arch"] == "LlavaForConditionalGeneration" and result["tokens"] == 4
    assert not result["registered"] and not result["patched"]
    assert len(result["warnings"]) == 1 and "0.34.0" in result["warnings"][0]
