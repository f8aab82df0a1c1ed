"""Train a deltatune delta with ``transformers.Trainer``.

    import deltatune as dt
    from deltatune.hf import DeltaTuneTrainer

    tuned = dt.attach(model, "lora", r=8)
    trainer = DeltaTuneTrainer(model=tuned, args=TrainingArguments(...), train_dataset=data)
    trainer.train()                      # the artifact lands in <output_dir>/deltatune
    again = dt.load(base_model, "<output_dir>/deltatune")

``DeltaTuneTrainer`` is a thin ``Trainer`` subclass: it adds the policy's extra loss, lets a policy that
takes the whole step (``Policy.train_step``: zeroth-order steps from forward passes) take it, reads the
wrapped model's forward signature (so ``remove_unused_columns`` and ``label_names`` behave as for the
plain model), writes only the delta when it saves (``<dir>/deltatune``, never the frozen base) and restores
the delta and the policy state on ``resume_from_checkpoint``. It installs ``DeltaTuneCallback`` itself.

With a plain ``Trainer``, pass ``**dt.hf.trainer_kwargs(tuned)`` (model + callback) and set
``remove_unused_columns=False, label_names=["labels"]`` in ``TrainingArguments``: the ``Tuned`` wrapper's
``forward(*args, **kwargs)`` hides the model's argument names. The plain Trainer then also writes the delta's
tensors as its own ``model.safetensors`` in every checkpoint (``DeltaStateModel``: never the frozen base,
which with tied weights it could not save) and loads them back on resume; it does not add
``policy.extra_loss``, nor mixup / the contrastive loss (``DeltaTuneTrainer(mixup=..., contrastive=...)``, a
run config's ``train.mixup`` / ``train.contrastive``).

Checkpoint layout (``checkpoint-N/``): ``deltatune/`` (the artifact at step N, loadable with ``dt.load``),
``deltatune_policy.json`` + ``deltatune_policy.safetensors`` (the policy's ``state_dict`` and which delta
tensors train), next to the Trainer's own ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``...
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import can_return_loss, find_labels

from deltatune.core import artifact
from deltatune.core.delta import Delta
from deltatune.core.optim import LORAPLUS_LR_EMBEDDING, loraplus_optimizer
from deltatune.core.tuned import ModelWrapper, Tuned
from deltatune.data import grpo, lm_loss, preference
from deltatune.data.tasks import LossTerms, classification_head, head_positions
from deltatune.data.tasks import _is_causal as is_causal
from deltatune.data.tasks import _unwrap as unwrap
from deltatune.errors import DeltatuneError
from deltatune.train.state import join, split
from deltatune.train.step import PolicyStep, inner_optimizer, mean_over_ranks, skips_steps, takes_whole_steps

ARTIFACT_DIR = "deltatune"  # sub-folder of output_dir / checkpoint-N holding the artifact
POLICY_JSON = "deltatune_policy.json"
POLICY_TENSORS = "deltatune_policy.safetensors"


# -- policy state on disk -------------------------------------------------------------------
@contextlib.contextmanager
def zero3_gathered(tuned: Tuned) -> Any:
    """The delta's tensors whole on every rank while the block runs, when DeepSpeed ZeRO-3 has partitioned them
    (outside its gather they are shape [0]: PEFT's empty-adapter failure). A collective: every rank must enter, so
    callers gather on all ranks and write on the one that saves. A no-op without DeepSpeed."""
    partitioned = [p for p in tuned.deltas.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # present: only DeepSpeed marks parameters with ds_id

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _refuse_zero_below_3(trainer: Trainer) -> None:
    """DeepSpeed ZeRO-1/2 through this bridge trains nothing: measured on DeepSpeed 0.19.8's CPU accelerator, no
    gradient reaches its fp32 partitions, so the saved delta would be the initial one. Refused until that is
    understood; ZeRO-3 (gathered for the save) and the native loop's FSDP2 / DDP train (docs/distributed.md)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    stage = getattr(plugin, "zero_stage", None)
    if stage is not None and stage < 3:
        raise DeltatuneError(f"DeepSpeed ZeRO stage {stage} through DeltaTuneTrainer leaves the delta untrained (no "
                             "gradient reaches DeepSpeed's partitions: docs/distributed.md); use zero_optimization."
                             "stage 3, or deltatune's own loop with DDP / FSDP2 (torchrun, train.fsdp)")


def save_policy_state(tuned: Tuned, folder: str | os.PathLike) -> None:
    """Write the policy's ``state_dict`` and the trainable flags of the delta tensors into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    state = split(tuned.policy.state_dict(), tensors)
    doc = {
        "policy": type(tuned.policy).__name__,
        "state": state,
        "trainable": {name: p.requires_grad for name, p in tuned.deltas.named_parameters()},
    }
    artifact.save_tensor_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, folder / POLICY_TENSORS)
    (folder / POLICY_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def load_policy_state(tuned: Tuned, folder: str | os.PathLike) -> bool:
    """Restore what ``save_policy_state`` wrote; False when ``folder`` holds no policy state."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / POLICY_JSON).is_file():
        return False
    doc = json.loads((folder / POLICY_JSON).read_text())
    tensors = load_file(str(folder / POLICY_TENSORS)) if (folder / POLICY_TENSORS).is_file() else {}
    flags = doc.get("trainable", {})
    for name, p in tuned.deltas.named_parameters():
        if name in flags:
            p.requires_grad_(bool(flags[name]))
    tuned.policy.load_state_dict(join(doc.get("state", {}), tensors))
    return True


# -- the callback -------------------------------------------------------------------------------
class DeltaTuneCallback(TrainerCallback):
    """Runs the policy of ``tuned`` inside a ``transformers.Trainer`` and saves the delta.

    The policy's hooks are the native loop's (``train/step.py``, ``PolicyStep``):

    * ``before_optimizer_step(step, tuned, optimizer)`` then ``skip_step(step, loss)``, before the Trainer
      clips (``DeltaTuneTrainer``) or in ``on_pre_optimizer_step`` (a plain Trainer: the gradients are then
      already clipped). ``skip_step`` sees the step's loss with ``DeltaTuneTrainer`` only (it records it);
      True drops every gradient the optimizer holds, so the optimizer step changes nothing,
    * ``after_optimizer_step(step, tuned, optimizer)`` in ``on_optimizer_step``, then the optimizer is kept
      consistent with a changed trainable set,
    * ``should_stop(step, epoch_end)`` in ``on_step_end``; True stops training,
    * ``on_save``: ``checkpoint-N/deltatune/`` (artifact) and ``checkpoint-N/deltatune_policy.*``,
    * ``on_train_end``: the artifact in ``<output_dir>/deltatune``.

    ``step`` is the 0-based index of the optimizer step (``state.global_step`` before it is incremented),
    the same number the native loop passes. Only the process with ``args.should_save`` writes.
    """

    def __init__(self, tuned: Tuned, *, save_artifact: bool = True, save_on_checkpoint: bool = True,
                 artifact_dir: str = ARTIFACT_DIR) -> None:
        if not isinstance(tuned, Tuned):
            raise DeltatuneError("DeltaTuneCallback takes the Tuned model returned by dt.attach / dt.load")
        self.tuned = tuned
        self.save_artifact = save_artifact
        self.save_on_checkpoint = save_on_checkpoint
        self.artifact_dir = artifact_dir
        self.restored = False  # set when the trainer already restored the policy state of a resumed run
        # the Trainer builds its optimizer from the tensors that train: a tensor joins it when it starts training
        self.policy_step = PolicyStep(tuned, add_frozen=False)
        self._before_done: int | None = None
        self.step_loss: torch.Tensor | None = None  # DeltaTuneTrainer adds each micro-batch's share of the loss

    # the policy around the optimizer step ------------------------------------------------------
    def run_before(self, step: int, optimizer: Any) -> None:
        """The policy's hooks before optimizer step ``step``, once per step (both the clipping override and
        ``on_pre_optimizer_step`` call it)."""
        if self._before_done == step:
            return
        self._before_done = step
        step_loss, self.step_loss = self.step_loss, None
        # the mean over ranks (a collective) only for a policy that may skip
        use = step_loss is not None and skips_steps(self.tuned.policy)
        self.policy_step.before(step, inner_optimizer(optimizer), float(mean_over_ranks(step_loss)) if use else None)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if state.global_step > 0 and not self.restored:  # a resumed plain Trainer: find the checkpoint it left
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not load_policy_state(self.tuned, folder):
                warnings.warn(
                    f"resuming at step {state.global_step} but {folder} holds no {POLICY_JSON}: the policy "
                    "starts from its initial state (use DeltaTuneTrainer to resume from any checkpoint folder)",
                    stacklevel=2,
                )
        self.restored = True
        self._before_done = None
        self.tuned.policy.plan(state.max_steps, args.gradient_accumulation_steps)
        self.policy_step = PolicyStep(self.tuned, add_frozen=False)
        optimizer = kw.get("optimizer")
        if optimizer is not None:  # the optimizer was built before plan() and a restored state: align it
            inner = inner_optimizer(optimizer)
            known = {id(p) for g in inner.param_groups for p in g["params"]}
            self.policy_step.trainable = {id(p) for p in self.tuned.deltas.parameters() if id(p) in known}
            self.policy_step.sync(inner)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kw: Any):
        self.run_before(state.global_step, optimizer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: Any = None, **kw: Any):
        self.policy_step.after(state.global_step, inner_optimizer(optimizer))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        if self.tuned.policy.should_stop(state.global_step - 1, epoch_end):
            control.should_training_stop = True

    # saving ---------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not self.save_on_checkpoint:
            return
        with zero3_gathered(self.tuned):  # every rank gathers; the one that saves writes
            if not args.should_save:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (folder / self.artifact_dir / artifact.META_FILE).is_file():  # DeltaTuneTrainer wrote it already
                self.tuned.save(folder / self.artifact_dir)
            save_policy_state(self.tuned, folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not self.save_artifact:
            return
        with zero3_gathered(self.tuned):
            if args.should_save:
                self.tuned.save(Path(args.output_dir) / self.artifact_dir)


class DeltaStateModel(ModelWrapper):
    """The model ``trainer_kwargs`` gives a plain ``transformers.Trainer``: the Tuned, seen through a state dict that
    holds the delta's tensors only (``tuned.deltas``' keys).

    A plain Trainer saves ``model.state_dict()`` into every checkpoint (``model.safetensors``) for a model that is not
    a ``PreTrainedModel``, and loads it back on resume. The Tuned's own state dict also holds the frozen base: the
    whole model in every checkpoint, and one that safetensors refuses to write when weights are tied (an embedding
    shared with the LM head, as in SmolLM2: "Some tensors share memory"). The base never changes while the delta
    trains, so the delta is all a checkpoint needs. Everything else (forward, ``config``, ``generate``, ...) is the
    Tuned's."""

    def __init__(self, tuned: Tuned) -> None:
        super().__init__()
        self.model = tuned

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.deltas.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.model.deltas.load_state_dict(state_dict, strict=strict, assign=assign)


def trainer_kwargs(tuned: Tuned, **callback_options: Any) -> dict[str, Any]:
    """``Trainer(**trainer_kwargs(tuned), args=..., train_dataset=...)``: the model (``tuned`` seen as a
    ``DeltaStateModel``, so the Trainer's checkpoints hold the delta, not the base) and the callback.

    With a plain ``Trainer`` also set ``remove_unused_columns=False`` and ``label_names=["labels"]``
    in ``TrainingArguments`` (or use ``DeltaTuneTrainer``, which needs neither)."""
    if not isinstance(tuned, Tuned):
        raise DeltatuneError("trainer_kwargs takes the Tuned model returned by dt.attach / dt.load")
    return {"model": DeltaStateModel(tuned), "callbacks": [DeltaTuneCallback(tuned, **callback_options)]}


# -- the Trainer subclass ---------------------------------------------------------------------------
def _loss_terms(tuned: Tuned, mixup: float, contrastive: float, temperature: float) -> LossTerms | None:
    """The Trainer's mixup / contrastive terms, checked as the run config checks ``train.*``; None if off."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    problems = [f"{name}={value!r} must be a number >= 0 (0: off)" for name, value in
                (("mixup", mixup), ("contrastive", contrastive)) if not (number(value) and value >= 0)]
    if not (number(temperature) and temperature > 0):
        problems.append(f"contrastive_temperature={temperature!r} must be a number > 0")
    if problems:
        raise DeltatuneError("DeltaTuneTrainer: " + "; ".join(problems))
    terms = LossTerms(mixup=float(mixup), contrastive=float(contrastive), temperature=float(temperature))
    if not terms.active:
        return None
    if takes_whole_steps(tuned.policy):
        raise DeltatuneError("DeltaTuneTrainer(mixup=..., contrastive=...) needs gradients, but this method "
                             "trains from forward passes (its policy takes the whole step); leave both at 0")
    if not type(tuned.model).__name__.endswith("ForSequenceClassification"):
        raise DeltatuneError(
            f"DeltaTuneTrainer(mixup=..., contrastive=...) is for a sequence-classification model, but this "
            f"is a {type(tuned.model).__name__}: the Trainer's labels are then token ids. For label-word "
            "classification with a causal LM use `deltatune train` with train.mixup / train.contrastive "
            "(data.task: classification)"
        )
    classification_head(tuned)  # refuses a model without a head module it can read
    return terms


def _objective(tuned: Tuned, objective: str | dict[str, Any] | None, task: grpo.GRPOTask | None
               ) -> preference.PreferenceObjective | grpo.GRPOOptions | None:
    """The Trainer's ``objective`` (``train.objective``'s values), parsed; None for the data's own loss (sft).
    ``disable_dropout`` (the preference objectives' default) sets every dropout of the model and delta to 0. GRPO
    trains its prompts ``task``: ``"grpo"`` alone takes the task's options, a mapping replaces them."""
    from deltatune.data import objectives

    if objective is None:
        return None
    if objective in ("grpo", {"name": "grpo"}):  # the name alone: the task's own options
        if task is None:
            raise DeltatuneError(_NO_PROMPTS_TASK)
        found, options = objectives.get("grpo"), task.options
    else:
        found, options = objectives.parse(objective)
    if found.task is None:
        return None
    if isinstance(options, grpo.GRPOOptions):
        if task is None:
            raise DeltatuneError(_NO_PROMPTS_TASK)
        refusal = grpo.grpo_refusal(tuned.policy)
        if refusal is not None:
            raise DeltatuneError(f"DeltaTuneTrainer: {refusal}")
        task.use_objective(options)
        return options
    if not isinstance(options, preference.PreferenceObjective):
        raise DeltatuneError(f"DeltaTuneTrainer(objective={found.name!r}) is not supported; use `deltatune train` "
                             f"with train.objective: {found.name}")
    if options.disable_dropout:
        preference.disable_dropout(tuned)
    return options


_NO_PROMPTS_TASK = (
    "DeltaTuneTrainer(objective='grpo') samples completions and scores them with the reward functions of a prompts "
    "task: pass task=build_task(DataConfig(path=..., task='prompts'), tokenizer, model, objective=...) (or its "
    "collate as data_collator), with train_dataset=task.train"
)


def _prompts_task(task: Any, collator: Any) -> grpo.GRPOTask | None:
    """The GRPO task given (``task=``) or whose ``collate`` is the data collator."""
    if task is not None and not isinstance(task, grpo.GRPOTask):
        raise DeltatuneError(f"DeltaTuneTrainer(task=...) takes a prompts task (data.task: prompts), not "
                             f"{type(task).__name__}")
    owner = getattr(collator, "__self__", None)
    return task if task is not None else owner if isinstance(owner, grpo.GRPOTask) else None


class DeltaTuneTrainer(Trainer):
    """``transformers.Trainer`` for a ``Tuned`` model: extra policy losses, delta-only checkpoints, resume.

    ``mixup``, ``contrastive`` and ``contrastive_temperature`` are the run config's ``train.mixup`` /
    ``train.contrastive`` / ``train.contrastive_temperature`` (``deltatune.data.tasks.LossTerms``, 0: off) for
    a sequence-classification model: while training, the loss is then computed here from the logits and the
    ``labels`` column (mixed-label cross-entropy, + w·SupCon), as ``deltatune train`` computes it.

    ``loraplus_ratio`` / ``loraplus_lr_embedding`` are ``train.loraplus_ratio`` / ``train.loraplus_lr_embedding``
    (LoRA+: the B factors of low-rank deltas train at ratio·learning_rate, in PEFT's ``create_loraplus_optimizer``
    groups, with the Trainer's optimizer class; None: off).

    ``chunked_loss`` is ``train.chunked_loss``: a causal LM's loss (and a preference objective's log-probs) come from
    the hidden states in chunks of labelled positions, never the whole logits (``deltatune.data.lm_loss``; the same
    value as the model's own loss up to summation order); the evaluation's loss, which returns the logits, stays the
    model's own.

    ``objective`` is the run config's ``train.objective`` (``"dpo"``, ``{"name": "dpo", "beta": 0.1}``, ...): with a
    preference objective the datasets are a preference task's pairs and the collator its ``collate``
    (``train_dataset=task.train, eval_dataset=task.eval, data_collator=task.collate``, the task from
    ``deltatune.data.tasks.build_task`` with ``data.task: preference``); the loss is the objective's, the reference
    the base model (the delta taken off for that forward; for a delta trained in place, computed once here for
    every pair of a list dataset), and the logs carry TRL's metrics (``rewards/chosen``, ..., ``eval_rewards/...``).

    With ``objective="grpo"`` (or GRPO's options as a mapping) the data is a prompts task's (``data.task: prompts``,
    built with ``build_task(cfg, tokenizer, model, objective=...)``): pass it as ``task=task`` with
    ``train_dataset=task.train`` (``eval_dataset=task.eval``); its ``collate`` is the collator (its ``row`` column
    is kept), the loss is ``task.loss`` (sampling, rewards, the clipped surrogate), the logs carry TRL's GRPO
    metrics (``reward``, ``reward_std``, ``rewards/<name>/mean``, ``kl``, ``completions/mean_length``, ...) and the
    evaluation the mean reward of greedy completions (``eval_reward``; there is no ``eval_loss``: set
    ``metric_for_best_model="reward"`` for ``load_best_model_at_end``). ``per_device_train_batch_size`` counts
    prompts; each is sampled ``num_generations`` times."""

    def __init__(self, model: Tuned | None = None, *args: Any, mixup: float = 0.0, contrastive: float = 0.0,
                 contrastive_temperature: float = 0.1, objective: str | dict[str, Any] | None = None,
                 task: grpo.GRPOTask | None = None, loraplus_ratio: float | None = None,
                 loraplus_lr_embedding: float = LORAPLUS_LR_EMBEDDING, chunked_loss: bool = True,
                 **kwargs: Any) -> None:
        if not isinstance(model, Tuned):
            raise DeltatuneError("DeltaTuneTrainer trains the Tuned model returned by dt.attach / dt.load (model=tuned)")
        self.loraplus = (loraplus_ratio, loraplus_lr_embedding)  # train.loraplus_ratio / loraplus_lr_embedding
        self.chunked_loss = chunked_loss  # train.chunked_loss
        self.loss_terms = _loss_terms(model, mixup, contrastive, contrastive_temperature)
        self.prompts_task = _prompts_task(task, kwargs.get("data_collator"))
        self.objective = _objective(model, objective, self.prompts_task)
        if self.objective is not None and self.loss_terms is not None:
            raise DeltatuneError("DeltaTuneTrainer: mixup / contrastive are classification losses and objective a "
                                 "preference or RL loss; use one of them")
        self.grpo = isinstance(self.objective, grpo.GRPOOptions)
        if self.grpo and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = self.prompts_task.collate
        self._objective_metrics: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        super().__init__(model, *args, **kwargs)
        self.tuned = model
        _refuse_zero_below_3(self)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, DeltaTuneCallback)]
        if not found:
            self.add_callback(DeltaTuneCallback(model))
            found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, DeltaTuneCallback)]
        self.delta_callback: DeltaTuneCallback = found[0]
        # the wrapper's forward(*args, **kwargs) hides the model's signature: read the wrapped model's
        inner = model.model
        params = inspect.signature(inner.forward).parameters
        self._signature_columns = list(params) + list({"label", "label_ids", *(self.args.label_names or [])})
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)
        if hasattr(inner, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = inner.accepts_loss_kwargs
        else:
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        if self.grpo:
            self._signature_columns += ["row"]  # each prompt's data row reaches the collator and the rewards
        elif self.objective is not None:
            self._signature_columns += list(preference.FEATURE_KEYS)  # a pair's fields reach the collator
            self._precompute_reference()

    # a preference objective ----------------------------------------------------------------------
    def _precompute_reference(self) -> None:
        """The reference log-probs of every pair of the list datasets, for a delta trained in place (taking it off
        for every batch would copy whole tensors); computed now from the base model, in the features (``ref``).
        A dataset of another type gets them per batch (exact, slower)."""
        if not self.objective.needs_reference or self.tuned.switchable:
            return
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for data in [self.train_dataset, *evals]:
            if not (isinstance(data, list) and all(isinstance(f, dict) for f in data)):
                if data is not None:
                    warnings.warn("DeltaTuneTrainer: the reference log-probs of a delta trained in place are computed "
                                  "for every batch (the delta taken off and put back) unless the dataset is a list "
                                  "of pairs (task.train)", stacklevel=3)
                continue
            with self.compute_loss_context_manager():
                values = preference.reference_logps(self.tuned, data, self.data_collator,
                                                    self.args.per_device_eval_batch_size)
            for f, value in zip(data, values.tolist(), strict=True):
                f["ref"] = value

    def _objective_loss(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
                        ) -> torch.Tensor:
        """The objective's mean loss on a batch ([chosen; rejected] pairs, or GRPO's prompts); its metrics kept for
        ``log``."""
        assert self.objective is not None
        if self.grpo:
            loss, _ = self.prompts_task.loss(model, inputs)
            metrics = self.prompts_task.take_metrics()
        else:
            loss, metrics = preference.preference_loss(model, inputs, self.objective, self.chunked_loss)
        self._objective_metrics["train" if model.training else "eval"].append(metrics)
        if model.training and self._scaled_for_accumulation(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        if self.objective is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        if self.grpo:  # the mean reward of greedy completions: GRPO's evaluation has no loss
            with self.compute_loss_context_manager():
                self._objective_metrics["eval"].append(self.prompts_task.evaluate_batch(model, inputs))
            return None, None, None
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self._objective_loss(model, inputs, None)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The objective's metrics, averaged over the batches since the last log (``eval_`` after an evaluation),
        join the Trainer's logs, as TRL's trainers log them."""
        if self.objective is not None:
            mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
            seen, self._objective_metrics[mode] = self._objective_metrics[mode], []
            prefix = "eval_" if mode == "eval" else ""
            if seen:
                logs.update({f"{prefix}{k}": sum(m[k] for m in seen) / len(seen) for k in seen[0]})
        super().log(logs, start_time)

    # the policy's regulariser -------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if "position_ids" in inputs and "attention_mask" not in inputs:
            # packed rows with document masks (Task.with_documents): transformers builds them only without a cache
            inputs = {**inputs, "use_cache": False}
        if self.objective is not None:
            loss = self._objective_loss(model, inputs, num_items_in_batch)
            result = (loss, None) if return_outputs else loss
        elif model.training and self.loss_terms is not None:
            result = self._loss_with_terms(model, inputs, return_outputs, num_items_in_batch)
        elif self._takes_chunked_loss(model, inputs, return_outputs):
            result = self._chunked_causal_loss(model, inputs, num_items_in_batch)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        extra = self.tuned.policy.extra_loss(self.tuned)
        if extra is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # the regulariser must count once per optimizer step, as in the native loop
        if self._scaled_for_accumulation(num_items_in_batch):
            extra = extra / self.current_gradient_accumulation_steps
        loss = loss + extra.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def _takes_chunked_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool) -> bool:
        """The model's own causal-LM loss can come from ``deltatune.data.lm_loss`` instead (no whole logits): a
        causal LM whose logits are its head's output, labels given, no outputs asked for, no custom loss."""
        return (self.chunked_loss and not return_outputs and "labels" in inputs and self.label_smoother is None
                and self.compute_loss_func is None and is_causal(unwrap(model)) and lm_loss.supported(model))

    def _chunked_causal_loss(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
                             ) -> torch.Tensor:
        """transformers' ``ForCausalLMLoss`` as the Trainer gets it (the sum over the batch's items / the items in
        the whole accumulated batch when the model takes loss kwargs, else the mean), and its scaling for averaging
        tokens across devices, from the chunked next-token NLL."""
        labels = inputs["labels"]
        rest = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}  # token_nll sets use_cache
        total = lm_loss.token_nll(model, rest, labels).nll.sum()
        counted = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if counted:
            items = num_items_in_batch
            loss = total / (items.to(total.device) if isinstance(items, torch.Tensor) else items)
        else:
            loss = total / (labels[:, 1:] != lm_loss.IGNORE_INDEX).sum().clamp(min=1).to(total.device)
        if self.args.average_tokens_across_devices and counted:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return loss

    def _scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """training_step divides the loss by the accumulation steps unless it counts as normalised by
        num_items_in_batch: a per-batch mean added to it must then be divided here."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _loss_with_terms(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool,
                         num_items_in_batch: Any) -> Any:
        """The mean classification loss with mixup / contrastive (``deltatune.data.tasks.LossTerms``),
        computed from the logits; the model gets no labels, so it computes no loss of its own."""
        if "labels" not in inputs:
            raise DeltatuneError("DeltaTuneTrainer(mixup=..., contrastive=...) needs a `labels` column (the "
                                 "class of each example)")
        labels = inputs["labels"]
        rest = {k: v for k, v in inputs.items() if k != "labels"}
        head, positions = classification_head(self.tuned), head_positions(self.tuned, rest)
        assert self.loss_terms is not None
        with self.loss_terms.around(head, positions, len(labels)) as seen:
            outputs = model(**rest)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = seen.loss(logits.float(), labels.to(logits.device))
        if self._scaled_for_accumulation(num_items_in_batch):
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        own = self._policy_step(model, inputs, num_items_in_batch)
        if own is not None:  # the policy took the whole step
            return own
        # the returned share of the step's loss (already divided for accumulation) sums to the step's loss,
        # which the policy's skip_step sees
        loss = super().training_step(model, inputs, num_items_in_batch)
        cb = self.delta_callback
        cb.step_loss = loss.detach().clone() if cb.step_loss is None else cb.step_loss + loss.detach()
        return loss

    def _policy_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any
                     ) -> torch.Tensor | None:
        """The step of a policy that takes it whole (``Policy.train_step``: zeroth-order training from forward
        passes, no backward); None for every other policy. The optimizer's and scheduler's steps that follow
        find no gradients and change nothing but the learning rate."""
        policy = self.tuned.policy
        if not takes_whole_steps(policy):
            return None
        inputs = self._prepare_inputs(inputs)

        def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch).detach().float()
            return mean_over_ranks(loss)  # every rank takes the same step

        loss = policy.train_step(self.state.global_step, self.tuned, inputs, loss_fn, self._get_learning_rate(),
                                 self.args.weight_decay)
        if loss is None:
            return None
        self.delta_callback._before_done = self.state.global_step  # as in the native loop: no before_optimizer_step
        return torch.tensor(loss, device=self.args.device)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The policy's own optimizer where it needs one (per-element Adam ages, SM3), else the Trainer's (with
        ``loraplus_ratio``: the Trainer's optimizer class over LoRA+'s groups, ``deltatune.core.optim``)."""
        if self.optimizer is None:
            own = self.tuned.policy.make_optimizer(list(self.tuned.deltas.parameters()), self.args.learning_rate,
                                                   self.args.weight_decay)
            ratio, lr_embedding = self.loraplus
            if own is not None and ratio is not None:
                raise DeltatuneError(f"DeltaTuneTrainer(loraplus_ratio=...) groups the Trainer's optimizer, but "
                                     f"{self.tuned.method.name!r} brings its own (its policy's): leave it out")
            if ratio is not None:
                cls, options = self.get_optimizer_cls_and_kwargs(self.args, self.tuned)
                options = {k: v for k, v in options.items() if k != "lr"}
                training = [p for p in self.tuned.deltas.parameters() if p.requires_grad]
                own = loraplus_optimizer(cls, self.tuned.forms, training, lr=self.args.learning_rate, ratio=ratio,
                                         lr_embedding=lr_embedding, weight_decay=self.args.weight_decay,
                                         what=f"method {self.tuned.method.name!r}", **options)
            if own is not None:
                self.optimizer = own
                return own
        return super().create_optimizer(model)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        # the native loop shows the policy the unclipped gradients; do the same
        self.delta_callback.run_before(self.state.global_step, self.optimizer)
        return super()._clip_grad_norm(model)

    # delta-only saving and resuming ------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Trainer.save_model calls _save on the saving rank only; a ZeRO-3-partitioned delta is gathered on every
        # rank first (the delta alone: never the 16-bit base that Trainer's own ZeRO-3 path would gather)
        if any(hasattr(p, "ds_id") for p in self.tuned.deltas.parameters()):
            with zero3_gathered(self.tuned):
                self._save(output_dir)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.tuned.save(Path(output_dir) / self.delta_callback.artifact_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_delta(self, folder: str | os.PathLike) -> bool:
        folder = Path(folder) / self.delta_callback.artifact_dir
        if not (folder / artifact.META_FILE).is_file():
            return False
        saved = Delta.read(folder)
        saved.check_fits(self.tuned.fingerprint(), fix="Resume on the base model the run started from.")
        with torch.no_grad():
            self.tuned.load_delta_state_dict(saved.state_dict())
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not self._load_delta(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_policy_state(self.tuned, resume_from_checkpoint)
        self.delta_callback.restored = True
        return None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not self._load_delta(best):
            return super()._load_best_model()
        return None
