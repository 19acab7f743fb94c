"""The command line: ``python -m bufferfix demo`` and ``python -m bufferfix doctor TARGET``, run as a
user runs them (subprocesses), their numbers checked against the real models."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bufferfix
from bufferfix import demo, doctor
from bufferfix.flows import FLOWS
from compare import identical, non_persistent_buffers, tensor_attributes

transformers = pytest.importorskip("transformers")

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run(*arguments, timeout=300):
    """``python -m ...`` from the repository root, with this directory importable (cli_targets)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    environment.pop("BUFFERFIX_DISABLE", None)
    return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def expected_names(model):
    """What the doctor must list: every non-persistent buffer and plain tensor attribute."""
    return set(non_persistent_buffers(model)) | set(tensor_attributes(model))


# =========================================================================== demo

FAST_TARGET = 2.5  # a few dozen steps instead of ~165: the point here is the reloading, not the training


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
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
    expected_flows = ["from_pretrained"] + list(FLOWS)
    assert list(report["with_bufferfix"]) == expected_flows == list(report["without_bufferfix"])
    for flow, result in report["with_bufferfix"].items():
        assert result["error"] is None, flow
        assert result["loss"] == loss, flow
        assert result["max_logit_difference"] == 0.0, flow
    assert report["wrong_with_bufferfix"] == []


def test_demo_without_bufferfix_meta_flows_are_broken(demo_run):
    report, _, _ = demo_run
    without = report["without_bufferfix"]
    # transformers' from_pretrained recomputes Qwen2's rotary buffers itself: fine without bufferfix.
    assert without["from_pretrained"]["loss"] == report["trained_loss"]
    for flow in FLOWS:
        result = without[flow]
        assert (result["error"] is not None or math.isnan(result["loss"])
                or result["loss"] != report["trained_loss"]), flow


def test_demo_table_shows_the_measured_numbers(demo_run):
    report, log, _ = demo_run
    rows = {line.split("|")[0].strip(): line for line in log.splitlines() if line.count("|") >= 3}
    for flow in report["with_bufferfix"]:
        without, with_fix = rows[flow].split("|")[1:3]
        assert "%.3f" % report["with_bufferfix"][flow]["loss"] in with_fix
        loss = report["without_bufferfix"][flow]["loss"]
        assert ("nan" if loss is None or math.isnan(loss) else "%.3f" % loss) in without or "crash" in without
    assert "training: step" in log  # progress while training


def test_demo_config_is_package_data():
    with open(demo.CONFIG_FILE) as handle:
        spec = json.load(handle)
    config, model_class = demo.load_config()
    assert model_class.__name__ == spec["architectures"][0] == "Qwen2ForCausalLM"
    assert config.hidden_size == spec["hidden_size"]
    with open(os.path.join(ROOT, "setup.cfg")) as handle:
        assert "data/*.json" in handle.read()


def test_demo_plot_without_matplotlib_is_a_clear_error():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = run("bufferfix.demo", "--plot", "out.png", timeout=60)
        assert result.returncode == 2
        assert "matplotlib" in result.stderr and "Traceback" not in result.stderr
    else:
        pytest.skip("matplotlib is installed")


# =========================================================================== doctor

def doctor_json(target, *options):
    result = run("bufferfix", "doctor", target, "--json", *options)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def llama_report():
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
        assert entry["recovery"] == "replay" and entry["why_not"] is None
        assert entry["transformers_init"] is True  # from_pretrained refills them even unpatched
    assert list(report["flows"]) == list(FLOWS) + ["from_pretrained"]
    for flow, result in report["flows"].items():
        assert result["verdict"] == "ok", flow
        assert result["with_bufferfix"]["broken"] == [] and result["with_bufferfix"]["error"] is None
        if flow in FLOWS:  # the "without" column is what an unpatched flow really does
            broken = unpatched_broken(build, flow)
            assert set(result["without_bufferfix"]["broken"]) == broken, flow
            assert set(non_persistent_buffers(model)) <= broken, flow  # every real buffer is lost
    assert report["ok"] and status == 0


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
    assert [entry["name"] for entry in cannot] == random and "random" in cannot[0]["why_not"]
    # The snapshot flow keeps the real tensor: it even gets the random buffer right.
    assert report["flows"][".to('meta')"]["verdict"] == "ok"
    assert report["flows"]["torch.device('meta')"]["with_bufferfix"]["broken"] == random
    text = doctor.format_report(report)
    assert "PROBLEM" in text and "random.projection" in text


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
    from_pretrained = report["flows"]["from_pretrained"]
    assert from_pretrained["without_bufferfix"]["broken"] == ([] if right_unpatched else ["scale"])
    assert from_pretrained["with_bufferfix"]["broken"] == [] and from_pretrained["verdict"] == "ok"


def test_doctor_text_report_on_a_saved_model_directory(tmp_path):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    result = run("bufferfix", "doctor", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in expected_names(model):
        assert name in result.stdout
    for flow in list(FLOWS) + ["from_pretrained"]:
        assert flow in result.stdout


@pytest.mark.parametrize("target, says", [
    ("/no/such/model/directory", "no such directory"),
    ("nosuchmodeltype", "unknown target"),
    ("nosuchmodule:fn", "no module named 'nosuchmodule'"),
    ("cli_targets:no_such_function", "has no attribute"),
    ("cli_targets:fails_to_build", "this model needs a GPU"),
    ("cli_targets:not_a_module", "not a torch.nn.Module"),
    ("tests", "no config.json"),
])
def test_doctor_bad_target_is_one_clear_line(target, says):
    result = run("bufferfix", "doctor", target, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("bufferfix doctor: %s" % target) and says in lines[0]


def test_doctor_main_returns_the_exit_status(capsys):
    assert doctor.main(["/no/such/model/directory"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert bufferfix.is_enabled()
