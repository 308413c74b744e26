"""`OnPolicyDistillTrainer`: the student writes, the teacher scores every token, the student moves toward the teacher.

One optimizer step, in the order the data flows (`docs/architecture.md` draws it):

1. [`~OnPolicyDistillTrainer.make_step_batch`] (called from the Trainer's `get_batch_samples` hook, which hands over
   the prompts of all the step's gradient-accumulation micro-batches at once), top to bottom: the completion source
   (student with probability `lmbda`, else teacher or dataset) -> its sampler writes the completions -> the callbacks'
   `on_rollouts` -> the teacher (and the reference model) score them -> a [`~trl_onpolicy.step_batch.StepBatch`],
   kept in the rollout buffer for `num_iterations` steps and cut into the step's micro-batches;
2. `compute_loss` runs the student over prompt + completion and takes the divergence on completion tokens only
   ([`~trl_onpolicy.student_loss.StudentLoss`]), normalised by the step's global completion-token count;
3. `training_step` backpropagates, then records what the loss measured (the step's sums, the behaviour log-probs of a
   batch that will be reused, the completion records of `on_scored`) and, on the step's last micro-batch, skips an
   update whose loss or gradients are not finite (counted; too many in a row stop training with an error);
4. after the step that ends a round, the callback handler fires `on_round_end` on every process and a checkpoint is
   written ([`~trl_onpolicy.callback_handler.DistillCallbackHandler`]).

How it departs from TRL's `GKDTrainer` / `DistillationTrainer`: the sampling temperature and the loss temperature are
separate (the latter scheduled); the teacher is a backend that returns log-probs in one of three forms, as data; the
data loader is left as SFT's and the whole step's rollouts are made at once, so accumulation needs no repeat sampler.
"""

from __future__ import annotations

import logging
import os
import random
import time

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from . import checkpoints, hidden_states, merge, model_card, model_paths, quantized, trainer_setup
from ._compat import ForwardRedirection, is_peft_model, unwrap_model_for_generation
from .callback_handler import DistillCallbackHandler, round_ends
from .config import OnPolicyDistillConfig
from .importance_sampling import ImportanceSamplingStats
from .lmbda_schedule import lmbda_of
from .nonfinite import NonfiniteGuard, deepspeed_skipped
from .prompts import check_columns
from .rollout_buffer import RolloutBuffer, rollout_stats
from .rollout_pool import RolloutPool
from .rollouts import Rollouts, build_generation_config, teacher_inputs, teacher_prompts_of
from .samplers import GenerateSampler, TeacherSampler
from .step_batch import StepBatch
from .step_metrics import StepStatistics, log_multi_turn, log_rollouts, log_update
from .student_loss import StudentLoss
from .teachers import SelfTeacher, SelfTeacherUpdate, build_teacher, check_cached_rows
from .temperature import LossTemperature
from .vllm_rollouts import VLLMSampler, applies_correction

logger = logging.getLogger(__name__)


def _rows_collator(rows: list[dict]) -> list[dict]:
    """Keep the rows as they are: completions are made per step, so there is nothing to pad yet."""
    return rows


