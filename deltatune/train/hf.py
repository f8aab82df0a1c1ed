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
``forward(*args, **kwargs)`` hides the model's argument names. The plain Trainer then also saves the whole
model state dict in every checkpoint and does not add ``policy.extra_loss``.

Checkpoint layout (``checkpoint-N/``): ``deltatune/`` (the artifact at step N, loadable with ``dt.load``),
``deltatune_policy.json`` + ``deltatune_policy.safetensors`` (the policy's ``state_dict`` and which delta
tensors train), next to the Trainer's own ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``...
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import can_return_loss, find_labels

from deltatune.core import artifact
from deltatune.core.policy import Policy
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.train.state import join, split

ARTIFACT_DIR = "deltatune"  # sub-folder of output_dir / checkpoint-N holding the artifact
POLICY_JSON = "deltatune_policy.json"
POLICY_TENSORS = "deltatune_policy.safetensors"


# -- policy state on disk -------------------------------------------------------------------
def save_policy_state(tuned: Tuned, folder: str | os.PathLike) -> None:
    """Write the policy's ``state_dict`` and the trainable flags of the delta tensors into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    state = split(tuned.policy.state_dict(), tensors)
    doc = {
        "policy": type(tuned.policy).__name__,
        "state": state,
        "trainable": {name: p.requires_grad for name, p in tuned.deltas.named_parameters()},
    }
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, str(folder / POLICY_TENSORS))
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


def _inner_optimizer(optimizer: Any) -> Any:
    """accelerate wraps the optimizer; policies get the torch optimizer, as in the native loop."""
    return getattr(optimizer, "optimizer", optimizer)


def _sync(optimizer: torch.optim.Optimizer, tuned: Tuned, before: dict[int, bool]) -> dict[int, bool]:
    """After a policy changed what trains: tensors that stopped or started training lose their optimizer
    state, tensors that train and are unknown to the optimizer join its first group. Parameters the policy
    did not touch (a head the user unfroze, say) are left as they are."""
    now = {id(p): p.requires_grad for p in tuned.deltas.parameters()}
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for p in tuned.deltas.parameters():
        if before.get(id(p)) != p.requires_grad:
            optimizer.state.pop(p, None)
            p.grad = None
        if p.requires_grad and id(p) not in known:
            optimizer.param_groups[0]["params"].append(p)
            known.add(id(p))
    return now


# -- the callback -------------------------------------------------------------------------------
class DeltaTuneCallback(TrainerCallback):
    """Runs the policy of ``tuned`` inside a ``transformers.Trainer`` and saves the delta.

    * ``policy.before_optimizer_step(step, tuned, optimizer)`` in ``on_pre_optimizer_step`` (gradients are
      present; under a plain Trainer they are already clipped, ``DeltaTuneTrainer`` calls it before clipping
      like the native loop),
    * ``policy.after_optimizer_step(step, tuned, optimizer)`` in ``on_optimizer_step``, then the optimizer is
      kept consistent with a changed trainable set,
    * ``policy.skip_step(step, loss)`` right after ``before_optimizer_step`` (``DeltaTuneTrainer`` only: it
      records the step's loss); True drops the delta's gradients, so the optimizer leaves it as it is,
    * ``policy.should_stop(step, epoch_end)`` in ``on_step_end``; True stops training,
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
        self._trainable: dict[int, bool] = {}
        self._before_done: int | None = None
        self.step_loss: torch.Tensor | None = None  # DeltaTuneTrainer adds each micro-batch's share of the loss

    # the policy around the optimizer step ------------------------------------------------------
    def run_before(self, step: int, optimizer: Any) -> None:
        if self._before_done != step:
            self._before_done = step
            self.tuned.policy.before_optimizer_step(step, self.tuned, _inner_optimizer(optimizer))
            loss, self.step_loss = self.step_loss, None
            skips = type(self.tuned.policy).skip_step is not Policy.skip_step  # no sync for policies that never skip
            if loss is not None and skips:
                if torch.distributed.is_initialized():  # every rank takes the same decision
                    torch.distributed.all_reduce(loss)
                    loss = loss / torch.distributed.get_world_size()
                if self.tuned.policy.skip_step(step, float(loss)):
                    for p in self.tuned.deltas.parameters():
                        p.grad = None

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
        before = {id(p): True for p in self.tuned.deltas.parameters()}  # what the optimizer may have been built with
        optimizer = kw.get("optimizer")
        if optimizer is not None:
            known = {id(p) for g in optimizer.param_groups for p in g["params"]}
            before = {id(p): id(p) in known for p in self.tuned.deltas.parameters()}
            self._trainable = _sync(_inner_optimizer(optimizer), self.tuned, before)
        else:
            self._trainable = {id(p): p.requires_grad for p in self.tuned.deltas.parameters()}

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kw: Any):
        self.run_before(state.global_step, optimizer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          optimizer: Any = None, **kw: Any):
        inner = _inner_optimizer(optimizer)
        self.tuned.policy.after_optimizer_step(state.global_step, self.tuned, inner)
        if inner is not None:
            self._trainable = _sync(inner, self.tuned, self._trainable)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        epoch_end = state.epoch is not None and float(state.epoch).is_integer()
        if self.tuned.policy.should_stop(state.global_step - 1, epoch_end):
            control.should_training_stop = True

    # saving ---------------------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not (self.save_on_checkpoint and args.should_save):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not (folder / self.artifact_dir / artifact.META_FILE).is_file():  # DeltaTuneTrainer wrote it already
            self.tuned.save(folder / self.artifact_dir)
        save_policy_state(self.tuned, folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.save_artifact and args.should_save:
            self.tuned.save(Path(args.output_dir) / self.artifact_dir)


def trainer_kwargs(tuned: Tuned, **callback_options: Any) -> dict[str, Any]:
    """``Trainer(**trainer_kwargs(tuned), args=..., train_dataset=...)``: the model and the callback.

    With a plain ``Trainer`` also set ``remove_unused_columns=False`` and ``label_names=["labels"]``
    in ``TrainingArguments`` (or use ``DeltaTuneTrainer``, which needs neither)."""
    return {"model": tuned, "callbacks": [DeltaTuneCallback(tuned, **callback_options)]}


# -- the Trainer subclass ---------------------------------------------------------------------------
class DeltaTuneTrainer(Trainer):
    """``transformers.Trainer`` for a ``Tuned`` model: extra policy losses, delta-only checkpoints, resume."""

    def __init__(self, model: Tuned | None = None, *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, Tuned):
            raise DeltatuneError("DeltaTuneTrainer trains the Tuned model returned by dt.attach / dt.load (model=tuned)")
        super().__init__(model, *args, **kwargs)
        self.tuned = model
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

    # the policy's regulariser -------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        extra = self.tuned.policy.extra_loss(self.tuned)
        if extra is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # training_step divides by the accumulation steps unless the loss was normalised by num_items_in_batch;
        # the regulariser must count once per optimizer step either way, as in the native loop
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if scaled:
            extra = extra / self.current_gradient_accumulation_steps
        loss = loss + extra.to(loss.device)
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
        if type(policy).train_step is Policy.train_step:
            return None
        inputs = self._prepare_inputs(inputs)

        def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch).detach().float()
            if torch.distributed.is_initialized():  # every rank takes the same step
                loss = loss.clone()
                torch.distributed.all_reduce(loss)
                loss = loss / torch.distributed.get_world_size()
            return loss

        loss = policy.train_step(self.state.global_step, self.tuned, inputs, loss_fn, self._get_learning_rate(),
                                 self.args.weight_decay)
        if loss is None:
            return None
        self.delta_callback._before_done = self.state.global_step  # as in the native loop: no before_optimizer_step
        return torch.tensor(loss, device=self.args.device)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The policy's own optimizer where it needs one (per-element Adam ages, SM3), else the Trainer's."""
        if self.optimizer is None:
            own = self.tuned.policy.make_optimizer(list(self.tuned.deltas.parameters()), self.args.learning_rate,
                                                   self.args.weight_decay)
            if own is not None:
                self.optimizer = own
                return own
        return super().create_optimizer(model)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        # the native loop shows the policy the unclipped gradients; do the same
        self.delta_callback.run_before(self.state.global_step, self.optimizer)
        return super()._clip_grad_norm(model)

    # delta-only saving and resuming ------------------------------------------------------------
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
        meta, tensors = artifact.read_artifact(folder)
        diffs = artifact.compare_fingerprints(meta.get("fingerprint", {}), self.tuned.fingerprint())
        if diffs:
            raise DeltatuneError(f"{folder} was saved for another base model ({'; '.join(diffs)})")
        with torch.no_grad():
            self.tuned.load_delta_state_dict(tensors)
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
