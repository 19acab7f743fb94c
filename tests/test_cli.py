"""The command line: ``bufferfix demo`` and ``bufferfix doctor TARGET``, run as a user runs them
(subprocesses), their numbers checked against the real models; ``--version``, the help, missing
packages and closed pipes."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from compare import identical, non_persistent_buffers, tensor_attributes

import bufferfix
from bufferfix import reporting
from bufferfix.flows import FLOWS
from bufferfix.tools import cli, demo, doctor
from bufferfix.tools.check import FLOW_NAMES, FROM_PRETRAINED

try:
    import accelerate  # noqa: F401  (the flows' init_empty_weights)
    import transformers
except ImportError:  # the command line's own tests still run (the wrapt-floor CI leg has neither)
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers and accelerate")

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SCRIPTS = os.path.dirname(sys.executable)  # the console scripts installed with this interpreter's bufferfix


def environment():
    """This directory importable (cli_targets), bufferfix not switched off."""
    variables = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    variables.pop("BUFFERFIX_DISABLE", None)
    return variables


def run(*arguments, timeout=300):
    """``python -m ...`` from the repository root."""
    return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=environment(), capture_output=True,
                          text=True, timeout=timeout)


def shell(command, timeout=300):
    """``command`` in bash, with this interpreter's scripts first on PATH (``bufferfix``, ``python``)."""
    variables = dict(environment(), PATH=os.pathsep.join([SCRIPTS, os.environ.get("PATH", "")]))
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=variables, capture_output=True,
                          text=True, timeout=timeout)


# =========================================================================== the command line itself

@pytest.mark.parametrize("command", [["bufferfix", "--version"], ["python", "-m", "bufferfix", "--version"],
                                     ["bufferfix-run", "--version"]])
