"""`trl-onpolicy distill --domain_column`: one student per domain, each from its own teacher, a router beside them, the
folder loadable as `RoutedStudents`; finished domains are not trained again; bad input is refused with its fix."""

import json
import subprocess
import sys

import pytest
import tiny_models
import torch
from tiny_assets import save_tiny_assets, train_flags

from trl_onpolicy import RoutedStudents
from trl_onpolicy.commands import cli
from trl_onpolicy.commands.distill_domains import domains_of, resume_points, teacher_of

ROWS = [("add 1 and 2", " 3", "math"), ("tell a joke", " no", "chat"), ("add 4 and 4", " 8", "math"),
        ("say hello", " hi", "chat")] * 3  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("domains")
    paths = save_tiny_assets(folder)
    tok = tiny_models.tokenizer()  # a second teacher, for the second domain
    tiny_models.model(tok, layers=1, hidden=32, seed=2).save_pretrained(folder / "teacher2")
    tok.save_pretrained(folder / "teacher2")
    paths["teacher2"] = str(folder / "teacher2")
    paths["domains"] = str(folder / "domains.jsonl")
    with open(paths["domains"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p, "completion": c, "domain": d}) + "\n" for p, c, d in ROWS)
    return paths


def flags(assets, out, teacher=None):
    args = train_flags(assets, out, dataset="domains") + ["--domain_column", "domain"]
    if teacher is not None:
        args[args.index("--teacher_model_name_or_path") + 1] = teacher
    return args


def test_one_student_per_domain_each_from_its_teacher(assets, tmp_path, capsys):
    out = tmp_path / "out"
    teachers = json.dumps({"math": assets["teacher"], "chat": assets["teacher2"]})
    assert cli.main(["distill", *flags(assets, out, teachers)]) == 0
    printed = capsys.readouterr().out
    assert "[chat] 6 rows; teacher " + assets["teacher2"] in printed
    assert "[math] 6 rows; teacher " + assets["teacher"] in printed
    for domain in ("chat", "math"):  # each trained on its own rows only, with its own teacher
        saved = torch.load(out / domain / "training_args.bin", weights_only=False)
        assert saved.teacher_model_name_or_path == json.loads(teachers)[domain]
        assert saved.hub_model_id == f"out-{domain}"  # where --push_to_hub would put it
        assert (out / domain / "model.safetensors").is_file()
    metrics = json.loads((out / "router_metrics.json").read_text())
    assert metrics["router"] == "classifier" and metrics["domains"] == ["chat", "math"]
    mixture = RoutedStudents.from_pretrained(str(out))
    assert mixture.router.route(["add 2 and 5", "say goodbye"]) == ["math", "chat"]
    completions, routes = mixture.generate(["add 1 and 2"], do_sample=False, max_new_tokens=4)
    assert routes == ["math"] and len(completions) == 1
    # both students moved away from their shared start, and apart: each trained on its own rows and teacher
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(assets["student"]).state_dict()
    chat, math = (mixture.students[d].state_dict() for d in ("chat", "math"))
    moved = {k for k in start if not torch.equal(chat[k], start[k]) and not torch.equal(math[k], start[k])}
    assert {"lm_head.weight", "model.layers.0.mlp.down_proj.weight"} <= moved, sorted(moved)
    assert not torch.equal(chat["lm_head.weight"], math["lm_head.weight"])


def test_finished_domains_are_not_trained_again(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["distill", *flags(assets, out), "--router", "column"]) == 0
    capsys.readouterr()
    before = (out / "math" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(["distill", *flags(assets, out), "--router", "column", "--resume_from_checkpoint", "true"]) == 0
    printed = capsys.readouterr().out
    assert f"[chat] the student in {out / 'chat'} is already trained; skipped." in printed
    assert (out / "math" / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((out / "router.json").read_text()) == {"domains": ["chat", "math"], "column": "domain",
                                                             "classifier": False}  # fmt: skip


def test_resume_points(tmp_path):
    (tmp_path / "math" / "checkpoint-2").mkdir(parents=True)
    assert resume_points(None, str(tmp_path), ["chat", "math"]) == {"chat": None, "math": None}
    with pytest.raises(ValueError, match=r"^--resume_from_checkpoint /elsewhere: with `--domain_column`, give `true`"):
        resume_points("/elsewhere", str(tmp_path), ["chat", "math"])


def test_bad_domain_input_names_the_fix():
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["a", "b"], "domain": ["x", "x"]})
    with pytest.raises(ValueError, match=r"^`--domain_column domain` holds one domain \(\['x'\]\): one student needs no "
                                         r"router\. Drop `--domain_column`, or give rows of at least two domains\.$"):
        domains_of(data, "domain")
    with pytest.raises(ValueError, match=r"^`--domain_column task`: the training data have no column 'task' \(its "
                                         r"columns: prompt, domain\)\. Name the column that gives each row's domain\.$"):
        domains_of(data, "task")
    with pytest.raises(ValueError, match=r"^Domain names \['a/b'\] cannot name a folder under output_dir"):
        domains_of(Dataset.from_dict({"prompt": ["a", "b"], "domain": ["a/b", "c"]}), "domain")

    from types import SimpleNamespace

    args = SimpleNamespace(teacher_model_name_or_path={"math": "t1", "poetry": "t2"})
    with pytest.raises(ValueError, match=r"^`--teacher_model_name_or_path` names teachers by domain, but not one per "
                                         r"domain of the data \(chat, math\): missing \['chat'\], unknown \['poetry'\]\.$"):
        teacher_of(args, ["chat", "math"])


def test_command_line_errors_are_one_line(assets, tmp_path):
    command = [sys.executable, "-m", "trl_onpolicy.commands.cli", "distill", *flags(assets, tmp_path / "o"),
               "--router", "oracle"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "trl-onpolicy distill: error: `--router oracle`: choose one of classifier, column." in proc.stderr
    assert not (tmp_path / "o").exists()


def test_toy_domains_alternate_standard_and_hard_problems():
    from trl_onpolicy.commands.distill import toy_domains
    from trl_onpolicy.toy import equations

    rows = toy_domains(7)
    assert rows.column_names == ["prompt", "completion", "domain"] and len(rows) == 7
    assert rows["domain"] == ["standard", "hard"] * 3 + ["standard"]
    steps = {d: {len(equations(r["completion"])) for r in rows if r["domain"] == d} for d in ("standard", "hard")}
    assert steps["standard"] <= {2, 3, 4} and steps["hard"] <= {5, 6, 7, 8}


def test_the_router_reads_a_messages_rows_prompt_without_its_answer():
    """A `messages` row's prompt is `split_messages`'s: the turns before a closing assistant turn, or all of them when
    no assistant turn closes the row (the user's question is then the last message, and must be kept)."""
    from datasets import Dataset

    from trl_onpolicy.commands.distill_domains import train_router

    math, chat = ["add 1 and 2", "add 4 and 4", "add 3 and 9"], ["tell a joke", "say hello", "sing a song"]
    rows = [[{"role": "user", "content": q}] for q in math + chat]  # prompt-only conversations
    rows[0] = [*rows[0], {"role": "assistant", "content": "3"}]  # and one with its answer
    data = Dataset.from_dict({"messages": rows, "domain": ["math"] * 3 + ["chat"] * 3})
    router, accuracy = train_router(data, "domain", ["chat", "math"], "classifier", seed=0)
    assert router.route(["add 5 and 6", "tell a story"]) == ["math", "chat"] and accuracy == 1.0
