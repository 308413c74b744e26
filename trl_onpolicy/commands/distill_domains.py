"""`trl-onpolicy distill --domain_column domain`: one specialised student per domain, and a router (MoDE).

A recipe over `distill`, not a framework: the rows of each value of the column are a run of their own, in the
domains' sorted order, each with the same flags, its own teacher (`--teacher_model_name_or_path` as a JSON object
`{"math": "...", "code": "..."}`, or one name for every domain) and its own folder `output_dir/<domain>` (checkpoints,
the saved student, its eval report). Then a router is saved beside them (`--router classifier`: a
[`~trl_onpolicy.domain_router.PromptClassifier`] trained on the training prompts, its accuracy on a held out tenth of
them printed and kept in `router.json`; `--router column`: the caller names each prompt's domain), and
[`~trl_onpolicy.RoutedStudents.from_pretrained`] loads `output_dir` as one object with `generate`.

Every domain gets the flags' whole budget (`max_steps`, epochs): equal compute across domains is the user's choice of
flags, as the data are theirs. A domain whose folder already holds its saved student is not trained again, so a run
stopped in its third domain resumes there with `--resume_from_checkpoint true` (each unfinished domain from its last
checkpoint, or fresh) or with the checkpoint path the stop printed. With `--push_to_hub`, each student is pushed to
`<hub_model_id>-<domain>` (`hub_model_id` defaults to the output folder's name); the router stays in `output_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from .. import checkpoints

ROUTERS = ("classifier", "column")
HELD_OUT = 0.1  # of the training prompts, to measure the classifier's accuracy


def domains_of(train, column: str) -> list[str]:
    """The sorted values of `column` in the training rows (strings, at least two)."""
    if train is None or getattr(train, "column_names", None) is None:
        raise ValueError("`--domain_column` needs a dataset with known columns: streaming (`--dataset_streaming`) is "
                         "not supported with it.")  # fmt: skip
    if column not in train.column_names:
        raise ValueError(f"`--domain_column {column}`: the training data have no column {column!r} (its columns: "
                         f"{', '.join(train.column_names)}). Name the column that gives each row's domain.")  # fmt: skip
    domains = sorted({str(v) for v in train[column]})
    if len(domains) < 2:
        raise ValueError(f"`--domain_column {column}` holds one domain ({domains}): one student needs no router. Drop "
                         "`--domain_column`, or give rows of at least two domains.")  # fmt: skip
    bad = [d for d in domains if not d or d.startswith(".") or any(c in d for c in "/\\")]
    if bad:
        raise ValueError(f"Domain names {bad} cannot name a folder under output_dir; rename them in the "
                         f"{column!r} column.")  # fmt: skip
    return domains


def teacher_of(training_args, domains: list[str]) -> dict:
    """Each domain's teacher: the JSON object's entry, or the one teacher of every domain."""
    teacher = training_args.teacher_model_name_or_path
    if not isinstance(teacher, dict):
        return dict.fromkeys(domains, teacher)
    missing, unknown = sorted(set(domains) - set(teacher)), sorted(set(teacher) - set(domains))
    if missing or unknown:
        raise ValueError(f"`--teacher_model_name_or_path` names teachers by domain, but not one per domain of the data "
                         f"({', '.join(domains)}): missing {missing}, unknown {unknown}.")  # fmt: skip
    return dict(teacher)


def resume_points(value, output_dir: str, domains: list[str]) -> dict:
    """Where each domain starts: a checkpoint, or None (fresh). `true`/`last`: each domain's last whole checkpoint
    if it has one; a path: the domain whose folder holds it."""
    if value is None or value is False or str(value).strip().lower() in checkpoints.RESUME_NONE:
        return dict.fromkeys(domains)
    if value is True or str(value).strip().lower() in checkpoints.RESUME_LAST:
        return {d: checkpoints.last_whole_checkpoint(os.path.join(output_dir, d)) for d in domains}
    path = os.path.abspath(os.fspath(value))
    for d in domains:
        folder = os.path.abspath(os.path.join(output_dir, d))
        if path == folder or path.startswith(folder + os.sep):
            return {**dict.fromkeys(domains), d: checkpoints.resolve_resume_from_checkpoint(path, folder)}
    raise ValueError(f"--resume_from_checkpoint {value}: with `--domain_column`, give `true` (each domain from its last "
                     f"checkpoint) or a checkpoint under one domain's folder ({output_dir}/<domain>).")  # fmt: skip


def is_finished(folder: str) -> bool:
    """Whether a domain's folder holds its saved student (a model or an adapter at the top)."""
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "adapter_config.json"))


