"""One training loop for any number of SAEs fed by one stream of batches.

Per step: take a batch; run every SAE on it (local training: on its hook's activation rows; end-to-end: spliced
into the model, batches are token contexts); add up every SAE's objectives and the model-level ones; one
backward; then per SAE: clip, Adam step (its own learning rate), keep the decoder on the sphere if asked,
update firing statistics. The SAEs' losses share no parameters, so local SAEs train exactly as they would alone.
Everything that decides the rest of the run is in `state_dict()`, so a checkpoint continues the same run.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.activations.source import Batch
from saelab.core.config import ConfigError, to_dict
from saelab.core.files import atomic_write_text, replacing_directory
from saelab.evals.metrics import log_feature_density
from saelab.saes.base import SAE
from saelab.splice import hooks_of
from saelab.training.batches import check_widths, select_inputs
from saelab.training.checkpoints import (
    CHECKPOINT_DIR,
    RESUMABLE_TRAIN_OPTIONS,
    check_same_run,
    plain,
    random_states,
    read_newest_checkpoint,
    restore_random_states,
    write_checkpoint,
)
from saelab.training.config import TrainConfig
from saelab.training.distributed import Distributed
from saelab.training.e2e import SplicedModel, SplicedRun
from saelab.training.logging import MetricsLogger
from saelab.training.memory import keep_freed_memory
from saelab.training.objectives import ModelObjective, Objective, check_finite, local_objectives
from saelab.training.schedules import lr_factor
from saelab.training.unit import Forward, TrainingUnit

WHOLE_MODEL = "model"
"""Name under which metrics of the model with every SAE spliced in are logged (so no SAE may use it)."""


class Trainer:
    """Trains SAEs on batches from an activation source. `fit` runs the loop; `finish` saves the results."""

    def __init__(
        self,
        saes: SAE | Sequence[SAE] | Mapping[str, SAE],
        config: TrainConfig,
        out_dir: str | Path | None = None,
        objectives: list[Objective] | None = None,
        evaluator: Callable[[dict[str, SAE], bool], dict[str, dict[str, float]]] | None = None,
        splicer: SplicedModel | None = None,
        model_objectives: list[ModelObjective] | None = None,
        lrs: Mapping[str, float] | None = None,
        initial: Mapping[str, SAE] | None = None,
        dist: Distributed | None = None,
        run_identity: Mapping[str, Any] | None = None,
    ):
        """`objectives`: each SAE's loss terms (default: local reconstruction + sparsity + auxiliary).
        `splicer` + `model_objectives`: end-to-end training, batches are token contexts. `lrs`: learning rates
        of particular SAEs (the others use config.lr). `initial`: saved SAEs (raw activation units) that
        particular SAEs start from instead of their random initialisation. `dist`: this process's place in
        a torchrun group (data parallel: replicas of every SAE; module parallel: this rank's SAEs). `evaluator`:
        called every config.eval_every steps as `evaluator(saes, final)`, `final` at the last step. `run_identity`:
        the rest of the run's configuration (beyond `config` and the SAEs' own configs), recorded in checkpoints so
        that `resume` refuses a checkpoint of another run."""
        if isinstance(saes, SAE):
            saes = {"sae": saes}
        elif not isinstance(saes, Mapping):
            saes = {f"sae_{i}": sae for i, sae in enumerate(saes)}
        self.cfg = config
        keep_freed_memory()  # large per-step tensors come back from the heap instead of fresh mappings
        self.evaluator = evaluator
        self.dist = dist or Distributed()  # a single process unless torchrun says otherwise
        self.splicer, self.model_objectives = splicer, list(model_objectives or [])
        if self.model_objectives and splicer is None:
            raise ConfigError("model-level objectives need a splicer (the model to splice the SAEs into)")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        lrs = dict(lrs or {})
        if unknown := set(lrs) - set(saes):
            raise ConfigError(f"learning rates given for unknown SAEs: {', '.join(sorted(unknown))}")
        if WHOLE_MODEL in saes:
            raise ConfigError(f"'{WHOLE_MODEL}' names the whole model in logs: call the SAE something else")
        self.units = [
            TrainingUnit.create(
                name,
                sae,
                objectives or local_objectives(config.sparsity_warmup_steps),
                lrs.get(name, config.lr),
                config,
            )
            for name, sae in saes.items()
        ]
        self.initial = dict(initial or {})
        self.run_identity = plain(dict(run_identity or {}))
        # taken now: what the SAEs were configured as, whatever training later does to them
        self._unit_identity = {u.name: plain({**to_dict(u.sae.cfg), "lr": u.lr}) for u in self.units}
        if splicer is not None:
            splicer.check(saes.values())
        self.model_window: dict[str, list[float]] = defaultdict(list)
        self.step = 0
        self.tokens = 0
        self.prepared = False
        self._source_state: dict[str, Any] | None = None
        self.logger: MetricsLogger | None = None
        self.last_record: dict[str, Any] = {}
        self.last_eval: dict[str, dict[str, float]] = {}
        self.resumed_from: int | None = None  # the step `resume` continues from
        self.resumed_checkpoint: Path | None = None
        self._clock = (time.perf_counter(), 0)

    @property
    def saes(self) -> dict[str, SAE]:
        return {u.name: u.sae for u in self.units}

    # ----- before the first step ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batches: Iterable[Batch]) -> None:
        """Estimate normalisation scales and initialise b_dec from a few batches (not trained on)."""
        batches = list(batches)
        if not batches:
            raise ConfigError("the activation source yielded no batches")
        if self.splicer is not None:  # token contexts: read the clean activations the SAEs will replace
            hooks = [hook for u in self.units for hook in hooks_of(u.sae)]
            batches = [self.splicer.clean_activations(_tokens(batch), hooks) for batch in batches]
        for unit in self.units:
            pairs = [select_inputs(b, unit.sae) for b in batches]
            check_widths(*pairs[0], unit.sae, unit.name)
            xs = torch.cat([x for x, _ in pairs]).to(unit.sae.device, unit.sae.dtype)
            ys = torch.cat([y for _, y in pairs]).to(unit.sae.device, unit.sae.dtype)
            if self.dist.data_parallel:  # every rank's sample, so that the replicas start equal
                xs, ys = torch.cat(self.dist.gather_rows(xs)), torch.cat(self.dist.gather_rows(ys))
            unit.prepare(xs, ys, self.initial.get(unit.name))
        self.prepared = True

    # ----- the loop ----------------------------------------------------------------------------------
    def fit(self, source: Iterable[Batch]) -> dict[str, SAE]:
        """Train until `total_tokens`, then save (if out_dir) and return the SAEs ready for raw activations."""
        if self._source_state is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(self._source_state)
        batches: Iterator[Batch] = iter(source)
        if not self.prepared:
            self.prepare(islice(batches, self.cfg.norm_estimate_batches))
        total = self.cfg.total_steps
        self._clock = (time.perf_counter(), self.tokens)  # throughput counts this session's tokens only
        main = self.dist.is_main
        self.logger = MetricsLogger(
            self.out_dir if main else None,
            self.cfg.wandb_project if main else None,
            {"train": to_dict(self.cfg)},
            self.step,
        )
        if self.resumed_from is not None:
            self.logger.log(self.step, {"resumed_from_step": self.step})
        bar = tqdm(
            total=total, initial=self.step, disable=not (self.cfg.progress_bar and main), desc="training", unit="step"
        )
        try:
            while self.step < total:
                try:
                    batch = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the activation source ran out after {self.step} of {total} steps") from None
                self.train_step(batch)
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    bar.set_postfix(self._log())
                due = self.cfg.eval_every and (self.step % self.cfg.eval_every == 0 or self.step == total)
                if self.evaluator and due:
                    self._evaluate(final=self.step == total)
                # the last step too: a finished run can be extended (resumed with a larger total_tokens)
                if self.cfg.checkpoint_every and (self.step % self.cfg.checkpoint_every == 0 or self.step == total):
                    self.save_checkpoint(source)
        finally:
            bar.close()
            self.logger.close()
        return self.finish()

    def train_step(self, batch: Batch) -> None:
        """One step of every SAE: forward, losses, one backward, then each SAE's own update and statistics."""
        with torch.autocast(self.units[0].sae.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast is True):
            forwards, run = self._forward(batch)
            unit_terms = {
                u.name: u.loss_terms(forwards[u.name], self.step, self.cfg.dead_window_tokens) for u in self.units
            }
            model_terms = {o.name: term for o in self.model_objectives if (term := o(run)) is not None} if run else {}
        check_finite(unit_terms, model_terms, self.step)
        loss = torch.stack([t.float() for terms in [*unit_terms.values(), model_terms] for t in terms.values()]).sum()
        for unit in self.units:
            unit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.data_parallel:  # the replicas stay equal: every rank steps with the mean gradient
            self.dist.average_gradients(p for unit in self.units for p in unit.sae.parameters())
        lr_scale = lr_factor(self.step, self.cfg)
        for unit in self.units:
            unit.update(lr_scale, self.cfg.max_grad_norm)
        with torch.no_grad():
            for unit in self.units:
                unit.record(forwards[unit.name], unit_terms[unit.name], self.dist)
            for name, term in model_terms.items():
                self.model_window[name].append(float(term.detach()))
            for name, value in (run.metrics() if run is not None else {}).items():
                self.model_window[name].append(value)
        rows = forwards[self.units[0].name][0].shape[0]
        self.tokens += int(self.dist.sum(torch.tensor([rows]))) if self.dist.data_parallel else rows

    def _forward(self, batch: Batch) -> tuple[dict[str, Forward], SplicedRun | None]:
        """Every SAE's training forward: on its rows of an activation batch, or spliced into the model (end to
        end: the batch is token contexts, and the model's clean and spliced passes come back too)."""
        if self.splicer is not None:
            return self.splicer.run(_tokens(batch), self.units)
        return {unit.name: unit.forward_local(batch) for unit in self.units}, None

    def _log(self) -> dict[str, float]:
        record: dict[str, Any] = {"tokens": self.tokens, "tokens_per_second": self.tokens_per_second()}
        for unit in self.units:
            prefix = self._metric_prefix(unit.name)
            record[prefix + "lr"] = unit.lr * lr_factor(self.step - 1, self.cfg)
            for name, values in unit.window.items():
                record[prefix + name] = sum(values) / len(values)
            record[prefix + "dead_fraction"] = unit.dead_fraction(self.cfg.dead_window_tokens)
            unit.window.clear()
        for name, values in self.model_window.items():
            record[f"{WHOLE_MODEL}/{name}"] = sum(values) / len(values)
        self.model_window.clear()
        if self.dist.module_parallel:  # every rank's SAEs in one record
            record = self.dist.merged(record)
        assert self.logger is not None
        self.logger.log(self.step, record)
        self.last_record = record
        first = self._metric_prefix(self.units[0].name)
        return {k: round(record[first + k], 4) for k in ("loss", "l0", "explained_variance", "dead_fraction")}

    def _metric_prefix(self, name: str) -> str:
        """How an SAE's metrics are named in logs: bare when it is the run's only SAE. A module-parallel rank may
        hold one SAE of several, whose metrics meet the others' in one gathered record: always named there."""
        return "" if len(self.units) == 1 and not self.dist.module_parallel else f"{name}/"

    def _evaluate(self, final: bool) -> None:
        """Run the evaluator on the SAEs as they would be saved now (`final`: the run's last evaluation, which may
        be more thorough); log under eval/ (per SAE when several)."""
        assert self.evaluator is not None and self.logger is not None
        if self.dist.data_parallel and not self.dist.is_main:
            return  # replicas are equal: rank 0 evaluates
        results = self.evaluator(self.final_saes(), final)
        if self.dist.module_parallel:
            results = self.dist.merged(results)
        record = {}
        for name, metrics in results.items():
            prefix = self._metric_prefix(name) + "eval/"
            record.update({prefix + key: value for key, value in metrics.items()})
        self.logger.log(self.step, record)
        self.last_eval = results

    def tokens_per_second(self) -> float:
        """Training throughput since `fit` started (harvesting the activations included)."""
        start, tokens = self._clock
        return (self.tokens - tokens) / max(time.perf_counter() - start, 1e-9)

    # ----- results -----------------------------------------------------------------------------------
    def final_saes(self) -> dict[str, SAE]:
        """Copies of the SAEs as they are saved (see `TrainingUnit.final_sae`)."""
        return {unit.name: unit.final_sae() for unit in self.units}

    def finish(self) -> dict[str, SAE]:
        """Fold, save (SAE directories + summary.json when out_dir is set) and return the trained SAEs."""
        saes = self.final_saes()
        if self.out_dir is None:
            return saes
        main = self.dist.is_main
        if main or self.dist.module_parallel:  # module parallel: each rank saves its own SAEs
            for unit in self.units:
                density = log_feature_density(unit.fire_counts, self.tokens)
                # replaced whole: nothing written for older weights (a resumed run's, evaluations) stays beside
                with replacing_directory(self.out_dir / unit.name) as folder:
                    saes[unit.name].save(folder, sparsity=density)
        summary = self.summary()
        if self.dist.module_parallel:
            summary = self.dist.merged(summary)
        if main:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        self.dist.barrier()  # no rank returns before every file of the run is written
        return saes

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per SAE: the metrics of the last logged window and the dead fraction now."""
        result = {}
        for unit in self.units:
            prefix = self._metric_prefix(unit.name)
            result[unit.name] = {
                "architecture": unit.sae.cfg.architecture,
                "steps": self.step,
                "tokens": self.tokens,
                "explained_variance": self.last_record.get(prefix + "explained_variance"),
                "l0": self.last_record.get(prefix + "l0"),
                "dead_fraction": unit.dead_fraction(self.cfg.dead_window_tokens),
                "tokens_per_second": round(self.last_record.get("tokens_per_second", self.tokens_per_second()), 1),
                **{f"eval/{k}": v for k, v in self.last_eval.get(unit.name, {}).items()},
            }
            if self.resumed_from is not None:
                result[unit.name]["resumed_from_step"] = self.resumed_from
        # The whole model with every SAE spliced in (end-to-end runs; evaluations of several SAEs)
        whole = {k[len("model/") :]: v for k, v in self.last_record.items() if k.startswith("model/")}
        whole.update({f"eval/{k}": v for k, v in self.last_eval.get(WHOLE_MODEL, {}).items()})
        if whole:
            result[WHOLE_MODEL] = whole
        return result

    # ----- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, source: Any = None) -> dict[str, Any]:
        """Everything that decides the rest of the run (the source position included, when it has one). With
        several processes: every rank's SAEs (module parallel) and every rank's data position (data parallel)."""
        units = {u.name: {**u.state_dict(), "identity": self._unit_identity[u.name]} for u in self.units}
        source_state = source.state_dict() if hasattr(source, "state_dict") else None
        if self.dist.module_parallel:
            units = self.dist.merged(units)
        if self.dist.data_parallel:
            source_state = {f"rank_{i}": s for i, s in enumerate(self.dist.gather_objects(source_state))}
        return {
            "step": self.step,
            "tokens": self.tokens,
            "prepared": self.prepared,
            **random_states(),
            "source": source_state,
            "units": units,
            "identity": self.identity(),
            "last_record": self.last_record,  # a finished run resumed only to save it again reports the same
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.prepared = int(state["step"]), int(state["tokens"]), bool(state["prepared"])
        restore_random_states(state)
        self._source_state = state["source"]
        self.last_record, self.last_eval = dict(state.get("last_record", {})), dict(state.get("last_eval", {}))
        if self.dist.data_parallel:
            key = f"rank_{self.dist.rank}"
            if not isinstance(self._source_state, dict) or key not in self._source_state:
                raise ConfigError(
                    f"this checkpoint was not written by a data-parallel run with {self.dist.world_size} ranks"
                )
            self._source_state = self._source_state[key]
        for unit in self.units:
            unit.load_state_dict(state["units"][unit.name])

    def save_checkpoint(self, source: Any = None) -> Path:
        """Write `out_dir/checkpoints/step_N/`; it counts only once its COMPLETE marker exists."""
        if self.out_dir is None:
            raise ConfigError("checkpoints need an out_dir")
        state = self.state_dict(source)  # collective with several processes: every rank takes part
        root = self.out_dir / CHECKPOINT_DIR
        if not self.dist.is_main:
            return root / f"step_{self.step:09d}"
        return write_checkpoint(root, self.step, state, self.cfg.keep_checkpoints)

    def identity(self) -> dict[str, Any]:
        """The settings that decide this run's weights (all but RESUMABLE_TRAIN_OPTIONS), as checkpoints record them."""
        train = {k: v for k, v in to_dict(self.cfg).items() if k not in RESUMABLE_TRAIN_OPTIONS}
        return plain({**self.run_identity, "train": train, "processes": self.dist.world_size})

    def resume(self, out_dir: str | Path | None = None) -> bool:
        """Load the newest readable complete checkpoint under out_dir; False when there is none. A checkpoint written
        by a differently configured run (other than in RESUMABLE_TRAIN_OPTIONS), or past this run's total_tokens,
        is refused with a ConfigError before anything is loaded."""
        directory = out_dir or self.out_dir
        if directory is None:
            raise ConfigError("resuming needs an out_dir (the run's directory, where its checkpoints are)")
        found = read_newest_checkpoint(Path(directory) / CHECKPOINT_DIR)
        if found is None:
            return False
        checkpoint, state = found
        # module parallel: this rank trains some of the SAEs
        check_same_run(checkpoint, state, self.identity(), self._unit_identity, some_units=self.dist.module_parallel)
        if int(state["step"]) > self.cfg.total_steps:
            raise ConfigError(
                f"train.total_tokens {self.cfg.total_tokens:,} ({self.cfg.total_steps} steps) is less "
                f"than {checkpoint} has trained already ({int(state['tokens']):,} tokens)"
            )
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError) as e:  # a checkpoint too old to record its configuration
            raise ConfigError(f"{checkpoint} does not fit this run's SAEs: {str(e).splitlines()[0]}") from None
        self.resumed_from, self.resumed_checkpoint = self.step, checkpoint
        return True


def _tokens(batch: Batch) -> Tensor:
    """A batch of token contexts, which is what end-to-end training (a splicer) reads."""
    assert isinstance(batch, Tensor), "end-to-end training reads batches of token ids"
    return batch