def test_version(command):
    result = shell(" ".join(command), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("bufferfix") and bufferfix.__version__ in result.stdout


def _environment_variables_in_readme():
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme = handle.read()
    table = readme.split("### Environment variables", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(BUFFERFIX_\w+)`", table, re.MULTILINE))


@pytest.mark.parametrize("invocation, prog", [("bufferfix", "bufferfix"), ("python -m bufferfix", "python -m bufferfix")])
def test_help_says_what_bufferfix_is_and_lists_everything(invocation, prog):
    result = shell(invocation + " --help", timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    text = result.stdout
    assert text.startswith("usage: %s " % prog)
    summary = text.split("\n\n")[1].splitlines()
    assert len(summary) == 2 and "non-persistent buffers" in summary[0] and "meta" in summary[1]
    for command in ("demo", "doctor", "run", "bufferfix-run"):
        assert re.search(r"^\s+%s\s" % command, text, re.MULTILINE), command
    variables = _environment_variables_in_readme()
    assert variables >= {"BUFFERFIX_AUTO", "BUFFERFIX_DISABLE", "BUFFERFIX_STRICT", "BUFFERFIX_LOG_LEVEL"}
    assert set(re.findall(r"BUFFERFIX_\w+", text)) == variables  # every one of the README's table, no other
    demo_help = shell(invocation + " demo --help", timeout=60).stdout
    assert demo_help.startswith("usage: %s demo " % prog)
    for option in ("--max-steps", "--save", "--target-loss", "--json", "--plot"):
        assert option in demo_help
    assert shell(invocation + " doctor --help", timeout=60).stdout.startswith("usage: %s doctor " % prog)


def test_no_command_is_the_help_and_status_2():
    result = run("bufferfix", timeout=60)
    assert result.returncode == 2 and result.stdout == "" and "commands:" in result.stderr


def test_demo_without_transformers_is_one_line_naming_the_pip_command():
    # transformers made unimportable in the child, as in an environment without it
    code = "import sys; sys.modules['transformers'] = None; from bufferfix.tools.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, "demo"], cwd=ROOT, env=environment(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "bufferfix demo: the demo needs transformers, which is not installed: " \
                            "pip install 'bufferfix[transformers]'\n"


def shows_the_closed_pipe(stderr):
    """A traceback, or the interpreter's "Exception ignored" at exit.  Other lines may be there: a
    library a target imports can print notes of its own (torchao, when installed, does at import)."""
    return any(words in stderr for words in ("Traceback", "BrokenPipeError", "Exception ignored"))


def test_output_to_a_closed_pipe_exits_quietly():
    # The reader is gone before the doctor writes anything: every write fails (EPIPE), deterministically.
    child = subprocess.Popen([sys.executable, "-m", "bufferfix", "doctor", "cli_targets:clean_model", "--json"],
                             cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 1
    assert not shows_the_closed_pipe(stderr), stderr
    # As a user meets it: the reader leaves after 10 bytes, whenever that happens.
    for _ in range(3):
        result = shell("bufferfix doctor cli_targets:clean_model --json | head -c 10")
        assert result.stdout == "{\n \"target\""[:10] and not shows_the_closed_pipe(result.stderr), result.stderr
        assert result.returncode in (0, 1)  # 0: the report fitted in the pipe before head left


def expected_names(model):
    """What the doctor must list: every non-persistent buffer and plain tensor attribute."""
    return set(non_persistent_buffers(model)) | set(tensor_attributes(model))


# =========================================================================== demo

FAST_TARGET = 2.5  # a few dozen steps instead of ~165: the point here is the reloading, not the training


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if transformers is None:
        pytest.skip("needs transformers")
    directory = tmp_path_factory.mktemp("demo")
    saved = directory / "model"
    result = run("bufferfix", "demo", "--target-loss", str(FAST_TARGET), "--json", "-", "--save", str(saved))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr, saved


def test_demo_with_bufferfix_every_flow_gives_the_trained_model(demo_run):
    report, _, saved = demo_run
    assert report["trained_loss"] <= FAST_TARGET
    # Reality: the saved model, reloaded normally here, scores exactly what the demo says.
    model = transformers.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    loss, logits = demo.score(model, demo.evaluation_batch(torch))
    assert loss == report["trained_loss"]
    expected_flows = [FROM_PRETRAINED] + [FLOW_NAMES[key] for key in FLOWS]
    assert list(report["with_bufferfix"]) == expected_flows == list(report["without_bufferfix"])
    assert list(report["without_bufferfix_memory_as_allocated"]) == expected_flows
    for flow, result in report["with_bufferfix"].items():
        assert result["error"] is None, flow
        assert result["loss"] == loss, flow
        assert result["max_logit_difference"] == 0.0, flow
    assert report["wrong_with_bufferfix"] == []


def test_demo_without_bufferfix_meta_flows_are_broken(demo_run):
    report, _, _ = demo_run
    poisoned = report["without_bufferfix"]
    # transformers' from_pretrained recomputes Qwen2's rotary buffers itself: fine without bufferfix.
    assert poisoned[FROM_PRETRAINED]["loss"] == report["trained_loss"]
    for key in FLOWS:
        result = poisoned[FLOW_NAMES[key]]  # poisoned memory: a lost buffer always shows
        assert result["error"] is not None or math.isnan(result["loss"]), key


def _cells(line):
    """A demo table row: ``(flow, [its four cells])``."""
    *name, garbage, poisoned, loss, difference = line.split()
    return " ".join(name), [garbage, poisoned, loss, difference]


def test_demo_table_shows_the_measured_numbers_in_100_columns(demo_run):
    report, log, _ = demo_run
    assert "training: step" in log  # progress while training
    table = log.split("The trained model's loss is", 1)[1]
    assert "%.3f" % report["trained_loss"] in table.splitlines()[0]
    assert max(len(line) for line in log.splitlines()) <= 100, log
    rows = dict(_cells(line) for line in table.splitlines() if line.startswith(tuple(report["with_bufferfix"])))
    assert list(rows) == list(report["with_bufferfix"])  # every flow named by all its steps
    for flow, (garbage, poisoned, loss, difference) in rows.items():
        for cell, result in ((garbage, report["without_bufferfix_memory_as_allocated"][flow]),
                             (poisoned, report["without_bufferfix"][flow]), (loss, report["with_bufferfix"][flow])):
            if result["error"] is not None:
                assert cell.startswith("crash"), flow
            else:
                assert cell == ("nan" if math.isnan(result["loss"]) else "%.3f" % result["loss"]), flow
        assert difference == "0"
    # Memory as allocated: what the report saw, plausible losses rather than only NaN
    assert any(not math.isnan(result["loss"] if result["loss"] is not None else math.nan)
               for flow, result in report["without_bufferfix_memory_as_allocated"].items() if flow != FROM_PRETRAINED)


@needs_transformers
def test_demo_config_is_package_data():
    with open(demo.CONFIG_FILE) as handle:
        spec = json.load(handle)
    config, model_class = demo.load_config()
    assert model_class.__name__ == spec["architectures"][0] == "Qwen2ForCausalLM"
    assert config.hidden_size == spec["hidden_size"]
    with open(os.path.join(ROOT, "setup.cfg")) as handle:
        assert "data/*.json" in handle.read()


@needs_transformers
def test_demo_plot_without_matplotlib_is_a_clear_error():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = run("bufferfix", "demo", "--plot", "out.png", timeout=60)
        assert result.returncode == 2
        assert result.stderr == "bufferfix demo: --plot needs matplotlib, which is not installed: pip install matplotlib\n"
    else:
        pytest.skip("matplotlib is installed")


# =========================================================================== doctor

def doctor_json(target, *options):
    result = run("bufferfix", "doctor", target, "--json", *options)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def llama_report():
    if transformers is None:
        pytest.skip("needs transformers")
    return doctor_json("llama")


def unpatched_broken(build, flow):
    """What ``flow`` really breaks without bufferfix, computed here (bufferfix disabled in-process)."""
    torch.manual_seed(0)
    reference = build()
    torch.manual_seed(0)
    materialised = FLOWS[flow](build, reference.state_dict())
    ours = {**non_persistent_buffers(materialised), **tensor_attributes(materialised)}
    theirs = {**non_persistent_buffers(reference), **tensor_attributes(reference)}
    return {name for name in theirs if name not in ours or not identical(ours[name], theirs[name])}


@needs_transformers
@pytest.mark.parametrize("target", ["llama", "bert"])
def test_doctor_on_transformers_model_types(target, llama_report, without_bufferfix):
    status, report = llama_report if target == "llama" else doctor_json(target)
    build = doctor.resolve(target).build  # the model the doctor built, built here
    model = build()
    assert {entry["name"] for entry in report["buffers"]} == expected_names(model) != set()
    actual = {**non_persistent_buffers(model), **tensor_attributes(model)}
    for entry in report["buffers"]:
        assert entry["shape"] == list(actual[entry["name"]].shape)
        assert entry["dtype"] == str(actual[entry["name"]].dtype).replace("torch.", "")
        assert entry["recovery"] == "replay" and entry["reason"] is None and entry["kind"] == "buffer"
        assert entry["transformers_init"] is True  # from_pretrained refills them even unpatched
    assert list(report["flows"]) == [FLOW_NAMES[key] for key in FLOWS] + [FROM_PRETRAINED]
    keys = {name: key for key, name in FLOW_NAMES.items()}
    for flow, result in report["flows"].items():
        assert result["verdict"] == "ok", flow
        assert result["with_bufferfix"]["broken"] == [] and result["with_bufferfix"]["error"] is None
        if flow in keys:  # the "without" column is what an unpatched flow really does
            broken = unpatched_broken(build, keys[flow])
            assert set(result["without_bufferfix"]["broken"]) == broken, flow
            assert set(non_persistent_buffers(model)) <= broken, flow  # every real buffer is lost
    assert report["ok"] and status == 0 and report["not_checked"] == {}


@needs_transformers
def test_doctor_names_an_unrecoverable_buffer():
    import cli_targets

    status, report = doctor_json("cli_targets:random_buffer_model")
    assert status == 1 and not report["ok"]
    model = cli_targets.random_buffer_model()
    assert {entry["name"] for entry in report["buffers"]} == expected_names(model)
    torch.manual_seed(0)
    first = non_persistent_buffers(cli_targets.random_buffer_model())
    torch.manual_seed(1)
    second = non_persistent_buffers(cli_targets.random_buffer_model())
    random = sorted(name for name in first if not torch.equal(first[name], second[name]))
    assert random == ["random.projection"]
    assert report["unrecoverable"] == random
    cannot = [entry for entry in report["buffers"] if entry["recovery"] == "cannot"]
    assert [entry["name"] for entry in cannot] == random and cannot[0]["reason"] == "random"
    assert {entry["recovery"] for entry in report["buffers"] if entry not in cannot} == {"replay"}
    # The snapshot flow keeps the real tensor: it even gets the random buffer right.
    assert report["flows"][FLOW_NAMES[".to('meta')"]]["verdict"] == "ok"
    assert report["flows"][FLOW_NAMES["torch.device('meta')"]]["with_bufferfix"]["broken"] == random
    text = doctor.format_report(report)
    assert "PROBLEM" in text and "random.projection" in text


@needs_transformers
def test_doctor_classifies_from_values_not_from_words(monkeypatch):
    """Rewording every message bufferfix makes (warnings included) changes the doctor's words only."""
    monkeypatch.setattr(reporting, "describe", lambda recovery: "REWORDED %s" % recovery.name[::-1])
    arguments = cli.parser().parse_args(["doctor", "cli_targets:random_buffer_model"])
    report = doctor.diagnose(arguments)
    by_name = {entry["name"]: entry for entry in report["buffers"]}
    assert {name: (entry["recovery"], entry["reason"]) for name, entry in by_name.items()} == {
        "positions.table.table": ("replay", None), "positions.mask.mask": ("replay", None),
        "random.projection": ("cannot", "random"), "random.steps": ("replay", None)}
    assert by_name["random.projection"]["description"] == "REWORDED noitcejorp.modnar"
    assert report["unrecoverable"] == ["random.projection"] and not report["ok"]
    meta = report["flows"][FLOW_NAMES["torch.device('meta')"]]
    assert meta["verdict"] == "random buffers differ" and meta["with_bufferfix"]["broken"] == ["random.projection"]
    assert [(w["name"], w["reason"], w["description"]) for w in meta["with_bufferfix"]["warnings"]] == [
        ("random.projection", "random", "REWORDED noitcejorp.modnar")]
    assert report["flows"][FLOW_NAMES[".to('meta')"]]["verdict"] == "ok"
    text = doctor.format_report(report)
    assert "CANNOT: random" in text and "REWORDED noitcejorp.modnar" in text


@needs_transformers
def test_doctor_measures_transformers_init_on_a_custom_model(tmp_path, without_bufferfix):
    import cli_targets

    status, report = doctor_json("cli_targets:custom_pretrained_model")
    assert status == 0
    [entry] = report["buffers"]
    assert entry["name"] == "scale" and entry["recovery"] == "replay"
    # Reality, unpatched: transformers 5 leaves this custom buffer garbage (transformers issue 48892),
    # 4.x never puts buffers on meta in from_pretrained.
    reference = cli_targets.custom_pretrained_model()
    reference.save_pretrained(tmp_path)
    loaded = type(reference).from_pretrained(tmp_path, dtype=torch.float32)
    right_unpatched = identical(loaded.scale, reference.scale)
    assert right_unpatched == (int(transformers.__version__.split(".")[0]) < 5)
    assert entry["transformers_init"] is right_unpatched
    from_pretrained = report["flows"][FROM_PRETRAINED]
    assert from_pretrained["without_bufferfix"]["broken"] == ([] if right_unpatched else ["scale"])
    assert from_pretrained["with_bufferfix"]["broken"] == [] and from_pretrained["verdict"] == "ok"


@needs_transformers
def test_doctor_text_report_on_a_saved_model_directory(tmp_path):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    result = run("bufferfix", "doctor", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in expected_names(model):
        assert name in result.stdout
    rows = [line.strip() for line in result.stdout.splitlines()]
    for flow in [FLOW_NAMES[key] for key in FLOWS] + [FROM_PRETRAINED]:  # each flow named by all its steps
        assert any(row.startswith(flow + " ") for row in rows), flow


@pytest.mark.parametrize("target, says", [
    ("/no/such/model/directory", "no such directory"),
    pytest.param("nosuchmodeltype", "unknown target", marks=needs_transformers),
    ("nosuchmodule:fn", "no module named 'nosuchmodule'"),
    ("cli_targets:no_such_function", "has no attribute"),
    ("cli_targets:fails_to_build", "this model needs a GPU"),
    ("cli_targets:not_a_module", "not a torch.nn.Module"),
    ("tests", "no config.json"),
    ("tests/cli_targets.py", "add the callable that builds the model, as tests/cli_targets.py:CALLABLE"),
    ("tests/no_such_file.py", "no such file"),
])
def test_doctor_bad_target_is_one_clear_line(target, says):
    result = run("bufferfix", "doctor", target, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("bufferfix doctor: %s" % target) and says in lines[0]


MODELS_HERE = """
import torch
from torch import nn


class Rotary(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8), persistent=False)


def build():
    return Rotary()
"""


def test_doctor_finds_a_module_in_the_current_directory_as_python_m_does(tmp_path):
    (tmp_path / "models_in_cwd.py").write_text(MODELS_HERE)
    for command in ([os.path.join(SCRIPTS, "bufferfix")], [sys.executable, "-m", "bufferfix"]):
        result = subprocess.run(command + ["doctor", "models_in_cwd:build", "--json"], cwd=tmp_path,
                                env=environment(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert [entry["name"] for entry in json.loads(result.stdout)["buffers"]] == ["inv_freq"]


def test_doctor_never_says_ok_about_a_flow_that_did_not_run(tmp_path):
    # accelerate made unimportable for the doctor and its BUFFERFIX_DISABLE=1 child alike
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'accelerate'\", name='accelerate')\n")
    variables = environment()
    variables["PYTHONPATH"] = os.pathsep.join([str(tmp_path), variables["PYTHONPATH"]])
    result = subprocess.run([sys.executable, "-m", "bufferfix", "doctor", "cli_targets:clean_model"], cwd=ROOT,
                            env=variables, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "every flow" not in text
    assert "OK: bufferfix recovers every non-persistent buffer in each of the 3 flows checked." in text
    for key in ("init_empty_weights", "init_empty_weights(include_buffers)"):
        line = "NOT CHECKED: %s: accelerate is not installed (pip install accelerate)" % FLOW_NAMES[key]
        assert line in text.splitlines(), text


@needs_transformers
def test_doctor_class_of_another_model_type_is_one_clear_line():
    result = run("bufferfix", "doctor", "bert", "--class", "GPT2LMHeadModel", timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line == ("bufferfix doctor: bert: GPT2LMHeadModel is a gpt2 model, not a bert one (its config is "
                    "GPT2Config); pass a bert class, e.g. --class BertModel")


@needs_transformers
def test_a_model_type_that_builds_at_no_level_gives_each_error_once():
    from bufferfix.tools.doctor import targets

    class NeverBuilds:
        def __init__(self, config):
            raise AttributeError("'BertConfig' object has no attribute 'embd_pdrop'")

    with pytest.raises(targets.TargetError) as caught:
        targets._small_config("bert", NeverBuilds)
    message = str(caught.value)
    assert message.count("AttributeError") == 1 and "config config" not in message
    assert "tiny config / tiny, full-size images config / fewer layers, small vocab config / fewer layers config / " \
           "default config: AttributeError: " in message


def test_doctor_main_returns_the_exit_status(capsys):
    assert doctor.main(["/no/such/model/directory"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert bufferfix.is_enabled()


@needs_transformers
def test_doctor_json_to_a_pipe_closed_early_never_prints_a_traceback():
    result = shell("bufferfix doctor bert --json | head -c 10")
    # transformers may print notes of its own on stderr (torchao, when installed, does at import)
    assert result.stdout == "{\n \"target\""[:10], result.stderr
    assert not shows_the_closed_pipe(result.stderr), result.stderr
    assert result.returncode in (0, 1)  # 0: the report fitted in the pipe before head left