def train_router(train, column: str, domains: list[str], kind: str, seed: int):
    """The router of `kind` and, for a classifier, its accuracy on a held out tenth of the training prompts."""
    from ..domain_router import DomainRouter, PromptClassifier
    from ..prompts import split_messages

    if kind == "column":
        return DomainRouter(domains, column), None
    prompts = train["prompt"] if "prompt" in train.column_names else [split_messages(m)[0] for m in train["messages"]]
    rows = list(zip(prompts, (str(v) for v in train[column])))
    random.Random(seed).shuffle(rows)
    cut = max(1, int(len(rows) * HELD_OUT))
    held, fit = rows[:cut], rows[cut:] or rows
    classifier = PromptClassifier(domains)
    classifier.fit([p for p, _ in fit], [d for _, d in fit], seed=seed)
    accuracy = sum(p == d for p, (_, d) in zip(classifier.predict([p for p, _ in held]), held)) / len(held)
    classifier.fit([p for p, _ in rows], [d for _, d in rows], seed=seed)  # the router keeps what all prompts teach
    return DomainRouter(domains, column, classifier), accuracy


def distill_domains(script_args, training_args, model_args, command: list[str]):
    """Train one student per domain of `--dataset_name` (see the module docstring); returns the last trainer, or None
    when every domain was already trained."""
    from accelerate import PartialState

    from ..step_log import use_step_lines
    from .distill import _finish, build_trainer, check_arguments, eval_callbacks, load_datasets

    column, out = script_args.domain_column, training_args.output_dir
    if script_args.router not in ROUTERS:
        raise ValueError(f"`--router {script_args.router}`: choose one of {', '.join(ROUTERS)}.")
    train, _ = load_datasets(script_args)
    domains = domains_of(train, column)
    teachers = teacher_of(training_args, domains)
    starts = resume_points(training_args.resume_from_checkpoint, out, domains)
    hub = training_args.hub_model_id or os.path.basename(os.path.abspath(out))  # with --push_to_hub: <hub>-<domain>
    runs = {d: dataclasses.replace(training_args, output_dir=os.path.join(out, d), teacher_model_name_or_path=teachers[d],
                                   resume_from_checkpoint=None, hub_model_id=f"{hub}-{d}") for d in domains}  # fmt: skip
    for args in runs.values():  # every domain's models checked before anything loads
        check_arguments(model_args, args)
    state, trainer = PartialState(), None
    for domain, args in runs.items():
        if is_finished(args.output_dir):
            state.print(f"[{domain}] the student in {args.output_dir} is already trained; skipped.")
            continue
        rows = train.filter(lambda v, d=domain: str(v) == d, input_columns=column)
        state.print(f"[{domain}] {len(rows)} rows; teacher {teachers[domain]}; output {args.output_dir}")
        callbacks = eval_callbacks(script_args)
        trainer = build_trainer(script_args, args, model_args, callbacks, train_dataset=rows)
        use_step_lines(trainer)
        trainer.train(resume_from_checkpoint=starts[domain])
        _finish(trainer, script_args, args, callbacks, command)
        if checkpoints.sigterm_stop(trainer):
            return trainer
    router, accuracy = train_router(train, column, domains, script_args.router, training_args.seed)
    if state.is_main_process:
        router.save(out)
        with open(os.path.join(out, "router_metrics.json"), "w", encoding="utf-8") as f:
            json.dump({"router": script_args.router, "held_out_accuracy": accuracy, "domains": domains}, f, indent=1)
    measured = "" if accuracy is None else f"; the classifier routes {accuracy:.1%} of held out training prompts right"
    state.print(f"Saved {len(domains)} students and a {script_args.router} router to {out}{measured}. Load them with "
                f"trl_onpolicy.RoutedStudents.from_pretrained({out!r}).")  # fmt: skip
    return trainer
