"""User errors of the ``bert-emd`` commands are one line on stderr, ``bert-emd <command>: error:
<message>``, with exit status 2 and no traceback (``--debug`` / ``BERT_EMD_DEBUG=1`` show it):
wrong paths, data columns, model folders, multi-task YAML fields, and a missing ``hf`` extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import helpers  # noqa: E402
from helpers import cli_user_error, make_teacher, sentiment_rows, write_table  # noqa: E402

FAST = ["--use_cpu", "True", "--disable_tqdm", "True", "--max_steps", "1", "--save_strategy", "no",
        "--eval_strategy", "no", "--no-plots", "--labels", "negative,positive"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A fine-tuned (random) tiny teacher, a folder that is no model folder, and a training table."""
    root = tmp_path_factory.mktemp("cli_errors")
    teacher = make_teacher(root / "teacher", num_labels=2)
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no config.json here\n")
    train = write_table(root / "train.csv", sentiment_rows(8))
    return {"root": root, "teacher": teacher, "not_a_model": not_a_model, "train": train}


def _distill(ws: dict[str, Path], *extra: str, teacher: Path | None = None, train: Path | None = None) -> list[str]:
    return ["distill", "--teacher", str(teacher or ws["teacher"]), "--train-file", str(train or ws["train"]),
            "--student-layers", "2", "--output-dir", str(ws["root"] / "out"), *FAST, *extra]


def test_missing_train_file(ws, capsys):
    msg = cli_user_error(_distill(ws, train=ws["root"] / "nope.csv"), capsys, "bert-emd distill")
    assert "train file: file" in msg and "nope.csv not found" in msg and "train.csv" in msg  # lists the folder
    assert not (ws["root"] / "out").exists()


def test_missing_text_column(ws, capsys):
    msg = cli_user_error(_distill(ws, "--text-column", "sentence"), capsys, "bert-emd distill")
    assert msg == f"{ws['train']}: missing text column 'sentence'; columns are: text, label"


@pytest.mark.parametrize("command, option", [("distill", "--teacher"), ("distill", "--student"),
                                             ("finetune", "--model"), ("evaluate", "--model")])
def test_model_folder_that_does_not_exist(ws, capsys, command, option):
    """Named as a missing folder, not as an invalid Hub repository id (what from_pretrained says)."""
    missing = ws["root"] / "no_such_model"
    if command == "distill":
        argv = _distill(ws, teacher=missing) if option == "--teacher" else [
            "distill", "--teacher", str(ws["teacher"]), "--student", str(missing), "--train-file", str(ws["train"]),
            "--output-dir", str(ws["root"] / "out"), *FAST]
    else:
        argv = [command, option, str(missing), "--train-file" if command == "finetune" else "--validation-file",
                str(ws["train"]), "--labels", "negative,positive", "--use_cpu", "True",
                *(["--output-dir", str(ws["root"] / "out")] if command == "finetune" else [])]
    assert cli_user_error(argv, capsys, f"bert-emd {command}") == f"{option} {missing}: no such folder"


def test_folder_without_config_json(ws, capsys):
    msg = cli_user_error(_distill(ws, teacher=ws["not_a_model"]), capsys, "bert-emd distill")
    assert msg == f"--teacher {ws['not_a_model']} has no config.json (not a Hugging Face model folder)"


def _mtl_config(ws: dict[str, Path], name: str, **sections) -> Path:
    yaml = pytest.importorskip("yaml")
    cfg = {"model": {"encoder": str(ws["teacher"])},
           "training": {"output_dir": str(ws["root"] / name), "use_cpu": True},
           "tasks": [{"name": "sent", "type": "single", "data": {"train": str(ws["train"]),
                                                                 "label_list": ["negative", "positive"]}}]}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = ws["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_mtl_yaml_field(ws, capsys):
    path = _mtl_config(ws, "bad_field", training={"batch_size": 0})
    msg = cli_user_error(["mtl", "train", "--config", str(path)], capsys, "bert-emd mtl train")
    assert msg == f"{path}: training.batch_size: an integer >= 1 is required, got 0"


def test_mtl_encoder_folder_that_does_not_exist(ws, capsys):
    missing = ws["root"] / "no_such_encoder"
    path = _mtl_config(ws, "bad_encoder", model={"encoder": str(missing)})
    msg = cli_user_error(["mtl", "train", "--config", str(path)], capsys, "bert-emd mtl train")
    assert msg == f"{path}: model.encoder {missing}: no such folder"


def _run_cli(code: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` with ``argv`` as its arguments (offline, our import path)."""
    return subprocess.run([sys.executable, "-c", code, *argv], env=helpers.child_env(**(env or {})),
                          capture_output=True, text=True, timeout=300)


# the module cannot be imported (as if not installed) and is not found by importlib.util.find_spec
WITHOUT = textwrap.dedent("""\
    import sys
    module, argv = sys.argv[1], sys.argv[2:]
    sys.modules[module] = None
    from bert_emd.cli import main
    sys.exit(main(argv))
""")


@pytest.mark.parametrize("module", ["transformers", "yaml", "matplotlib"])
def test_missing_extra_is_one_line_naming_the_pip_command(ws, module):
    """A command run without the ``hf`` extra says which module is missing and the pip command, in one
    line, before importing anything of it (without the check: an ImportError traceback)."""
    argv = {"transformers": _distill(ws), "yaml": ["mtl", "train", "--config", str(_mtl_config(ws, "extra"))],
            "matplotlib": ["plot", str(ws["root"])]}[module]
    proc = _run_cli(WITHOUT, [module, *argv])
    command = {"transformers": "bert-emd distill", "yaml": "bert-emd mtl train", "matplotlib": "bert-emd plot"}[module]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'{command}: error: this command needs {module}, which is not installed: pip install "bert-emd[hf]"']


@pytest.mark.parametrize("how", ["--debug", pytest.param("BERT_EMD_DEBUG", marks=pytest.mark.slow)])
def test_debug_shows_the_traceback(ws, how):
    missing = ws["root"] / "no_such_model"
    argv = _distill(ws, teacher=missing)
    argv = ["--debug", *argv] if how == "--debug" else argv
    code = "import sys\nfrom bert_emd.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = _run_cli(code, argv, env={"BERT_EMD_DEBUG": "1"} if how == "BERT_EMD_DEBUG" else None)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "check_model_folder" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"MissingFileError: --teacher {missing}: no such folder")
