"""The plain install (``pip install -e .``, no extras): the core imports, every command's ``--help`` works,
the main job runs, and the commands that need an extra say in one line which one (exit code 2).

The optional packages are made unimportable in a fresh interpreter (a ``None`` in ``sys.modules``:
``import`` raises ModuleNotFoundError and ``find_spec`` finds nothing, as for an absent package), so
this runs in the test environment, where they are installed."""

import json
import subprocess
import sys
import textwrap

import pytest

from tucker_attention._extras import INSTALL, MissingExtra, explain, require

BLOCKED = sorted(INSTALL)       # every optional dependency the package knows of

CHILD = textwrap.dedent("""
    import contextlib, importlib, io, json, pkgutil, sys
    BLOCKED = set(sys.argv[1].split(","))

    already = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    for name in BLOCKED:        # as if not installed: import raises ModuleNotFoundError, find_spec gives None
        sys.modules[name] = None
    report = {"already": already, "imported": [], "hf_error": None, "help": {}, "runs": {}}

    import tucker_attention
    for info in pkgutil.walk_packages(tucker_attention.__path__, "tucker_attention."):
        if info.name.endswith(".__main__") or (info.name + ".").startswith("tucker_attention.hf."):
            continue
        importlib.import_module(info.name)
        report["imported"].append(info.name)
    try:
        import tucker_attention.hf  # noqa: F401
    except ImportError as err:
        report["hf_error"] = [type(err).__name__, str(err)]

    from tucker_attention.cli import build_parser, main
    commands = [None, *build_parser()._subparsers._group_actions[0].choices]
    for command in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main([command, "--help"] if command else ["--help"])
                code = None
            except SystemExit as stop:
                code = stop.code
        report["help"][command or ""] = [code, len(out.getvalue())]
    for name, argv in json.loads(sys.argv[2]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        report["runs"][name] = [code, err.getvalue()]
    report["leaked"] = sorted(m for m, v in sys.modules.items() if m.partition(".")[0] in BLOCKED and v)
    print(json.dumps(report))
""")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """What a fresh interpreter without the optional packages reports."""
    tmp = tmp_path_factory.mktemp("plain")
    runs = {
        "convert": ["convert", "smollm2", "--method", "tucker", "--budget-kv", "0.5", "--out", str(tmp / "c")],
        "distill": ["distill", "smollm2", str(tmp / "c"), "--out", str(tmp / "d")],
        "ranks": ["ranks", "--hf", "minilm", "--out", str(tmp / "r")],
        "compress": ["compress", "--method", "tucker", "--out", str(tmp / "k")],
        "digits": ["compare", "--task", "vit", "--preset", "tiny", "--out", str(tmp / "v"), "--no-progress"],
        "compare": ["compare", "--preset", "tiny", "--out", str(tmp / "compare-out"), "--no-progress"],
    }
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED), json.dumps(runs)], capture_output=True,
                          text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1]), tmp


def test_core_imports_without_the_extras(plain):
    report, _ = plain
    assert report["already"] == [], "the interpreter imported an optional package before the test could block it"
    for module in ("tucker_attention.layers.tucker", "tucker_attention.tensors.algebra", "tucker_attention.models.gpt",
                   "tucker_attention.training.trainer", "tucker_attention.experiments.compare",
                   "tucker_attention.experiments.compress", "tucker_attention.cli.hf_commands",
                   "tucker_attention.settings.distill", "tucker_attention.data.tokenizers"):
        assert module in report["imported"]
    assert report["leaked"] == []


def test_hf_names_its_extra(plain):
    kind, message = plain[0]["hf_error"]
    assert kind == "MissingExtra"
    assert "transformers" in message and "pip install 'tucker-attention[hf]'" in message


def test_every_help_works_without_the_extras(plain):
    helps = plain[0]["help"]
    assert {"", "convert", "distill", "compare", "compress", "ranks", "prepare-data"} <= set(helps)
    for command, (code, printed) in helps.items():
        assert code == 0 and printed > 200, (command, code, printed)


HF = "needs transformers: pip install 'tucker-attention[hf]'"


@pytest.mark.parametrize("run, command, says", [
    ("convert", "convert", HF), ("distill", "distill", HF), ("ranks", "ranks", HF), ("compress", "compress", HF),
    ("digits", "compare", "needs sklearn: pip install scikit-learn")])
def test_commands_that_need_an_extra_say_which(plain, run, command, says):
    code, stderr = plain[0]["runs"][run]
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith(f"tucker-attn {command}: error: ") and says in stderr


def test_the_main_job_runs_without_the_extras(plain):
    report, tmp = plain
    code, stderr = report["runs"]["compare"]
    assert code == 0, stderr
    records = json.loads((tmp / "compare-out" / "results.json").read_text())
    methods = {r["method"] for r in (records["records"] if isinstance(records, dict) else records)}
    assert methods == {"mha", "gqa", "mla", "tucker"}
    assert (tmp / "compare-out" / "compare.png").stat().st_size > 1000


def test_require_and_explain():
    assert require("json", "x").dumps([1]) == "[1]"
    with pytest.raises(MissingExtra, match=r"^the thing needs no_such_module_zz: pip install no_such_module_zz$"):
        require("no_such_module_zz.sub", "the thing")
    assert explain(ModuleNotFoundError("No module named 'gguf'", name="gguf")) == \
        "this command needs gguf: pip install 'tucker-attention[gguf]'"
    assert explain(ModuleNotFoundError("No module named 'foo'", name="foo")) == "No module named 'foo'"
    assert explain(ImportError("cannot import name 'x'")) == "cannot import name 'x'"