class OnPolicyDistillTrainer(SFTTrainer):
    """
    Trainer for on-policy knowledge distillation, a drop-in subclass of [`~trl.SFTTrainer`].

    The student samples completions for the dataset's prompts (with probability `lmbda`; otherwise the teacher writes
    them, `seq_kd=True`, or the dataset's completions are used), the teacher scores every completion token, and the
    student is trained to match the teacher there under the divergence `args.loss_type` (Agarwal et al. 2024, GKD).

    Example:

    ```python
    >>> from trl_onpolicy import OnPolicyDistillConfig, OnPolicyDistillTrainer

    >>> trainer = OnPolicyDistillTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     teacher_model="Qwen/Qwen2.5-1.5B-Instruct",
    ...     args=OnPolicyDistillConfig(output_dir="out", loss_type="jsd", beta=0.5),
    ...     train_dataset=dataset,  # prompt-only, prompt-completion or conversational
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The student, exactly as [`~trl.SFTTrainer`] takes it.
        teacher_model (`str`, [`~transformers.PreTrainedModel`] or [`~trl_onpolicy.teachers.Teacher`], *optional*):
            The teacher: a model id or path, a model, or a teacher backend. Defaults to
            `args.teacher_model_name_or_path`; with neither and a LoRA student, the student's base network.
            It must share the student's tokenizer.
        args ([`OnPolicyDistillConfig`], *optional*):
            The configuration; an [`~trl.SFTConfig`] or `TrainingArguments` is converted.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Rows with a `prompt` (and optionally `completion`) column, or a `messages` column; optionally a
            `privileged_context` or `teacher_prompt` column, the teacher's own view of the row.
        reward_funcs (callable, model, `str`, or a list of them, *optional*):
            Task rewards with TRL GRPO's signature, added to the distillation term as a policy gradient on the
            student's rollouts (see [`~trl_onpolicy.rewards`]); needs `num_generations >= 2`.
        The remaining arguments are those of [`~trl.SFTTrainer`].
    """

    _tag_names = ["trl", "trl-onpolicy", "distillation"]
    _name = "OnPolicyDistill"
    loss_is_scaled_for_ga = True  # the loss is divided by the step's global token count

    def __init__(
        self,
        model,
        teacher_model=None,
        args: OnPolicyDistillConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        reward_funcs=None,
        tools=None,
        environment_factory=None,
        parse_response=None,
        **kwargs,
    ):
        args = OnPolicyDistillConfig.from_args(args, model)
        if args.accelerator_config.dispatch_batches:
            logger.warning("`dispatch_batches` is set to False: batches are rows of text, which cannot be broadcast.")
        args.accelerator_config.dispatch_batches = False  # else an iterable eval set's rows fail in accelerate
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: a dataset of prompts for the student to complete.")
        check_columns(train_dataset, "train")
        model_paths.check_trainer_models(model, teacher_model, args)  # a missing model path: say which, before loading
        quantized.check_student(model, peft_config, kwargs.get("quantization_config"), args.model_init_kwargs)
        processing_class = trainer_setup.ensure_pad_token(processing_class, model, args)
        schemas = trainer_setup.check_tools(tools, environment_factory, processing_class, parse_response)
        self._chat_template_kwargs = {"tools": schemas} if schemas else None  # the prompts show the tools
        with args.sft_loss_type():  # SFTTrainer only knows "nll"/"dft"; ours is restored after
            super().__init__(
                model,
                args=args,
                data_collator=data_collator or _rows_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                peft_config=peft_config,
                **kwargs,
            )
        trainer_setup.check_completion_sources(args, train_dataset, self.train_dataset)
        self._build_teacher(teacher_model, train_dataset)
        self._build_step(args)
        self.rewards = trainer_setup.build_rewards(reward_funcs, args, self._tokenizer)  # task rewards, if any
        self.multi_turn = trainer_setup.build_multi_turn(tools, environment_factory, parse_response, schemas, args,
                                                         self._tokenizer)  # fmt: skip
        trainer_setup.check_multi_turn_sources(self.multi_turn, self.teacher, args)

    def _build_teacher(self, teacher_model, train_dataset) -> None:
        """The teacher (and reference model) placed for the launcher, and what the student adds to match it."""
        args, student = self.args, self.accelerator.unwrap_model(self.model)
        quantized.keep_trainable(student)  # before any forward (see quantized.py)
        merge.check_merge(self, student)
        self.teacher, self.vocab_size = build_teacher(teacher_model, args, student, self._tokenizer)
        self.train_dataset, self.eval_dataset = trainer_setup.native_teacher_prompts(self.teacher, args,
                                                                                    self.train_dataset, self.eval_dataset)  # fmt: skip
        check_cached_rows(self.teacher, self.train_dataset, args)
        self.teacher.prepare(self.accelerator)  # sharded where the launcher shards (see frozen_models.py)
        trainer_setup.check_teacher_columns(self.teacher, args, train_dataset, student)
        if isinstance(self.teacher, SelfTeacher):  # the student as its own teacher: an EMA moves after each step
            self.add_callback(SelfTeacherUpdate(self.teacher))
        self.hidden_pairs = hidden_states.attach_projector(self.model, student, self.teacher, args)
        self.reference = trainer_setup.build_reference(args, self._tokenizer, self.vocab_size, self.accelerator)
        trainer_setup.check_dtypes(self.accelerator, student, self.teacher, self.reference)

    def _build_step(self, args) -> None:
        """The parts of the step: samplers, loss temperature, rollout buffer, loss, statistics, callback handler."""
        student = self.accelerator.unwrap_model(self.model)
        self.generation_config = build_generation_config(args, self._tokenizer, model=student)
        self.vllm = VLLMSampler(self) if args.use_vllm else None
        lend = lambda: unwrap_model_for_generation(self.model_wrapped, self.accelerator)
        self.student_sampler = self.vllm or GenerateSampler(lend)  # `lend` gathers a ZeRO-3 student's weights
        self.teacher_sampler = TeacherSampler(self.teacher)
        self.loss_temperature = LossTemperature.from_config(args)
        self.rollout_buffer = RolloutBuffer(args.num_iterations, keep_logps=args.loss_type == "sampled_reverse_kl")
        self.rollout_pool = RolloutPool(args.steps_per_generation, args.generation_batch_size,
                                        args.per_device_train_batch_size)  # fmt: skip
        weighted = self.vllm is not None and applies_correction(args)  # the loss weighs vLLM's tokens
        self._importance = ImportanceSamplingStats(args.vllm_importance_sampling_clip_max) if weighted else None
        self.student_loss = StudentLoss(args, self.accelerator, self.vocab_size, self._tokenizer.pad_token_id,
                                        self.hidden_pairs, weighted, trainer_setup.span_loss(self.teacher, args))  # fmt: skip
        self._forward_redirection = ForwardRedirection()
        self.step_stats = StepStatistics()
        self.nonfinite = NonfiniteGuard(args.max_nonfinite_steps)
        self._micro_step, self._window, self._sums = 0, 1, None
        self._scored = None  # the step's rollouts and the loss's log-probs, for `on_scored`
        self._last_teacher_entropy = None
        self._rng_checkpoint = None  # a checkpoint whose RNG states are still to be restored (resuming)
        self.add_callback(checkpoints.SigtermCheckpoint(self.accelerator))  # a signal to one process stops all
        self.callback_handler = DistillCallbackHandler(self.callback_handler, self)

    # ----------------------------------------------------------------------------------------------------- set-up
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        return trainer_setup.prepare(dataset, processing_class, args, formatting_func, dataset_name,
                                     self._chat_template_kwargs)  # fmt: skip

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids"]

    # ------------------------------------------------------------------------------------------- the step's data
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's hook for a step's batches: the prompts of the whole step -> its [`StepBatch`]
        ([`make_step_batch`]), cut into its micro-batches. A step within a batch's `num_iterations` trains on the
        buffered batch instead, and its own prompts go unused. The rollout pool draws the batches (those of
        `steps_per_generation` steps at a pool's first step, see [`~trl_onpolicy.rollout_pool.RolloutPool`])."""
        step, buffer, pool = self.state.global_step, self.rollout_buffer, self.rollout_pool
        raw = pool.draw(epoch_iterator, num_batches, step, pool.size(step, self.state.max_steps, self.round_ends()))
        if not raw:
            return [], None
        if self._rng_checkpoint is not None:  # resuming mid-epoch: the RNG must be the checkpoint's before sampling
            self._load_rng_state(self._rng_checkpoint)
        self._step_start, self._scored, seconds = time.perf_counter(), None, (0.0, 0.0)
        if not buffer.holds(step):
            batch, rollouts, seconds = self.make_step_batch([row for rows in raw for row in rows])
            buffer.put(step, batch, rollout_stats(batch, self.accelerator))  # one gather: lengths, token count
            self._scored = (rollouts, []) if self.callback_handler.wants_scored else None
        micro = buffer.micro_batches(step, len(raw))
        reused = float(buffer.age > 0) if self.args.num_iterations > 1 else None
        lmbda = lmbda_of(self.args, step, self.state.max_steps) if self.args.lmbda_schedule != "constant" else None
        age = pool.age if self.args.steps_per_generation != 1 else None
        log_rollouts(self._metrics["train"], buffer.stats, seconds, self.loss_temperature.value, reused, lmbda, age)
        self.step_stats.start(tokens=buffer.stats["tokens"])
        self._micro_step, self._window = 0, len(micro)
        return micro, buffer.num_items

    def make_step_batch(self, rows: list[dict]) -> tuple[StepBatch, Rollouts, tuple[float, float]]:
        """The step's data, top to bottom: completion source -> sampler -> `on_rollouts` -> teacher scores. Returns
        the scored batch, the rollouts it was made from, and the seconds spent generating and scoring."""
        self.loss_temperature.total_steps = max(int(self.state.max_steps), 1)  # known once training has started
        self.loss_temperature.step(self.state.global_step, self._last_teacher_entropy)
        t0 = time.perf_counter()
        step = self.state.global_step
        rollouts = self.rollout_pool.rollouts(step, rows, self.make_rollouts, self._completion_source)
        rollouts = self.callback_handler.on_rollouts(self.args, self.state, self.control, rollouts)
        if len(rollouts) == 0:
            raise ValueError(
                f"Step {self.state.global_step + 1}: `on_rollouts` returned no rollouts. A filter must keep at least "
                "one completion per step; return `None` to keep the rollouts unchanged."
            )
        t1 = time.perf_counter()
        batch = self.score(rollouts)
        if getattr(self.teacher, "alignment_rate", None) is not None:  # a teacher of another tokenizer
            self._metrics["train"]["alignment_rate"].append(self.teacher.alignment_rate)
        if self.rewards is not None:
            self.rewards.attach(batch, rollouts, self._metrics["train"], self.accelerator)
        return batch, rollouts, (t1 - t0, time.perf_counter() - t1)

    def _completion_source(self, step: int) -> str:
        """Student with probability `lmbda` at `step` (its schedule's value; the same draw on every process and
        whenever it is asked), else teacher (`seq_kd`) or dataset."""
        draw = random.Random(f"{self.args.seed}-{step}").random()
        if draw < lmbda_of(self.args, step, self.state.max_steps):
            return "student"
        return "teacher" if self.args.seq_kd else "dataset"

    def make_rollouts(self, rows: list[dict], source: str) -> Rollouts:
        """Completions for `rows` (`num_generations` per row) written by `source`: the student's or the teacher's
        sampler ([`~trl_onpolicy.samplers.Sampler`]), or the dataset's own completions."""
        n = self.args.num_generations if source != "dataset" else 1
        rows = [row for row in rows for _ in range(n)]
        prompt_ids = [list(row["prompt_ids"]) for row in rows]
        extra = [{k: v for k, v in row.items() if k not in ("prompt_ids", "completion_ids")} for row in rows]
        if source == "dataset":
            completions = [list(row["completion_ids"]) for row in rows]
            if any(len(c) == 0 for c in completions):  # an iterable dataset is only seen here
                empty = [i for i, c in enumerate(completions) if not c]
                raise trainer_setup.no_completion_error(self.args, empty, len(rows))
            return Rollouts(prompt_ids, completions, source, rows=extra)
        sampler = self.student_sampler if source == "student" else self.teacher_sampler
        asked = prompt_ids if source == "student" else teacher_prompts_of(prompt_ids, extra)  # privileged context
        if self.multi_turn is not None:  # tools or an environment answer between the turns (the student's prompt)
            rollouts = self.multi_turn.rollouts(sampler, prompt_ids, extra, source, self.generation_config)
            log_multi_turn(self._metrics["train" if self.model.training else "eval"], rollouts)
            return rollouts
        samples = sampler.sample(asked, self.generation_config, self._tokenizer)
        return Rollouts(prompt_ids, samples.completion_ids, source, samples.truncated, extra, samples.logps)

    def score(self, rollouts: Rollouts) -> StepBatch:
        """Collate rollouts and have the teacher (and the reference model, if any) score them."""
        batch = StepBatch.collate(rollouts, self._tokenizer.pad_token_id, self.accelerator.device)
        temperature, inputs = self.loss_temperature.value, batch.model_inputs()
        need = "token" if self.args.loss_type == "sampled_reverse_kl" else "full"
        layers = {"hidden_layers": [j for _, j in self.hidden_pairs]} if self.hidden_pairs else {}
        teacher_in = teacher_inputs(rollouts, inputs, self._tokenizer.pad_token_id, self.accelerator.device)
        batch.teacher = self.teacher.score(teacher_in, temperature=temperature, top_k=self.args.teacher_top_k,
                                           need=need, **layers)  # fmt: skip
        if self.reference is not None:
            batch.reference_logps = self.reference.score(inputs, temperature=temperature, need="token").token_logps
        return batch

    # ---------------------------------------------------------------------------------------------- loss & update
    def compute_loss(self, model, inputs: StepBatch, return_outputs=False, num_items_in_batch=None):
        """Divergence on completion tokens, divided by the step's global token count (times processes for DDP)."""
        if num_items_in_batch is None:  # evaluation: this batch alone
            num_items_in_batch = self.accelerator.gather(inputs.completion_mask.sum().reshape(1)).sum()
        num_items = max(float(num_items_in_batch), 1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        loss, self._sums = self._forward_redirection(
            model, student, self.student_loss, student, inputs, num_items, self.loss_temperature.value
        )
        return (loss, None) if return_outputs else loss

    def _prepare_inputs(self, inputs: StepBatch) -> StepBatch:
        """A [`StepBatch`] is made on the device: nothing to move or convert (it may hold no rollouts)."""
        return inputs

    def training_step(self, model, inputs: StepBatch, num_items_in_batch=None):
        """The Trainer's step on one micro-batch, then what its loss measured is recorded (see [`_record`])."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._record(inputs, self._sums)
        self._micro_step += 1
        if self._micro_step == self._window:  # the step's last micro-batch: gradients are complete
            self._finish_step(model)
        return loss

    def _record(self, batch: StepBatch, sums) -> None:
        """What the loss measured: into the step's statistics, the buffer (behaviour log-probs), and `on_scored`."""
        self.step_stats.add(sums.loss, sums)
        self.rollout_buffer.record(self._micro_step, sums.student_token_logps)
        if self._importance is not None:
            self._importance.add(batch, sums.student_token_logps)
        if self._scored is not None:
            self._scored[1].append((sums.student_token_logps, sums.teacher_token_logps))

    def _finish_step(self, model):
        """Reduce the step's statistics (one collective, one host sync), skip a non-finite update, log the metrics."""
        total = self.step_stats.reduce(self.accelerator, [p.grad for p in model.parameters() if p.grad is not None])
        skipped = deepspeed_skipped(model, total["nonfinite"] > 0)  # DeepSpeed stepped inside `backward` already
        grads_nonfinite = total["nonfinite_grads"] > 0 if skipped is None else skipped
        what = self.nonfinite.check(self.state.global_step + 1, model.parameters(), total["nonfinite"] > 0,
                                    grads_nonfinite, self.accelerator.scaler)  # fmt: skip
        if what is not None:
            self.nonfinite.raise_if_stuck(self.state.global_step + 1, what, self.args.learning_rate,
                                          self.loss_temperature.value, self.args.output_dir)  # fmt: skip
        if total["teacher_entropy_tokens"] > 0:
            self._last_teacher_entropy = total["teacher_entropy"] / total["teacher_entropy_tokens"]
        names = getattr(self.teacher, "names", None)
        extra = self.step_stats.per_teacher_metrics(self.accelerator, names) if names else {}
        extra.update(self._importance.pop(self.accelerator) if self._importance is not None else {})
        log_update(self._metrics["train"], total, extra, hidden_matching=bool(self.hidden_pairs),
                   teacher_entropy=self._last_teacher_entropy, seconds=time.perf_counter() - self._step_start,
                   tokens=self.step_stats.tokens, nonfinite_total=self.nonfinite.total)  # fmt: skip
        if self._scored is not None and self._scored[1]:
            rollouts, logps = self._scored
            student, teacher = (torch.cat(column) for column in zip(*logps))  # (N,) each
            self.callback_handler.on_scored(self.args, self.state, self.control, rollouts, student, teacher)
        self._scored = None

    def round_ends(self) -> list[int]:
        """Global steps at which rounds end: `num_rounds` equal shares of `max_steps`."""
        return round_ends(self.state.max_steps, self.args.num_rounds)

    # ----------------------------------------------------------------------------------------- eval & checkpoints
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training rows carry the step's metrics; a row of eval-hook scores (`eval/...`) goes out on its own."""
        if "loss" not in logs and any(key.startswith("eval/") for key in logs):
            # the eval hook logs from inside a step's callbacks; `on_log` would reset `should_log` and drop that
            # step's own training row, so the flag is kept as it was
            should_log = self.control.should_log
            super(SFTTrainer, self).log(logs, start_time)
            self.control.should_log = should_log
            return None
        return super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss: the student writes completions for the eval prompts and the teacher scores them (with a
        teacher that knows only the dataset's completions, a cache, the eval rows' own completions are scored)."""
        source = "student" if self.teacher.scores_any_completion else "dataset"
        batch = self.score(self.make_rollouts(inputs, source))
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, batch)
        return loss.detach(), None, None

    def _save(self, output_dir=None, state_dict=None):
        """The student's weights as `from_pretrained` expects them; a learned hidden-state projector in its own file;
        with `save_merged_model`, a LoRA student's final save merged into a float model (checkpoints keep adapters)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        folder = output_dir if output_dir is not None else self.args.output_dir
        is_checkpoint = os.path.basename(os.path.normpath(folder)).startswith(PREFIX_CHECKPOINT_DIR)
        if self.args.save_merged_model and is_peft_model(unwrapped) and not is_checkpoint:
            return merge.save_merged(self, folder, state_dict)
        if hidden_states.projector_of(unwrapped) is None:
            return super()._save(output_dir, state_dict)
        state_dict = hidden_states.without_projector(state_dict if state_dict is not None else unwrapped.state_dict())
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            hidden_states.save_projector(unwrapped, output_dir if output_dir is not None else self.args.output_dir)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """TRL's model card, followed by how the student was distilled (see [`~trl_onpolicy.model_card`])."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.isfile(path):
            model_card.finish_card(self, path, dataset_name)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        hidden_states.load_projector(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )

    def _save_checkpoint(self, model, trial):
        """The distillation state first ([`~trl_onpolicy.checkpoints.save_distill_state`]), then the Trainer's
        checkpoint, whose state file comes last."""
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        checkpoints.save_distill_state(self, folder)
        super()._save_checkpoint(model, trial)

    def _load_rng_state(self, checkpoint):
        """Restore the checkpoint's RNG states once. The Trainer restores them after fetching the first resumed step's
        batches, but this trainer samples rollouts inside that fetch (`get_batch_samples`), so it restores them there
        first; the Trainer's later call would rewind the generator past those samples and is skipped."""
        if checkpoint is not None and checkpoint == self._rng_checkpoint:
            super()._load_rng_state(checkpoint)
            self._rng_checkpoint = None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """[`~transformers.Trainer.train`]; `resume_from_checkpoint=True` (or `"true"`, `"last"`, a run folder) takes
        the last *whole* checkpoint (one a killed process left half-written is skipped; see
        [`~trl_onpolicy.checkpoints.resolve_resume_from_checkpoint`]) and restores the distillation state and rollout
        buffer with it."""
        resume_from_checkpoint = checkpoints.prepare_resume(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)
