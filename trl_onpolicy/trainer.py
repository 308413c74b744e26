"""`OnPolicyDistillTrainer`: the student writes, the teacher scores every token, the student moves toward the teacher.

One optimizer step, in the order the data flows:

1. `get_batch_samples` takes the prompts of the whole step (all gradient-accumulation micro-batches at once), decides
   where the completions come from (student with probability `lmbda`, else teacher or dataset), samples them,
   lets the callbacks see them (`on_rollouts`), and has the teacher score them once; with `num_iterations > 1` the
   scored batch is kept and trains the next `num_iterations - 1` steps too (`rollout_buffer.py`);
2. `compute_loss` runs the student over prompt + completion and takes the divergence on completion tokens only,
   chunk by chunk, normalised by the step's global completion-token count;
3. `training_step` backpropagates and, on the step's last micro-batch, skips an update whose loss or gradients are
   not finite (counted; too many in a row stop training with an error);
4. at each round end the callbacks' `on_round_end` fires on every process and a checkpoint is written.

How it departs from TRL's `GKDTrainer` / `DistillationTrainer`: the sampling temperature and the loss temperature are
separate (the latter scheduled); the teacher is a backend that returns log-probs in one of three forms; the data loader
is left as SFT's and the whole step's rollouts are made in `get_batch_samples`, so accumulation needs no repeat sampler.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections import defaultdict

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from . import checkpoints, hidden_states, merge, model_card, model_paths, precision, quantized
from ._compat import ForwardRedirection, hidden_states_request, is_peft_model, unwrap_model_for_generation
from .callbacks import completion_records
from .config import OnPolicyDistillConfig
from .heads import linear_head, output_logits
from .importance_sampling import ImportanceSamplingStats
from .launchers import call_with_whole_head
from .loss import LossSums, distillation_loss
from .nonfinite import NonfiniteGuard, deepspeed_skipped, local_nonfinite
from .prompts import check_columns, prepare_dataset
from .rollout_buffer import RolloutBuffer, rollout_stats
from .rollouts import Rollouts, build_generation_config, collate, position_kwargs, sample
from .rounds import RoundsCallback
from .teachers import (
    EnsembleTeacher, LocalTeacher, build_teacher, check_cached_rows, load_teacher_model, local_models,
    micro_batch_rows,
)  # fmt: skip
from .teachers.ensemble import per_teacher_metrics
from .temperature import LossTemperature, grad_scale
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
            Rows with a `prompt` (and optionally `completion`) column, or a `messages` column.
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
        processing_class = self._ensure_pad_token(processing_class, model, args)
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
        self._check_completion_sources(train_dataset)
        student = self.accelerator.unwrap_model(self.model)
        quantized.keep_trainable(student)  # before any forward (see quantized.py)
        merge.check_merge(self, student)
        self.teacher, self.vocab_size = build_teacher(teacher_model, args, student, self._tokenizer)
        check_cached_rows(self.teacher, self.train_dataset, args)
        self.teacher.prepare(self.accelerator)  # sharded where the launcher shards (see frozen_models.py)
        if isinstance(self.teacher, EnsembleTeacher):
            self.teacher.check_columns(train_dataset.column_names or list(next(iter(train_dataset)).keys()))
        self.hidden_pairs = hidden_states.attach_projector(self.model, student, self.teacher, args)
        self.reference = self._build_reference(args)
        self._check_dtypes(student)
        self.generation_config = build_generation_config(args, self._tokenizer, model=student)
        self.loss_temperature = LossTemperature(
            schedule=args.loss_temperature_schedule,
            start=args.temperature_start,
            end=args.temperature_end,
            total_steps=max(args.max_steps, 1),
            target_entropy=args.target_teacher_entropy,
            min_temperature=args.temperature_min,
            max_temperature=args.temperature_max,
            adapt_rate=args.temperature_adapt_rate,
        )
        self._forward_redirection = ForwardRedirection()
        self._step_stats = defaultdict(float)
        self._micro_step, self._window = 0, 1
        self.nonfinite = NonfiniteGuard(args.max_nonfinite_steps)
        self._last_teacher_entropy = None
        self._rng_checkpoint = None  # a checkpoint whose RNG states are still to be restored (resuming)
        self.rollout_buffer = RolloutBuffer(args.num_iterations, keep_logps=args.loss_type == "sampled_reverse_kl")
        self.add_callback(RoundsCallback(self))
        self.add_callback(checkpoints.SigtermCheckpoint(self.accelerator))  # a signal to one process stops all
        for callback in self.callback_handler.callbacks:  # e.g. LmEvalCallback logs through `trainer.log`
            if getattr(callback, "trainer", False) is None:
                callback.trainer = self
        self.vllm = VLLMSampler(self) if args.use_vllm else None
        weighted = self.vllm is not None and applies_correction(args)  # the loss weights vLLM's tokens
        self._importance = ImportanceSamplingStats(args.vllm_importance_sampling_clip_max) if weighted else None

    # ----------------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _ensure_pad_token(processing_class, model, args):
        if processing_class is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            processing_class = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token is None:
            logger.warning("The tokenizer has no pad token: using its eos token %r for padding.", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        return processing_class

    def _check_completion_sources(self, dataset) -> None:
        """Off-policy batches need completions: from the teacher (`seq_kd`) or from the dataset."""
        if self.args.lmbda >= 1.0 or self.args.seq_kd:
            return
        columns = dataset.column_names or list(next(iter(dataset)).keys())
        if "completion" not in columns and "messages" not in columns:
            raise ValueError(
                f"`lmbda={self.args.lmbda}` makes some batches off-policy, which need completions, but the dataset "
                f"has none (columns: {columns}). Set `seq_kd=True` to let the teacher write them, set `lmbda=1.0`, "
                "or add a `completion` column."
            )
        if isinstance(self.train_dataset, Dataset):
            empty = [i for i, ids in enumerate(self.train_dataset["completion_ids"]) if len(ids) == 0]
            if empty:
                raise self._no_completion_error(empty, len(self.train_dataset))

    def _no_completion_error(self, empty: list[int], total: int) -> ValueError:
        return ValueError(
            f"`lmbda={self.args.lmbda}` makes some batches off-policy, which use the dataset's completions, but "
            f"{len(empty)} of {total} rows have no completion (rows {empty[:5]}: a `messages` row that does not end with "
            "an assistant turn, or a None `completion`). Set `seq_kd=True` to let the teacher write them, set "
            "`lmbda=1.0`, or filter these rows out."
        )

    def _build_reference(self, args):
        if args.reference_model_name_or_path is None:
            return None
        reference = load_teacher_model(args.reference_model_name_or_path, args, self._tokenizer)
        return LocalTeacher(
            reference, vocab_size=self.vocab_size, micro_batch_size=micro_batch_rows(args)
        ).prepare(self.accelerator)  # sharded where the launcher shards (see frozen_models.py)

    def _check_dtypes(self, student):
        """One half-precision format per run (see [`~trl_onpolicy.precision.check_teacher_dtype`])."""
        autocast = precision.autocast_dtype(self.accelerator)
        frozen = [("teacher", m) for m in local_models(self.teacher)]
        frozen += [("reference model", self.reference.model)] if self.reference is not None else []
        for what, model in frozen:
            precision.check_teacher_dtype(student.dtype, model.dtype, autocast, what)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if formatting_func is not None:
            raise ValueError(
                "`formatting_func` is not supported: on-policy distillation needs the prompt separate from the "
                "completion. Map your dataset to `prompt`/`completion` (or `messages`) columns instead."
            )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        return prepare_dataset(
            dataset, tokenizer, args.max_prompt_length, args.max_completion_length, dataset_name, args.dataset_num_proc
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids"]

    # ---------------------------------------------------------------------------------------------- rollouts
    def _completion_source(self) -> str:
        """Student with probability `lmbda` (the same draw on every process), else teacher (`seq_kd`) or dataset."""
        draw = random.Random(f"{self.args.seed}-{self.state.global_step}").random()
        if draw < self.args.lmbda:
            return "student"
        return "teacher" if self.args.seq_kd else "dataset"

    def make_rollouts(self, rows: list[dict], source: str) -> Rollouts:
        """Completions for `rows` (`num_generations` per row) written by `source`."""
        n = self.args.num_generations if source != "dataset" else 1
        rows = [row for row in rows for _ in range(n)]
        prompt_ids = [list(row["prompt_ids"]) for row in rows]
        extra = [{k: v for k, v in row.items() if k not in ("prompt_ids", "completion_ids")} for row in rows]
        sampling_logps = None  # the sampler's own log-probs of its tokens, where it reports them (vLLM)
        if source == "dataset":
            completions = [list(row["completion_ids"]) for row in rows]
            if any(len(c) == 0 for c in completions):  # an iterable dataset is only seen here
                raise self._no_completion_error([i for i, c in enumerate(completions) if not c], len(rows))
            truncated = [False] * len(rows)
        elif source == "student" and self.vllm is not None:
            completions, truncated, sampling_logps = self.vllm.sample(
                prompt_ids, self.generation_config, self._tokenizer
            )
        elif source == "student":
            with self._unwrapped_for_generation() as student:
                completions, truncated = sample(student, prompt_ids, self.generation_config, self._tokenizer)
        else:
            completions, truncated = self.teacher.generate(prompt_ids, self.generation_config, self._tokenizer)
        return Rollouts(prompt_ids, completions, source, truncated, extra, sampling_logps)

    def _unwrapped_for_generation(self):
        return unwrap_model_for_generation(self.model_wrapped, self.accelerator)

    def _dispatch(self, event: str, **kwargs):
        """Send a distillation event to the callbacks that define it, in order."""
        for callback in self.callback_handler.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self.args, self.state, self.control, **kwargs)

    def _edit_rollouts(self, rollouts: Rollouts) -> Rollouts:
        """`on_rollouts` along the callbacks in order: each sees the rollouts the previous one returned (None = keep)."""
        for callback in self.callback_handler.callbacks:
            method = getattr(callback, "on_rollouts", None)
            if method is not None:
                edited = method(self.args, self.state, self.control, rollouts=rollouts)
                rollouts = edited if edited is not None else rollouts
        return rollouts

    def score(self, rollouts: Rollouts) -> dict:
        """Collate rollouts and have the teacher (and the reference model, if any) score them."""
        batch = collate(rollouts, self._tokenizer.pad_token_id, self.accelerator.device)
        temperature = self.loss_temperature.value
        batch["rows"] = rollouts.rows  # the dataset rows, for routing to several teachers
        batch["teacher"] = self._teacher_scores(batch, temperature)
        if self.reference is not None:
            batch["reference"] = self.reference.score(batch, temperature=temperature, need="token").token_logps
        return batch

    def _teacher_scores(self, batch: dict, temperature: float):
        need = "token" if self.args.loss_type == "sampled_reverse_kl" else "full"
        kwargs = {"hidden_layers": [j for _, j in self.hidden_pairs]} if self.hidden_pairs else {}
        return self.teacher.score(batch, temperature=temperature, top_k=self.args.teacher_top_k, need=need, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Prompts of a whole optimizer step -> rollouts -> teacher scores, split into its micro-batches. A step within
        a batch's `num_iterations` trains on the buffered batch instead, and its own prompts go unused."""
        raw = list(itertools.islice(epoch_iterator, num_batches))
        if not raw:
            return [], None
        if self._rng_checkpoint is not None:  # resuming mid-epoch: the RNG must be the checkpoint's before sampling
            self._load_rng_state(self._rng_checkpoint)
        buffer, self._pending, seconds = self.rollout_buffer, None, (0.0, 0.0)
        self._step_start = time.perf_counter()
        if not buffer.holds(self.state.global_step):
            seconds = self._fresh_batch([row for rows in raw for row in rows])
        micro = buffer.micro_batches(self.state.global_step, len(raw))
        self._record_step_stats(buffer.stats, *seconds)
        self._micro_step, self._window = 0, len(micro)
        return micro, buffer.num_items

    def _fresh_batch(self, rows: list[dict]) -> tuple[float, float]:
        """Sample and score the step's rollouts into the buffer; the seconds spent generating and scoring them."""
        self.loss_temperature.step(self.state.global_step, self._last_teacher_entropy)
        t0 = time.perf_counter()
        rollouts = self._edit_rollouts(self.make_rollouts(rows, self._completion_source()))
        if len(rollouts) == 0:
            raise ValueError(
                f"Step {self.state.global_step + 1}: `on_rollouts` returned no rollouts. A filter must keep at least "
                "one completion per step; return `None` to keep the rollouts unchanged."
            )
        t1 = time.perf_counter()
        batch = self.score(rollouts)
        t2 = time.perf_counter()
        stats = rollout_stats(rollouts, batch, self.accelerator)
        num_items = float(self.accelerator.gather(batch["completion_mask"].sum().reshape(1)).sum())  # one sync a step
        self.rollout_buffer.put(self.state.global_step, batch, num_items, stats)
        if any(hasattr(c, "on_scored") for c in self.callback_handler.callbacks):
            self._pending = {"rollouts": rollouts, "student": [], "teacher": []}
        return t1 - t0, t2 - t1

    def _record_step_stats(self, stats: dict[str, float], gen_seconds: float, teacher_seconds: float):
        """The step's rollout metrics: a reused batch's lengths again, and no generation or teacher time."""
        metrics = self._metrics["train"]
        metrics["completion_length"].append(stats["completion_length"])
        metrics["truncated_fraction"].append(stats["truncated_fraction"])
        metrics["loss_temperature"].append(self.loss_temperature.value)
        metrics["time/generation"].append(gen_seconds)
        metrics["time/teacher"].append(teacher_seconds)
        if self.args.num_iterations > 1:
            metrics["rollouts/reused"].append(float(self.rollout_buffer.age > 0))
        self._step_stats = defaultdict(float, tokens=stats["tokens"])

    # ------------------------------------------------------------------------------------------------------ loss
    def _student_loss(self, student, inputs: dict, num_items: float):
        """Runs inside the wrapper's forward (DDP/FSDP see the whole computation): student pass + chunked loss."""
        n_completion = inputs["completion_ids"].shape[1]
        causal_lm = student.get_base_model() if is_peft_model(student) else student
        if inputs["input_ids"].shape[0] == 0:  # `on_rollouts` kept fewer rollouts than there are micro-batches
            sums = self._empty_loss(causal_lm)
            return sums.loss, sums
        backbone = causal_lm.base_model  # the network without its head: the loss projects the hidden states itself
        with self.accelerator.autocast():  # as accelerate runs the model's forward, without casting outputs to float32
            out = backbone(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                **position_kwargs(backbone, inputs["attention_mask"]),
                output_hidden_states=hidden_states_request([i for i, _ in self.hidden_pairs or []]),
                use_cache=False,
            )
        hidden = out.last_hidden_state[:, -n_completion - 1 : -1]  # (B, C, H)
        mask = inputs["completion_mask"].bool()  # (B, C)
        teacher = inputs["teacher"].flatten(mask)
        sampler = inputs.get("sampling_logps") if self._importance is not None else None  # (B, C)
        autocast = precision.autocast_dtype(self.accelerator)
        sums = call_with_whole_head(causal_lm, lambda h: distillation_loss(  # a sharded head gathered once
            h,  # (N, H)
            linear_head(causal_lm, autocast=autocast) or (lambda x: output_logits(causal_lm, x, autocast)),
            teacher,
            inputs["completion_ids"][mask],  # (N,)
            loss_type=self.args.loss_type,
            beta=self.args.beta,
            skew_alpha=self.args.skew_alpha,
            reward_scale=self.args.reward_scale,
            ref_token_logps=inputs["reference"][mask] if "reference" in inputs else None,
            behaviour_logps=inputs["behaviour_logps"][mask] if "behaviour_logps" in inputs else None,  # reused
            sampler_logps=None if sampler is None else sampler[mask],  # vLLM's log-probs of its tokens
            importance_sampling_clip_max=self.args.vllm_importance_sampling_clip_max,
            vocab_size=self.vocab_size,
            num_items=num_items,
            scale=grad_scale(self.loss_temperature.value, self.args.temperature_grad_scale),
            chunk_size=self.args.loss_chunk_size,
            head_params=[p for p in causal_lm.get_output_embeddings().parameters() if p.requires_grad],
            vocab_tile=self.args.loss_vocab_tile,
        ), hidden[mask])
        if self.hidden_pairs:
            term, sums.hidden_distance = hidden_states.matching_term(
                out.hidden_states, mask, teacher.layer_hidden, self.hidden_pairs, student, self.args, num_items
            )
            sums.loss = sums.loss + term
        return sums.loss, sums

    def _empty_loss(self, causal_lm) -> LossSums:
        """A zero loss over one pad token, making the module calls of any micro-batch (backbone, then the head through
        `call_with_whole_head`): DDP reduces every weight's gradient, and under FSDP2 / ZeRO-3 this process gathers
        the weights the others gather (ZeRO-3 also checks that the processes call the same submodules)."""
        pad = torch.full((1, 1), self._tokenizer.pad_token_id, device=self.accelerator.device)  # (1, 1)
        hidden = causal_lm.base_model(input_ids=pad, use_cache=False).last_hidden_state[:, -1]  # (1, H)

        def zero(h):
            head = linear_head(causal_lm) or (lambda x: output_logits(causal_lm, x))
            loss = head(h).float().sum() * 0.0
            return LossSums(loss, student_token_logps=loss.new_zeros(0), teacher_token_logps=loss.new_zeros(0))

        return call_with_whole_head(causal_lm, zero, hidden)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Divergence on completion tokens, divided by the step's global token count (times processes for DDP)."""
        if num_items_in_batch is None:  # evaluation: this batch alone
            num_items_in_batch = self.accelerator.gather(inputs["completion_mask"].sum().reshape(1)).sum()
        num_items = max(float(num_items_in_batch), 1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        loss, sums = self._forward_redirection(model, student, self._student_loss, student, inputs, num_items)
        stats = self._step_stats
        for key in ("divergence", "student_entropy", "teacher_entropy", "teacher_entropy_tokens", "hidden_distance"):
            stats[key] += getattr(sums, key)
        stats["local_tokens"] += sums.tokens
        if sums.teacher_tokens is not None:
            stats["per_teacher"] = stats.get("per_teacher", 0) + torch.cat(
                [sums.teacher_divergence, sums.teacher_tokens]
            )
        stats["nonfinite"] += (~torch.isfinite(loss.detach())).float()  # no host sync: read once per step
        if self.model.training:
            self.rollout_buffer.record(self._micro_step, sums.student_token_logps)  # the behaviour policy of reuses
            if self._importance is not None:
                self._importance.add(inputs, sums.student_token_logps)
            if getattr(self, "_pending", None) is not None:
                self._pending["student"].append(sums.student_token_logps)
                self._pending["teacher"].append(sums.teacher_token_logps)
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_step += 1
        if self._micro_step == self._window:  # the step's last micro-batch: gradients are complete
            self._finish_step(model)
        return loss

    def _finish_step(self, model):
        """Gather the step's statistics (one reduction, one host sync), skip a non-finite update, log the metrics."""
        stats = self._step_stats
        keys = ("divergence", "student_entropy", "teacher_entropy", "teacher_entropy_tokens", "local_tokens",
                "nonfinite", "hidden_distance")  # fmt: skip
        device = self.accelerator.device
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        local = torch.stack(
            [torch.as_tensor(stats[k], dtype=torch.float64, device=device) for k in keys]
            + [local_nonfinite(grads).to(device=device, dtype=torch.float64)]
        )  # (8,)
        values = self.accelerator.reduce(local, reduction="sum").tolist()
        total = dict(zip((*keys, "nonfinite_grads"), values))
        skipped = deepspeed_skipped(model, total["nonfinite"] > 0)  # DeepSpeed stepped inside `backward` already
        grads_nonfinite = total["nonfinite_grads"] > 0 if skipped is None else skipped
        what = self.nonfinite.check(self.state.global_step + 1, model.parameters(), total["nonfinite"] > 0,
                                    grads_nonfinite, self.accelerator.scaler)  # fmt: skip
        if what is not None:
            self.nonfinite.raise_if_stuck(self.state.global_step + 1, what, self.args.learning_rate,
                                          self.loss_temperature.value, self.args.output_dir)  # fmt: skip
        tokens = max(total["local_tokens"], 1.0)
        if total["teacher_entropy_tokens"] > 0:
            self._last_teacher_entropy = total["teacher_entropy"] / total["teacher_entropy_tokens"]
        metrics = self._metrics["train"]
        metrics["divergence"].append(total["divergence"] / tokens)
        metrics["student_entropy"].append(total["student_entropy"] / tokens)
        if self.hidden_pairs:
            metrics["hidden_state_distance"].append(total["hidden_distance"] / tokens)
        self._log_per_teacher(stats.get("per_teacher"))
        for key, value in (self._importance.pop(self.accelerator) if self._importance is not None else {}).items():
            metrics[key].append(value)
        if self._last_teacher_entropy is not None:
            metrics["teacher_entropy"].append(self._last_teacher_entropy)
        seconds = time.perf_counter() - self._step_start
        metrics["time/update"].append(seconds - metrics["time/generation"][-1] - metrics["time/teacher"][-1])
        metrics["tokens_per_second"].append(stats["tokens"] / max(seconds, 1e-9))
        metrics["nonfinite_skipped"] = [float(self.nonfinite.total)]
        self._emit_records()

    def _log_per_teacher(self, local):
        """Several teachers: each one's divergence (weighted by its share of each token) and its tokens."""
        names = getattr(self.teacher, "names", None)
        if names is None:
            return
        local = local if isinstance(local, torch.Tensor) else torch.zeros(2 * len(names), dtype=torch.float64)
        total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").tolist()
        for key, value in per_teacher_metrics(names, total).items():
            self._metrics["train"][key].append(value)

    def _emit_records(self):
        pending, self._pending = getattr(self, "_pending", None), None
        if not pending or not pending["student"]:
            return
        student, teacher = torch.cat(pending["student"]), torch.cat(pending["teacher"])  # (N,)
        records = completion_records(pending["rollouts"], student, teacher, self._tokenizer)
        self._dispatch("on_scored", records=records)

    # ---------------------------------------------------------------------------------------------------- rounds
    def round_ends(self) -> list[int]:
        """Global steps at which rounds end: `num_rounds` equal shares of `max_steps`."""
        total, n = self.state.max_steps, self.args.num_rounds
        return sorted({max(1, round(total * (r + 1) / n)) for r in range(n)})

    def round_ending_at(self, step: int) -> int | None:
        """The (1-based) round that ends at `step`, if any."""
        ends = self.round_ends()
        return ends.index(step) + 1 if step in ends else None

    def end_round(self, round_index: int):
        """Fire `on_round_end` on every process, then wait for all (the main process may be evaluating)."""
        logger.info("Round %d of %d ended at step %d.", round_index, self.args.num_rounds, self.state.global_step)
        self._dispatch(
            "on_round_end",
            round_index=round_index,
            model=self.model,
            processing_class=self.processing_class,
            trainer=self,
        )
        self.accelerator.wait_for_everyone()

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
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        if os.path.isfile(path):
            model_card.finish_card(self, path, dataset_name)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        hidden_states.load_projector(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )

    def _save_checkpoint(self, model, trial):
        """The distillation state first (atomically), each process's rollout buffer within a reuse window, then the
        Trainer's checkpoint, whose state file comes last."""
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            checkpoints.write_state(folder, checkpoints.distill_state(self))
        self.rollout_buffer.save(folder, self.accelerator.process_index, self.state.global_step)
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
        resume_from_checkpoint = checkpoints.resolve_resume_from_checkpoint(
            resume_from_checkpoint, self.args.output_dir
        )
        self._rng_checkpoint = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        if isinstance(resume_from_checkpoint, str):
            state = checkpoints.read_state(resume_from_checkpoint)
            if state is not None:
                checkpoints.restore_distill_state(self, state)
        self.rollout_buffer.restore(self._rng_checkpoint, self.accelerator, self._teacher_scores)
        return super().train(resume_from_checkpoint, *args, **kwargs)
