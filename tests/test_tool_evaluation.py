"""The calculator task scored (`tool_evaluation.py`): a sampler that writes the ground truth turn by turn scores 100%
with one call per equation; a malformed call is counted and answered, and the rollout goes on. The round callback
records the scores before training and after every round, leaves the training run as it was, and rebuilds from its
checkpointed state."""

import pytest
import torch

from trl_onpolicy.tool_evaluation import ToolEvalCallback, evaluate_with_tools, tool_tokenizer
from trl_onpolicy.toy import generate_problems, make_dataset
from trl_onpolicy.toy.calculator import tool_messages, tool_row
from trl_onpolicy.toy.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tool_tokenizer(build_tokenizer())


class GroundTruth:
    """A sampler that writes each problem's ground-truth turn (found from the transcript so far): the evaluation must
    score it 100%, with one call per equation and nothing malformed."""

    def __init__(self, tok, problems, break_first_call=False):
        self.tok, self.problems, self.broken = tok, problems, break_first_call

    def turn(self, problem, k):
        message = [m for m in tool_messages(problem) if m["role"] == "assistant"][k]
        calls = message.get("tool_calls") or []
        text = message["content"] + "".join(f"calc(expression={c['function']['arguments']['expression']})"
                                            for c in calls)  # fmt: skip
        if self.broken and k == 0:
            text = text.replace("calc(expression=", "calc(")
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def sample(self, prompt_ids, generation_config, tokenizer=None):
        from trl_onpolicy.samplers import Samples

        out = []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            problem = next(p for p in self.problems if p["question"] in text)
            out.append(self.turn(problem, ids.count(self.tok.eos_token_id)))
        return Samples(out, [False] * len(out))


def test_the_evaluation_scores_the_ground_truth_perfectly(tok):
    problems = generate_problems(12, "eval", seed=5)
    scores = evaluate_with_tools(None, tok, problems, batch_size=5, sampler=GroundTruth(tok, problems))
    n_equations = sum(len(tool_row(p)["masked_spans"]) for p in problems) / len(problems)
    assert scores == {"exact_match": 1.0, "calls_per_problem": pytest.approx(n_equations), "malformed_per_problem": 0.0,
                      "failed_call_fraction": 0.0, "called_fraction": 1.0}  # fmt: skip


def test_the_evaluation_counts_a_malformed_call(tok):
    problems = generate_problems(4, "eval", seed=5)
    scores = evaluate_with_tools(None, tok, problems, sampler=GroundTruth(tok, problems, break_first_call=True))
    assert scores["malformed_per_problem"] == 1.0  # one per problem, answered with an error; the rest goes on
    assert scores["failed_call_fraction"] == pytest.approx(1 / scores["calls_per_problem"])


def test_a_problem_whose_only_call_failed_is_not_counted_as_called(tok):
    problems = generate_problems(4, "eval", seed=5)
    scripted = GroundTruth(tok, problems, break_first_call=True)
    scripted.turn = lambda problem, k, turn=scripted.turn: turn(problem, k) if k == 0 else [tok.eos_token_id]
    scores = evaluate_with_tools(None, tok, problems, sampler=scripted)
    assert scores["calls_per_problem"] == 1.0 and scores["called_fraction"] == 0.0


def distill(tmp_path, callbacks):
    """Two rounds of one step on the toy prompts, tiny models on the toy tokenizer; the final student's weights."""
    import tiny_models as tm

    base = build_tokenizer()
    config = tm.config(tmp_path, max_steps=2, num_rounds=2, max_completion_length=6, temperature=1.0)
    trainer = tm.OnPolicyDistillTrainer(
        model=tm.model(base, seed=0), teacher_model=tm.model(base, seed=1), args=config, processing_class=base,
        train_dataset=make_dataset(4, seed=1).select_columns(["prompt"]), callbacks=callbacks,
    )  # fmt: skip
    trainer.train()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_the_callback_scores_before_training_and_every_round_without_changing_the_run(tmp_path):
    callback = ToolEvalCallback(eval_size=3, max_new_tokens=8)
    trained = distill(tmp_path / "scored", [callback])
    assert [(e["kind"], e["round"], e["step"]) for e in callback.history] == [("before", 0, 0), ("round", 1, 1),
                                                                              ("round", 2, 2)]  # fmt: skip
    for entry in callback.history:
        assert set(entry["scores"]) == {"toy_tools", "toy_tools_called"} and "error" not in entry
        assert entry["scores"]["toy_tools"] == entry["metrics"]["toy_tools"]["exact_match"]
    plain = distill(tmp_path / "plain", [])
    assert all(torch.equal(trained[k], plain[k]) for k in plain)  # evaluating left the training run as it was
    rebuilt = ToolEvalCallback(**callback.state()["args"])
    assert rebuilt.problems == callback.problems and rebuilt.max_new_tokens == 8


def test_a_failed_evaluation_is_recorded_and_training_goes_on(tmp_path, caplog):
    callback = ToolEvalCallback(eval_size=2, max_new_tokens=8)
    callback.problems = None  # scoring raises
    distill(tmp_path, [callback])
    error = "TypeError: object of type 'NoneType' has no len()"
    assert [e["error"] for e in callback.history] == [error] * 3 and [e["scores"] for e in callback.history] == [{}] * 3
    assert f"the calculator evaluation failed at step 0 (round 0), training continues: {error}" in caplog.text
